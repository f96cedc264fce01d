"""Benchmarks: `python -m minivl bench {data,vit,clip,metrics}`, each against a reference in the same run.

This module holds the one timing helper they share. It warms up (first calls allocate memory,
pick kernels and fill caches), then times each iteration separately and reports the *median*,
which a busy machine's occasional stall cannot drag the way it drags a mean. When several
candidates are compared they are timed in interleaved rounds (A, B, A, B, ...), so a change of
load on the machine hits all of them alike instead of whichever happened to run last.

The one idea to take away: a speed figure means something only next to a reference measured
the same way, on the same machine, at the same moment. Thread count is left at torch's default.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device | str | None) -> None:
    # CUDA runs asynchronously: without a sync the clock stops before the work is done
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    elif device is not None and torch.device(device).type == "mps":
        torch.mps.synchronize()


def time_many(fns: dict[str, Callable[[], object]], *, items: int = 1, warmup: int = 3, iters: int = 10,
              device: torch.device | str | None = None) -> dict[str, dict]:
    """Time each no-argument callable `iters` times in interleaved rounds, after `warmup` calls each.

    `items` is what one call processes (e.g. the batch size). Returns, per name,
    dict(median_s, items_per_s (median-based), times (seconds per call)).
    """
    if not fns:
        raise ValueError("time_many needs at least one function to time")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"{name!r} must be callable, got {type(fn).__name__}")
    if not isinstance(iters, int) or iters < 1 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters!r}, warmup={warmup!r}")
    if not isinstance(items, int) or items < 1:
        raise ValueError(f"items must be a positive int, got {items!r}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        results[name] = {"median_s": median, "items_per_s": items / median, "times": ts}
    return results


def time_fn(fn: Callable[[], object], *, items: int = 1, warmup: int = 3, iters: int = 10,
            device: torch.device | str | None = None) -> dict:
    """`time_many` for a single callable: dict(median_s, items_per_s, times)."""
    return time_many({"fn": fn}, items=items, warmup=warmup, iters=iters, device=device)["fn"]


__all__ = ["time_fn", "time_many"]
