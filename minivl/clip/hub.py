"""OpenAI's CLIP weights in minivl's CLIP: the model names, the download, the `transformers` folder port.

OpenAI released the ViT CLIPs of Radford et al. (2021); Hugging Face hosts them as `transformers`
checkpoints (`openai/clip-vit-base-patch32`, ...) with safetensors weights. `fetch("ViT-B/32")`
gets config.json + model.safetensors through `huggingface_hub` (cached the usual way, in
~/.cache/huggingface, so a second call needs no network), and `from_transformers_folder` reads any
such folder - downloaded, or written by `CLIPModel.save_pretrained` - into `OpenAICLIP`, renaming
the tensors with `minivl.clip.convert`. Only safetensors are read: a pickled `.bin`/`.pt` from the
internet could run code when unpickled, so it is refused, never opened. `transformers` itself is
not needed: config.json is read as JSON.

`OpenAICLIP` is minivl's `CLIP` with one difference: it reads OpenAI's BPE
(`minivl.clip.openai_bpe`). OpenAI pads with id 0, which is also the token "!", so a
padding mask cannot come from a pad id; a text ends at its first <end_of_text> instead (where
OpenAI's model pools, `argmax` of the ids). Ids without OpenAI's <start_of_text> frame (say,
Shapes World ids) are refused: a mismatched tokenizer would give silently wrong embeddings.

The one idea to take away: "loading OpenAI's CLIP" is three small things - a name -> files
lookup, a tensor renaming table, and the tokenizer and image transform the weights were trained
with. The network is the same from-scratch one the course trains.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import torch

from minivl import validate
from minivl.checkpoint import atomic_dir, load_state_dict_checked, read_json, read_tensors, write_model_files
from minivl.clip.convert import config_from_hf, state_dict_from_hf
from minivl.clip.model import CLIP
from minivl.clip.openai_bpe import OpenAITokenizer, openai_tokenizer
from minivl.text import check_tokens

# OpenAI's names (as `clip.available_models()` spells them) -> the Hugging Face repository of their weights.
# OpenAI's ResNet CLIPs (RN50, ...) are left out: minivl's image tower is a ViT.
OPENAI_MODELS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's per-channel pixel statistics
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")

# `transformers` CLIP config defaults (= ViT-B/32), for config.json files that leave a key out
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TOP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)


class OpenAICLIP(CLIP):
    """minivl's CLIP reading OpenAI's BPE: bare (B, T) ids end at their first <end_of_text>."""

    def __init__(self, config) -> None:
        super().__init__(config)
        if config.text.vocab_size != OpenAITokenizer.vocab_size:
            raise ValueError(f"OpenAICLIP reads OpenAI's BPE ({OpenAITokenizer.vocab_size} ids); the config's text "
                             f"tower has vocab_size {config.text.vocab_size}")
        self.tokenizer = openai_tokenizer()  # `model.tokenize(texts)` uses it; merges are read on first use

    def _text_inputs(self, text) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(text, dict) and text.get("attention_mask") is not None:
            ids, mask = super()._text_inputs(text)
            self._check_openai_ids(ids)
            return ids, mask
        ids = text.get("input_ids") if isinstance(text, dict) else text
        if ids is None:
            raise ValueError(f"a text dict needs 'input_ids' (and 'attention_mask'), got keys {sorted(text)}")
        if not isinstance(ids, (torch.Tensor, np.ndarray)):
            raise TypeError(f"text must be a (B, T) LongTensor or a dict with input_ids, got {type(ids).__name__}")
        c = self.config.text
        ids, _ = check_tokens(ids, c.vocab_size, c.context_length)
        self._check_openai_ids(ids)
        eot = ids == OpenAITokenizer.eot_id  # (B, T)
        first = eot.int().argmax(dim=1, keepdim=True)  # (B, 1) OpenAI's pooling position
        mask = (torch.arange(ids.shape[1], device=ids.device) <= first).long()  # (B, T), 1 up to the first eot
        return ids, mask

    @staticmethod
    def _check_openai_ids(ids: torch.Tensor) -> None:
        if not validate.on_cpu(ids):  # values are checked where data enters; a device read would sync
            return
        bad_start = (ids[:, 0] != OpenAITokenizer.sot_id).nonzero().flatten().tolist()
        no_end = (~(ids == OpenAITokenizer.eot_id).any(dim=1)).nonzero().flatten().tolist()
        if bad_start or no_end:
            row = (bad_start or no_end)[0]
            raise ValueError(
                f"text ids row {row} is not OpenAI BPE output (it must start with <start_of_text> = "
                f"{OpenAITokenizer.sot_id} and hold <end_of_text> = {OpenAITokenizer.eot_id}; got "
                f"{ids[row, :6].tolist()}...): this model reads OpenAI's vocabulary, not Shapes World's. "
                "Tokenize with model.tokenize(texts) or clip.tokenize(texts, model=model)")

    def save(self, path, tokenizer=None) -> None:
        """config.json + model.safetensors; no tokenizer file: OpenAI's BPE is package data, named by the class."""
        if tokenizer is not None and not isinstance(tokenizer, OpenAITokenizer):
            raise ValueError(f"an OpenAICLIP reads OpenAI's BPE only; cannot save it with a {type(tokenizer).__name__}")
        with atomic_dir(path) as tmp:
            write_model_files(self, tmp)


