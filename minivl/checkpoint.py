"""Checkpoints: a folder holding `config.json` (how to rebuild the model) and `model.safetensors`
(the weights), written atomically.

What it builds: `save_model` / `load_model`, the `Checkpointable` mixin every model inherits
(`model.save(path)`, `Model.load(path)`; a model's `tokenizer`, when it has one, is written into
the same folder by the same atomic save and attached again on load), `load_state_dict_checked` (a mismatch names the
tensors), `config_from_dict` (nested dataclass configs back from JSON), and the pickle-free
`save_state` / `load_state` the trainer uses for optimizer and RNG state. How the folders are
written and repaired lives in `minivl.atomic`.

The one idea: a checkpoint is data, not code. The config is JSON and the tensors are safetensors,
so loading one can never execute anything (unlike `torch.load` of a pickle). A checkpoint is
written into a temporary folder and renamed into place only when complete, so a crash mid-save
leaves the previous checkpoint loadable and never half of a new one (`resolve` repairs a kill
between the renames of the swap). Saving replaces only folders minivl wrote (`CHECKPOINT_FILES`),
never a folder holding the user's own files, and loading checks every file it reads: a damaged,
foreign or non-finite checkpoint is refused with the file named.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import minivl

from minivl.atomic import CHECKPOINT_FILES, CONFIG, TOKENIZER, WEIGHTS, atomic_dir, resolve, write_json  # noqa: F401
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
def config_from_dict(cls: type, d: dict, where: str = ""):
    """Rebuild dataclass `cls` from a JSON dict: nested dataclasses and tuples come back typed.

    Every value is checked against its field's annotation (int, float, bool, str, tuples, nested
    configs, `X | None`), so a hand-edited "width": "64" fails here, naming the field, rather than
    deep inside torch when the model is built."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or not isinstance(d, dict):
        raise TypeError(f"expected a dataclass type and a dict, got {cls!r} and {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:  # a silently dropped key would rebuild a different model than the one saved
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(hints.get(k), v, f"{where or cls.__name__}.{k}") for k, v in d.items()})


def _typed(hint, value, where: str):
    """`value` as the type `hint` names, or TypeError naming the field `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None: None, or one of the others
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _typed(a, value, where)
            except TypeError as e:
                errors.append(e)
        raise errors[0] if errors else TypeError(f"{where} cannot be {value!r}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{where} expects a {hint.__name__} (a JSON object), got {type(value).__name__} {value!r}")
        return config_from_dict(hint, value, where)
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} expects a tuple (a JSON list), got {type(value).__name__} {value!r}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise TypeError(f"{where} expects {len(args)} items, got {len(value)}: {value!r}")
        items = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args or (None,) * len(value)
        return tuple(_typed(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(items, value)))  # JSON has no tuples
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where} expects a list, got {type(value).__name__} {value!r}")
        return [_typed(args[0] if args else None, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Literal:
        if value not in args:
            raise TypeError(f"{where} expects one of {list(args)}, got {value!r}")
        return value
    # bool is an int to Python, but `"depth": true` is a broken config, not depth 1
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), dict: lambda v: isinstance(v, dict)}.get(origin or hint)
    if ok is not None and not ok(value):
        raise TypeError(f"{where} expects {getattr(hint, '__name__', hint)}, got {type(value).__name__} {value!r}")
    return float(value) if hint is float else value  # other annotations (Any, callables) are not checked


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


def _vocab_sizes(config) -> set[int]:
    """Every `vocab_size` field in a (nested) dataclass config: the ids a tokenizer may produce."""
    found = set()
    for f in dataclasses.fields(config) if dataclasses.is_dataclass(config) else ():
        v = getattr(config, f.name, None)
        if f.name == "vocab_size" and isinstance(v, int):
            found.add(v)
        found |= _vocab_sizes(v)
    return found


def _check_vocab(model: nn.Module, tokenizer, where: str) -> None:
    """A tokenizer whose ids the model's embedding does not cover would index out of range or
    read the wrong rows, so a mismatched pair is refused on save and on load."""
    sizes, n = _vocab_sizes(getattr(model, "config", None)), getattr(tokenizer, "vocab_size", None)
    if sizes and isinstance(n, int) and n not in sizes:
        raise ValueError(f"{where}: the tokenizer has vocab_size {n} but the {type(model).__name__} config has "
                         f"vocab_size {sorted(sizes)}; save the tokenizer the model was trained with")


def save_model(model: nn.Module, path: str | Path, tokenizer=None) -> None:
    """Write `path/` = config.json + model.safetensors (+ tokenizer.json), atomically.

    The tokenizer is `tokenizer`, else `model.tokenizer` when the model carries one: the ids a model
    was trained on mean nothing without it, so both land in the folder in one atomic step. `path`
    may be new, empty, or an earlier minivl checkpoint; any other folder is refused (see `atomic_dir`).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None and not callable(getattr(tokenizer, "save", None)):
        raise TypeError(f"tokenizer must have a save(path) method, got {type(tokenizer).__name__}")
    if tokenizer is not None:
        _check_vocab(model, tokenizer, f"cannot save {path}")
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)


