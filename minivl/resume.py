"""Exact resume: what lets a stopped run go on as if it never stopped.

What it builds: `StepSampler` (a DataLoader batch sampler whose batch for step s is a pure function
of (seed, s)), `rng_state` / `set_rng_state` (every RNG a step draws from, as checkpointable
values), `StepBoundaries` (Ctrl-C lands only between two steps), and `checkpoint_progress` (how
far a training checkpoint got, read without loading it). `minivl.train.Trainer` uses all of them.

The one idea: a training run's state is weights + optimizer moments + step + the data order + the
RNG streams. Make the data order a function of the step, save the RNG with the weights, and let an
interrupt land only where all of it is consistent: a resumed run is then, bit for bit, the run
that never stopped.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from minivl.checkpoint import load_state
from minivl.distributed import share


class StepSampler:
    """DataLoader batch sampler whose batch for step s depends only on (seed, s): each epoch is
    a fresh permutation seeded by (seed, epoch), so a resumed run starts at any step without
    replaying data. Infinite; the trainer stops it. The last partial batch of an epoch is dropped.
    Under DDP the trainer sets `rank`/`world_size` and each process loads only its contiguous share."""

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, start_step: int = 0):
        if not 1 <= batch_size <= dataset_len:
            raise ValueError(f"need 1 <= batch_size <= dataset_len, got {batch_size} and {dataset_len}")
        self.n, self.batch_size, self.seed, self.start_step = dataset_len, batch_size, seed, start_step
        self.rank, self.world_size = 0, 1

    def indices(self, step: int) -> list[int]:
        """The whole batch of `step`, on every rank."""
        epoch, j = divmod(step, self.n // self.batch_size)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[j * self.batch_size:(j + 1) * self.batch_size].tolist()

    def __iter__(self):
        step = self.start_step
        while True:
            rows = self.indices(step)
            yield rows[share(len(rows), self.world_size, self.rank)]
            step += 1


def rng_state() -> dict:
    """Every RNG a step may draw from (dropout, data augmentation), as checkpointable values."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


class StepBoundaries:
    """Ctrl-C (SIGINT) lands only between steps. While a step runs (`with stop.deferring()`) the handler
    only sets a flag, which `check()` turns into a KeyboardInterrupt once the step is whole: an interrupt
    between optimizer.step() and the step counter would label the checkpoint with the previous step and
    resume would apply that update twice. A second Ctrl-C, or one outside a step (data loading, eval,
    checkpoint writing: nothing there is half-applied), raises at once. Installed in the main thread
    only (Python allows no other) and restored on exit."""

    def __init__(self, say: Callable[[str], None]):
        self.requested = self._deferring = False
        self._previous, self._say = None, say

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _handler(self, signum, frame):
        if self._deferring and not self.requested:
            self.requested = True
            self._say("Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again to stop now)")
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferring(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def check(self) -> None:
        if self.requested:
            self.requested = False
            raise KeyboardInterrupt


def checkpoint_progress(path: str | Path) -> tuple[int, int] | None:
    """(step, steps) of the training checkpoint folder `path`: how far it got and its run's total, read
    from train_state.json alone (no tensors loaded); None when `path` holds no training checkpoint."""
    file = Path(path) / "train_state.json"
    if not file.is_file():
        return None
    try:  # save_state's encoding of a dict, read without the optimizer's tensors
        items = dict(json.loads(file.read_text())["__items__"])
        config = dict(items["config"]["__items__"]) if "config" in items else {}
    except (KeyError, TypeError, ValueError):  # another encoding: load it all
        items = load_state(path, "train_state")
        config = items.get("config", {})
    return items["step"], config.get("steps", items["step"])


__all__ = ["StepSampler", "rng_state", "set_rng_state", "StepBoundaries", "checkpoint_progress"]