# ---------------------------------------------------------------- a transformers folder -> OpenAICLIP
def is_transformers_folder(meta) -> bool:
    """Whether a parsed config.json is a `transformers` CLIPModel's (not a minivl checkpoint's)."""
    return isinstance(meta, dict) and "class" not in meta and (
        meta.get("model_type") == "clip" or "CLIPModel" in (meta.get("architectures") or []))


def _hf_config(meta: dict, file: Path) -> SimpleNamespace:
    """config.json (a dict) -> the attributes `convert.config_from_hf` reads, with transformers' defaults."""
    try:  # configs written by older transformers also carry *_config_dict, which wins there (as in CLIPConfig)
        text = SimpleNamespace(**{**TEXT_DEFAULTS, **(meta.get("text_config") or {}),
                                  **(meta.get("text_config_dict") or {})})
        vision = SimpleNamespace(**{**VISION_DEFAULTS, **(meta.get("vision_config") or {}),
                                    **(meta.get("vision_config_dict") or {})})
        return SimpleNamespace(**{**TOP_DEFAULTS, **{k: v for k, v in meta.items() if k in TOP_DEFAULTS}},
                               text_config=text, vision_config=vision)
    except TypeError as e:  # text_config not an object
        raise ValueError(f"{file}: not a transformers CLIP config ({e})") from e


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHT_FILE).is_file():
        return [folder / WEIGHT_FILE]
    if (folder / INDEX_FILE).is_file():  # a sharded save_pretrained
        index = read_json(folder / INDEX_FILE)
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise ValueError(f"{folder / INDEX_FILE} names no weight shards: the file is damaged")
        return [folder / s for s in shards]
    pickled = [p for p in PICKLES if (folder / p).is_file()]
    hint = (f" (it holds {', '.join(pickled)}: pickled weights, which minivl never unpickles; re-save them with "
            "CLIPModel.save_pretrained(folder), which writes safetensors)") if pickled else ""
    raise FileNotFoundError(f"no {WEIGHT_FILE} in {folder}{hint}")


def from_transformers_files(config_file: Path, weight_files: list[Path]) -> OpenAICLIP:
    """A `transformers` CLIP config.json + safetensors file(s) -> OpenAICLIP (eval mode, CPU, fp32)."""
    meta = read_json(config_file)
    if not is_transformers_folder(meta):
        raise ValueError(f"{config_file} is not a transformers CLIPModel config (model_type 'clip')")
    hf = _hf_config(meta, config_file)
    if hf.text_config.vocab_size != OpenAITokenizer.vocab_size:
        raise ValueError(f"{config_file}: the text tower has vocab_size {hf.text_config.vocab_size}; minivl knows the "
                         f"tokenizer of OpenAI's CLIPs only ({OpenAITokenizer.vocab_size} ids). Port other ones "
                         "with minivl.clip.convert.from_transformers(CLIPModel.from_pretrained(folder)) and tokenize "
                         "with their own tokenizer")
    try:
        config = config_from_hf(hf)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from e
    tensors = {}
    for file in weight_files:
        tensors.update(read_tensors(file))  # names the file when it is truncated, corrupt or non-finite
    if "logit_scale" in tensors:  # a trained scale (ViT-B/32: ln 100) must not be clamped below itself
        config.logit_scale_max = max(config.logit_scale_max, math.exp(float(tensors["logit_scale"])))
    with torch.device("meta"):  # no random init: every tensor is about to come from the file (ViT-L: 428M)
        model = OpenAICLIP(config)
    model = model.to_empty(device="cpu")
    try:
        load_state_dict_checked(model, {k: v.float() for k, v in state_dict_from_hf(tensors).items()})
    except (KeyError, ValueError) as e:
        raise ValueError(f"{', '.join(str(f) for f in weight_files)}: the weights do not fit {config_file} ({e})") from e
    return model.eval()


