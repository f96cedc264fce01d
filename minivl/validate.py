"""Small checks for data entering the public API: one clear error, at the door, instead of a
RuntimeError from deep inside torch or - worse - a silently wrong answer.

Every check names the argument, what was expected and what came, and returns the value in the
form the model wants (a numpy array becomes a tensor, a float a float), so that a caller writes
`x = validate.tensor("images", x, ...)` once where data enters and nothing below checks again.

The one rule to take away: shapes and dtypes are metadata, free to check on any device; values
(ranges, NaN, 0/1 masks) live in device memory, and reading them back from an accelerator is a
host sync that stalls every forward pass. So value checks run on CPU tensors only - where data
enters (tokenizer, collate, Preprocess) and where every CPU run computes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_KINDS = {"float": torch.Tensor.is_floating_point, "int": lambda t: not t.is_floating_point()
          and not t.is_complex() and t.dtype != torch.bool, "bool": lambda t: t.dtype == torch.bool}


def _kind(t: torch.Tensor) -> str:
    for kind, test in _KINDS.items():
        if test(t):
            return kind
    return "complex"


def integer(name: str, v, low: int | None = None, high: int | None = None) -> int:
    """A Python or NumPy int in [low, high] (None: no bound). Bools are rejected: `max_new_tokens=True`
    is a bug, not 1, and `ds[True]` would silently be item 1."""
    bounds = (f" in [{low}, {high}]" if low is not None and high is not None else
              f" >= {low}" if low is not None else f" <= {high}" if high is not None else "")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int{bounds}, got {type(v).__name__} {v!r:.40}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be an int{bounds}, got {v}")
    return int(v)


def positive_int(name: str, v, minimum: int = 1) -> int:
    """An int >= minimum (see `integer`)."""
    return integer(name, v, low=minimum)


def divisor(name: str, v, total: int, of: str = "the batch") -> int:
    """An int >= 1 that divides `total` (memory_groups: rows of a batch that share one memory row)."""
    v = positive_int(name, v)
    if total % v:
        raise ValueError(f"{name} must be an int >= 1 dividing {of} {total}, got {v}")
    return v


def real(name: str, v, low: float | None = None, high: float | None = None, *,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in [low, high] (open ends with low_open/high_open). NaN compares False
    with everything, so `nan <= 0` lets it through a plain range test: it is rejected here first."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def boolean(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")
    return bool(v)


def on_cpu(x: torch.Tensor) -> bool:
    """Whether reading x's values is free (no host sync)."""
    return x.device.type == "cpu"


def tensor(name: str, x, *, shape: tuple | None = None, dims: int | None = None, kind: str | None = None,
           finite: bool = False, low: float | None = None, high: float | None = None,
           nonempty: bool = True, numpy: bool = True, hint: str = "") -> torch.Tensor:
    """x as a tensor, checked. numpy arrays are converted (the natural thing: same memory, no copy)
    unless numpy=False, where an array is a TypeError that says how to convert it (`hint`).

    shape: a pattern with an int where the size is fixed and a letter (or None) where any size
    goes, e.g. ("B", 3, 32, 32); dims: only the number of axes. kind: "float", "int" (bool excluded) or
    "bool". nonempty: no axis of size 0 (an empty batch has no mean, no argmax). finite / low /
    high: value checks, on CPU tensors only (see the module docstring).
    """
    if isinstance(x, np.ndarray) and numpy:
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a numeric array, got numpy dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        want = _pattern(shape) if shape else f"{dims or 'N'}-D"
        raise TypeError(f"{name} must be a torch.Tensor {want}, got {type(x).__module__}.{type(x).__name__}"
                        f"{hint and '; ' + hint}")
    if shape is not None:
        dims = len(shape)
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions {_pattern(shape)}, got shape {tuple(x.shape)}")
    if shape is not None and any(isinstance(s, int) and s != n for s, n in zip(shape, x.shape)):
        raise ValueError(f"{name} must have shape {_pattern(shape)}, got {tuple(x.shape)}")
    if nonempty and x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): expected at least one element per axis")
    if kind is not None and _kind(x) != kind:
        raise TypeError(f"{name} must be a {'integer' if kind == 'int' else kind} tensor, got {x.dtype}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got {x.dtype}")
    if on_cpu(x) and x.numel() and (finite or low is not None or high is not None):
        if finite and x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        if low is None and high is None:
            return x
        lo, hi = x.min(), x.max()
        if (low is not None and lo < low) or (high is not None and hi > high):
            raise ValueError(f"{name} must lie in [{low}, {high}], got values in [{lo.item():.4g}, {hi.item():.4g}]")
    return x