def read_json(file: str | Path):
    """JSON from `file`, or a ValueError naming the file when it is not JSON (a damaged checkpoint)."""
    file = Path(file)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the file is damaged; save the checkpoint again") from e


def read_tensors(file: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors `file`; a truncated or corrupt file, or NaN/inf values, raise a
    ValueError naming the file (and the tensors), not an error from inside safetensors."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"no {file.name} in {file.parent}: the checkpoint is incomplete")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # SafetensorError and friends: the message names neither file nor cure
        raise ValueError(f"{file} is truncated or corrupt ({type(e).__name__}: {e}); save the checkpoint again") from e
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # a diverged run's weights would load and then answer garbage, silently
        raise ValueError(f"{file} has non-finite (NaN/inf) values in {len(bad)} tensor(s): {', '.join(bad[:10])}"
                         + (" ..." if len(bad) > 10 else ""))
    return tensors


def load_model(path: str | Path, cls: type | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from `path/config.json` and fill it from `path/model.safetensors`.

    A folder a kill left mid-swap is restored first (`resolve`). A damaged or foreign checkpoint
    raises ValueError/TypeError naming the file and what is wrong with it."""
    path = resolve(path)
    file = path / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {path}: not a minivl checkpoint folder")
    meta = read_json(file)
    if not isinstance(meta, dict) or not isinstance(meta.get("class"), str) or not isinstance(meta.get("config"), dict):
        raise ValueError(  # noqa: TRY004 - bad content of a file, not a bad argument
            f"{file} is not a minivl model config: expected a JSON object with a \"class\" name "
            f"and a \"config\" object, got {str(meta)[:120]}")
    name = meta["class"]
    if cls is None:
        if name not in MODELS:
            raise ValueError(f"{file}: checkpoint holds a {name!r}, which is not registered (known: {sorted(MODELS)}); "
                             "import the module defining it first, or pass cls=")
        cls = MODELS[name]
    elif getattr(cls, "checkpoint_name", cls.__name__) != name:
        raise ValueError(f"checkpoint {path} holds a {name!r}, not a {cls.__name__!r}")
    try:
        config = config_from_dict(_config_class(cls), meta["config"])
    except (TypeError, ValueError) as e:  # same type, with the file named
        raise type(e)(f"{file}: {e}") from e
    try:
        model = cls(config)
    except Exception as e:  # a config that parses but cannot build (e.g. heads not dividing width)
        raise ValueError(f"{file}: cannot build a {name} from this config ({type(e).__name__}: {e})") from e
    load_state_dict_checked(model, read_tensors(path / WEIGHTS))
    if (path / TOKENIZER).is_file():  # the tokenizer saved with the weights travels with the model
        from minivl.tokenizer import Tokenizer
        try:
            tokenizer = Tokenizer.load(path / TOKENIZER)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path / TOKENIZER} is not a readable minivl tokenizer ({type(e).__name__}: {e})") from e
        _check_vocab(model, tokenizer, f"{path / TOKENIZER} does not belong to this checkpoint")
        model.tokenizer = tokenizer
    return model.to(map_location)


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
    """Inverse of `save_state` (tensors come back on the CPU); a damaged file raises ValueError naming it."""
    tensors = read_tensors(Path(folder) / f"{name}.safetensors")

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

    file = Path(folder) / f"{name}.json"
    try:
        return dec(read_json(file))
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # valid JSON, but not what save_state wrote
        raise ValueError(f"{file} is not a minivl state file ({type(e).__name__}: {e})") from e


__all__ = ["Checkpointable", "register_model", "MODELS", "CONFIG", "WEIGHTS", "TOKENIZER", "checkpoints_dir", "save_model", "load_model", "load_state_dict_checked",
           "config_from_dict", "write_model_files", "atomic_dir", "write_json", "save_state", "load_state", "resolve",
           "read_json", "read_tensors", "CHECKPOINT_FILES"]
