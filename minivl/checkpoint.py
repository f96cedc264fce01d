"""Checkpoints: a folder holding `config.json` (how to rebuild the model) and `model.safetensors`
(the weights), written atomically.

What it builds: `save_model` / `load_model`, the `Checkpointable` mixin every model inherits
(`model.save(path)`, `Model.load(path)`; a model's `tokenizer`, when it has one, is written into
the same folder by the same atomic save and attached again on load), `load_state_dict_checked` (a mismatch names the
tensors), `config_from_dict` (nested dataclass configs back from JSON), and the pickle-free
`save_state` / `load_state` the trainer uses for optimizer and RNG state.

The one idea: a checkpoint is data, not code. The config is JSON and the tensors are safetensors,
so loading one can never execute anything (unlike `torch.load` of a pickle). A checkpoint is
written into a temporary folder and renamed into place only when complete, so a crash mid-save
leaves the previous checkpoint loadable and never half of a new one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import types
import typing
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import minivl

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
MODELS: dict[str, type] = {}  # checkpoint name (config.json's "class") -> class, filled by Checkpointable


def checkpoints_dir() -> Path:
    """data/checkpoints (or $MINIVL_DATA/checkpoints): where training writes named checkpoints."""
    return minivl.data_dir() / "checkpoints"


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_model(cls: type) -> type:
    """Make `load_model(path)` able to rebuild `cls` from the name stored in config.json.

    The name is `cls.checkpoint_name` when set, else the class name. Two different classes under
    one name would make every such checkpoint load as whichever registered last, so that raises;
    a class defined again at the same place (a module reload, a notebook cell run twice) replaces
    the old definition.
    """
    name = cls.__dict__.get("checkpoint_name") or cls.__name__
    known = MODELS.get(name)
    if known is not None and known is not cls and _origin(known) != _origin(cls):
        raise ValueError(f"checkpoint name {name!r} is taken by {_origin(known)}; give {_origin(cls)} "
                         "another class name or a `checkpoint_name` class attribute")
    MODELS[name] = cls
    cls.checkpoint_name = name
    return cls


class Checkpointable:
    """Mixin for models: `model.save(path)`, `Model.load(path)`. Subclasses register themselves.

    The model keeps its dataclass config in `self.config`, is built by `cls(config)`, and names
    its config type in a `config_class` attribute (or annotates `__init__(self, config: XConfig)`).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_model(cls)

    def save(self, path: str | Path, tokenizer=None) -> None:
        save_model(self, path, tokenizer)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu"):
        return load_model(path, cls=cls, map_location=map_location)


# ---------------------------------------------------------------- configs
def config_from_dict(cls: type, d: dict):
    """Rebuild dataclass `cls` from a JSON dict: nested dataclasses and tuples come back typed."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or not isinstance(d, dict):
        raise TypeError(f"expected a dataclass type and a dict, got {cls!r} and {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:  # a silently dropped key would rebuild a different model than the one saved
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(hints.get(k), v) for k, v in d.items()})


def _typed(hint, value):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: use X
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value)
    if (hint is tuple or typing.get_origin(hint) is tuple) and isinstance(value, list):
        return tuple(value)  # JSON has no tuples
    return value


def _config_class(cls: type) -> type:
    found = getattr(cls, "config_class", None)
    if found is None:
        with contextlib.suppress(Exception):
            found = typing.get_type_hints(cls.__init__).get("config")
    if not (isinstance(found, type) and dataclasses.is_dataclass(found)):
        raise TypeError(f"{cls.__name__} needs a `config_class` attribute naming its dataclass config")
    return found


# ---------------------------------------------------------------- weights
def _tied(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias -> first name, for entries that are the very same tensor (e.g. tied embeddings)."""
    first, alias = {}, {}
    for name, t in state_dict.items():
        if t.numel() == 0:
            continue
        key = (t.device, t.data_ptr(), t.shape, t.stride())
        if key in first:
            alias[name] = first[key]
        else:
            first[key] = name
    return alias


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights into `model`, or raise ValueError naming every missing, unexpected and
    shape-mismatched tensor (with both shapes) - not just the first, as a config mix-up
    usually shows up in many tensors at once."""
    own = model.state_dict()
    alias = _tied(own)
    sd = dict(state_dict)
    for a, name in alias.items():  # a tied pair is stored once, under either name
        if a in sd:
            sd.setdefault(name, sd.pop(a))
    expected = {k: v for k, v in own.items() if k not in alias}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit {type(model).__name__} (was it saved with another config?)"]
        for title, items in (("missing from checkpoint", missing), ("unexpected in checkpoint", unexpected),
                             ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(lines))
    sd.update({a: sd[name] for a, name in alias.items()})
    model.load_state_dict(sd, strict=True)


def write_model_files(model: nn.Module, folder: Path) -> None:
    """config.json + model.safetensors into an existing folder (used inside `atomic_dir`)."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{type(model).__name__} must keep its dataclass config in `self.config` to be saved")
    name = getattr(type(model), "checkpoint_name", type(model).__name__)
    write_json(folder / CONFIG, {"class": name, "config": dataclasses.asdict(config),
                                 "minivl_version": minivl.__version__})
    sd = model.state_dict()
    alias = _tied(sd)
    # copies: safetensors refuses tensors that share memory, and must not see device tensors
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items() if k not in alias}
    save_file(tensors, str(folder / WEIGHTS), metadata={"tied": json.dumps(alias)})