def _pattern(shape) -> str:
    return "" if shape is None else "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def _is_arraylike(x) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


def token_ids(name: str, ids, vocab_size: int, context_length: int | None = None) -> torch.Tensor:
    """A (B, T) integer tensor of ids in [0, vocab_size), T <= context_length, B, T >= 1.
    Bool ids would index the embedding as 0/1: a TypeError, not a lookup."""
    if not _is_arraylike(ids):  # a ValueError, as minivl always raised here: the content is what is wrong
        raise ValueError(f"{name} must be a (B, T) tensor of token ids (e.g. from the tokenizer), "
                         f"got {type(ids).__name__}")
    ids = tensor(name, ids, shape=("B", "T"))
    if _kind(ids) != "int":
        raise TypeError(f"{name} must be integer token ids, got {ids.dtype}")
    ids = ids.long()  # uint8 would index as a mask, int32 is no loss target: one dtype from here on
    if context_length is not None and ids.shape[1] > context_length:
        raise ValueError(f"{name}: text of {ids.shape[1]} tokens exceeds the context length {context_length}")
    if on_cpu(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (the vocabulary), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


def attention_mask(name: str, mask, shape: tuple, *, right_padded: bool = False) -> torch.Tensor:
    """A mask of exactly `shape` (no broadcasting: a batch-1 mask against batch-2 ids is a bug), of
    0/1 only (a 2 would count a position twice in a cumsum), of any real dtype (transformers users pass
    float masks). With right_padded, rows
    like 1 1 1 0 0 with a real token first: where pooling reads "the last real token"."""
    mask = tensor(name, mask, dims=len(shape))
    if mask.is_complex():
        raise TypeError(f"{name} must hold 0/1 as an int, bool or float tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must match the ids' shape {tuple(shape)} exactly, got {tuple(mask.shape)}")
    if not on_cpu(mask):
        return mask
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name} must hold only 0 and 1, got values {sorted(set(mask.unique().tolist()))[:6]}")
    if right_padded:
        m = mask.long()
        if (m[:, 1:] > m[:, :-1]).any():
            raise ValueError(f"{name}: texts must be right-padded (a mask like 1 1 1 0 0); a left-padded "
                             f"row would pool a padding token")
        if not m[:, 0].all():
            raise ValueError(f"{name}: every text needs at least one real token (a row is all zeros)")
    return mask


def vocab_id(name: str, v, vocab_size: int, optional: bool = True):
    """A special-token id (pad/eos/bos): None if optional, else an int in [0, vocab_size)."""
    if v is None and optional:
        return None
    v = positive_int(name, v, minimum=0)
    if v >= vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}) (the vocabulary), got {v}")
    return v


def config_fields(cfg, ints: dict = (), reals: dict = (), strings: tuple = ()) -> None:
    """Type and range checks for a config dataclass: ints {field: minimum}, reals {field: (low, high)}
    (high exclusive when given as a 3-tuple with True), strings: fields that must be str."""
    where = type(cfg).__name__
    for f, minimum in dict(ints).items():
        positive_int(f"{where}.{f}", getattr(cfg, f), minimum)
    for f, bounds in dict(reals).items():
        low, high, *opens = bounds
        low_open, high_open = (opens + [False, False])[:2] if opens else (False, False)
        setattr(cfg, f, real(f"{where}.{f}", getattr(cfg, f), low, high, low_open=low_open, high_open=high_open))
    for f in strings:
        if not isinstance(getattr(cfg, f), str):
            raise TypeError(f"{where}.{f} must be a str, got {type(getattr(cfg, f)).__name__}")
    if hasattr(cfg, "width") and hasattr(cfg, "heads") and cfg.width % cfg.heads:
        raise ValueError(f"{where}.width {cfg.width} must be divisible by heads {cfg.heads}")


__all__ = ["attention_mask", "boolean", "config_fields", "on_cpu", "positive_int", "real", "tensor", "token_ids",
           "vocab_id"]
