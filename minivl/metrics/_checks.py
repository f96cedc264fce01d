"""Input checks shared by every metric: where data enters, once.

A metric that gets a bad input must say so (ValueError / TypeError naming the argument), never
answer a number computed from garbage: a NaN similarity, a bool passed as k, or a string
iterated as a list of captions all "work" deep inside torch and give a wrong score.
"""
from __future__ import annotations


import numpy as np
import torch

from minivl import validate


def to_tensor(x, name: str, kind: str = "float") -> torch.Tensor:
    """`x` as a tensor. kind "float": real numbers, finite, ints promoted to float32 (bool and
    complex rejected: True is not a coordinate); "int": integers (not bool, not float); "any":
    converted only, complex still rejected."""
    if isinstance(x, (str, bytes, dict, set)) or x is None:
        raise TypeError(f"{name} must be a tensor, array or list of numbers, got {type(x).__name__}")
    try:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # ragged lists, strings, objects
        raise TypeError(f"{name} must be a tensor, array or (rectangular) list of numbers, "
                        f"got {type(x).__name__} ({str(e).splitlines()[0][:80]})") from None
    if t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if kind == "float":
        if t.dtype == torch.bool:
            raise TypeError(f"{name} must hold numbers, got dtype torch.bool")
        if not t.is_floating_point():
            t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    elif kind == "int":
        t = t.long() if t.numel() == 0 else t  # [] arrives as float32
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    return t


def check_int(x, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """A Python or NumPy int (never a bool: True is not a count) in [lo, hi]: `minivl.validate.integer`."""
    return validate.integer(name, x, lo, hi)


def check_real(x, name: str) -> float:
    """A finite real number (int or float, not bool, not a tensor): `minivl.validate.real`."""
    if isinstance(x, torch.Tensor):  # validate.real takes one-element tensors; a metric's parameter is a number
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r:.40}")
    return validate.real(name, x)


def check_seq(x, name: str) -> list:
    """A list or tuple (or a 1-D array) with one entry per item; never a string, a dict or a
    generator (a string iterates as characters, a dict as its keys: silently wrong items)."""
    if isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 1:
        return x.tolist()
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list (one entry per item), got {type(x).__name__}")
    return list(x)


def check_ks(ks, name: str = "ks", hi: int | None = None) -> tuple:
    """A non-empty list of ints k >= 1 (and <= hi when given)."""
    if isinstance(ks, (np.ndarray, torch.Tensor)) and ks.ndim == 1:
        ks = ks.tolist()
    if isinstance(ks, (bool, str)) or not isinstance(ks, (list, tuple, range)):
        raise TypeError(f"{name} must be a list of ints, e.g. (1, 5), got {type(ks).__name__} {ks!r:.40}")
    for k in ks:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"{name} must be ints, got {type(k).__name__} {k!r:.40} in {ks!r:.60}")
    if not ks or not all(1 <= k <= (hi if hi is not None else k) for k in ks):
        raise ValueError(f"{name} must be ints in [1, {'inf' if hi is None else hi}]"
                         f", got {tuple(ks)}")
    return tuple(int(k) for k in ks)