def save_model(model: nn.Module, path: str | Path, tokenizer=None) -> None:
    """Write `path/` = config.json + model.safetensors (+ tokenizer.json), atomically.

    The tokenizer is `tokenizer`, else `model.tokenizer` when the model carries one: the ids a model
    was trained on mean nothing without it, so both land in the folder in one atomic step.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None and not callable(getattr(tokenizer, "save", None)):
        raise TypeError(f"tokenizer must have a save(path) method, got {type(tokenizer).__name__}")
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)


def load_model(path: str | Path, cls: type | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from `path/config.json` and fill it from `path/model.safetensors`."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"no {CONFIG} in {path}: not a minivl checkpoint folder")
    meta = json.loads((path / CONFIG).read_text())
    name = meta.get("class")
    if cls is None:
        if name not in MODELS:
            raise ValueError(f"checkpoint holds a {name!r}, which is not registered (known: {sorted(MODELS)}); "
                             "import the module defining it first, or pass cls=")
        cls = MODELS[name]
    elif getattr(cls, "checkpoint_name", cls.__name__) != name:
        raise ValueError(f"checkpoint {path} holds a {name!r}, not a {cls.__name__!r}")
    model = cls(config_from_dict(_config_class(cls), meta["config"]))
    load_state_dict_checked(model, load_file(str(path / WEIGHTS)))
    if (path / TOKENIZER).is_file():  # the tokenizer saved with the weights travels with the model
        from minivl.tokenizer import Tokenizer
        model.tokenizer = Tokenizer.load(path / TOKENIZER)
    return model.to(map_location)


# ---------------------------------------------------------------- atomic files and folders
def _fsync(path: Path) -> None:  # data on disk before the rename that publishes it
    with contextlib.suppress(OSError):  # directories cannot be opened on some platforms
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically: temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp folder next to `path`; on success it replaces `path`, on error it is removed.

    Folders cannot be swapped in one rename, so the old one is renamed aside, the new one in, and
    the old one deleted. Only a crash between those two renames leaves no `path` - and then the
    previous checkpoint is still whole, as `.NAME.old-*` beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- training state without pickle
def save_state(folder: str | Path, name: str, obj) -> None:
    """Nested dicts/lists/tuples of tensors and JSON scalars -> `name.safetensors` + `name.json`."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x):
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):  # optimizer state is keyed by int: keep the key types
            return {"__items__": [[k, enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint without pickle")

    skeleton = enc(obj)
    save_file(tensors, str(Path(folder) / f"{name}.safetensors"))
    write_json(Path(folder) / f"{name}.json", skeleton)


def load_state(folder: str | Path, name: str):
    """Inverse of `save_state` (tensors come back on the CPU)."""
    tensors = load_file(str(Path(folder) / f"{name}.safetensors"))

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
            return {k: dec(v) for k, v in x["__items__"]}
        return x

    return dec(json.loads((Path(folder) / f"{name}.json").read_text()))


__all__ = ["Checkpointable", "register_model", "MODELS", "CONFIG", "WEIGHTS", "TOKENIZER", "checkpoints_dir", "save_model", "load_model", "load_state_dict_checked",
           "config_from_dict", "write_model_files", "atomic_dir", "write_json", "save_state", "load_state"]