def from_transformers_folder(folder: str | Path) -> OpenAICLIP:
    """A folder written by `transformers.CLIPModel.save_pretrained` (or downloaded from the hub) -> OpenAICLIP."""
    folder = Path(folder)
    return from_transformers_files(folder / "config.json", _weight_files(folder))


# ---------------------------------------------------------------- OpenAI names -> files, via huggingface_hub
class NotCached(FileNotFoundError):
    """The file is not in the local cache (and no download was allowed)."""


def _endpoint_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub: offline, huggingface_hub would retry for ~25 s before giving up."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _download(repo_id: str, filename: str, *, cache_dir=None, local_files_only: bool = False,
              force_download: bool = False) -> Path:
    """`huggingface_hub.hf_hub_download` -> the cached file's path; NotCached / ConnectionError otherwise.

    The one function that touches the network (tests replace it with a local copy)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise ConnectionError("downloading OpenAI's weights needs huggingface_hub: pip install huggingface_hub") from e
    if not local_files_only and not _endpoint_reachable():
        raise ConnectionError(f"cannot reach {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}")
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=local_files_only,
                                    force_download=force_download))
    except LocalEntryNotFoundError as e:
        if local_files_only:
            raise NotCached(f"{repo_id}/{filename} is not cached") from e
        raise ConnectionError(str(e)) from e


def _get(name: str, filename: str, cache_dir=None, force: bool = False) -> Path:
    repo = OPENAI_MODELS[name]
    if not force:
        try:
            return _download(repo, filename, cache_dir=cache_dir, local_files_only=True)  # the cache: no network
        except NotCached:
            pass
    try:
        return _download(repo, filename, cache_dir=cache_dir, force_download=force)
    except ConnectionError as e:
        raise ConnectionError(
            f"clip.load({name!r}) needs the network the first time: its weights ({repo} on the Hugging Face hub) "
            f"are not in the local cache and the download failed ({e}). Connect and retry (they are cached "
            "afterwards), or pass a local folder: clip.load('path/to/folder') reads a transformers "
            "CLIPModel.save_pretrained folder or a minivl checkpoint") from e


def fetch(name: str, cache_dir=None, force: bool = False) -> tuple[Path, Path]:
    """OpenAI model `name` -> (config.json, model.safetensors) paths in the hub cache, downloading if needed."""
    if name not in OPENAI_MODELS:
        raise ValueError(f"unknown OpenAI CLIP {name!r}; OpenAI's ViT CLIPs are {list(OPENAI_MODELS)}")
    return _get(name, "config.json", cache_dir, force), _get(name, WEIGHT_FILE, cache_dir, force)


def is_cached(name: str, cache_dir=None) -> bool:
    """Whether OpenAI model `name`'s files are in the local cache (then `load` needs no network)."""
    if name not in OPENAI_MODELS:
        raise ValueError(f"unknown OpenAI CLIP {name!r}; OpenAI's ViT CLIPs are {list(OPENAI_MODELS)}")
    try:
        for filename in ("config.json", WEIGHT_FILE):
            _download(OPENAI_MODELS[name], filename, cache_dir=cache_dir, local_files_only=True)
    except (NotCached, ConnectionError):
        return False
    return True


def load_openai(name: str, cache_dir=None) -> OpenAICLIP:
    """OpenAI's `name` ("ViT-B/32", ...) as an OpenAICLIP on the CPU in eval mode.

    A damaged cached file (a download cut short, a bad disk) is fetched once more; if that fails
    too, or the network is down, the ValueError names the file and how to cure it."""
    config_file, weights = fetch(name, cache_dir)
    try:
        return from_transformers_files(config_file, [weights])
    except ValueError as damaged:
        try:
            config_file, weights = fetch(name, cache_dir, force=True)
        except ConnectionError as e:
            raise ValueError(f"the cached weights of {name!r} are damaged and cannot be fetched again offline: "
                             f"{damaged}. Delete that file (or the folder) and load again with the network "
                             f"on ({e.__cause__ or e})") from damaged
        return from_transformers_files(config_file, [weights])


__all__ = ["OPENAI_MODELS", "OPENAI_MEAN", "OPENAI_STD", "OpenAICLIP", "is_transformers_folder",
           "from_transformers_files", "from_transformers_folder", "fetch", "is_cached", "load_openai", "NotCached"]
