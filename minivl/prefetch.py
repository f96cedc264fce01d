"""Batches drawn ahead in worker processes: `Prefetch(get_batch, start, stop, workers)`.

Shapes World batches are pure functions of their step, made on the CPU (a 128-pixel scene takes
about half a millisecond to draw, so a batch of 512 takes a quarter of a second). On a GPU that is
slower than the update itself and the accelerator idles. `Prefetch` hands the same
`get_batch(step)` to a `torch.utils.data.DataLoader` over the step numbers, so `workers` processes
draw the next batches while the device trains on this one. Because each batch depends only on its
step, the batches are the very ones the main process would have drawn: results and exact resume do
not depend on the number of workers (`TrainConfig.workers`, the gpu presets' `workers`).

The trainer asks for steps in order. A step out of order (an update redone after Ctrl-C, say) is
drawn directly and the workers start again from the step after it.
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Callable

import torch


class _Steps(torch.utils.data.Dataset):
    """Item i is get_batch(start + i): a DataLoader over it draws steps start, start + 1, ..."""

    def __init__(self, get_batch: Callable, start: int, stop: int):
        self.get_batch, self.start, self.stop = get_batch, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int):
        return self.get_batch(self.start + i)


class Prefetch:
    """`Prefetch(get_batch, start, stop, workers)(step)` == `get_batch(step)`, drawn ahead by `workers` processes
    (at most one per core this process may use)."""

    def __init__(self, get_batch: Callable, start: int, stop: int, workers: int, prefetch_factor: int = 4):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(workers, cores)  # more processes than cores only adds switching
        self.get_batch, self.stop, self.workers, self.prefetch_factor = get_batch, stop, workers, prefetch_factor
        self._it, self._next = None, None
        self._restart(start)

    def _restart(self, start: int) -> None:
        # fork where the platform has it: get_batch is often a closure, which spawn cannot pickle
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        # the loader's own generator, not the global RNG: a restart mid-run must not move the dropout masks of the
        # steps after it (the batches use their own RNGs)
        loader = torch.utils.data.DataLoader(_Steps(self.get_batch, start, self.stop), batch_size=None,
                                             shuffle=False, num_workers=self.workers,
                                             prefetch_factor=self.prefetch_factor, multiprocessing_context=context,
                                             generator=torch.Generator().manual_seed(0))
        self._it, self._next = iter(loader), start

    def __call__(self, step: int):
        if self._it is None or step != self._next or step >= self.stop:  # out of order: draw it here and
            # restart the workers from the step after it
            self.close()
            batch = self.get_batch(step)
            if step + 1 < self.stop:
                self._restart(step + 1)
            return batch
        self._next += 1
        return next(self._it)

    def close(self) -> None:
        """Stop the workers (also done when the object is collected)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
