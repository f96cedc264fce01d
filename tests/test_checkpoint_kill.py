"""Checkpoints survive SIGKILL: a child process saves two known versions in turn and is killed at
random moments and at each step of the folder swap; after every kill the checkpoint loads and is
exactly one of the two versions, never a mix, and temporaries do not pile up.

The victims are forked by one helper process (from a forkserver) that imported torch but ran no
torch op, so each of the ~40 kills costs milliseconds instead of a fresh interpreter, and no victim
is forked from a process with torch threads running.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import select
import signal
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import minivl.atomic as atomic
from minivl.checkpoint import Checkpointable, load_model, save_model

VERSIONS = (1.0, 2.0)
RANDOM_KILLS, SEED = 30, 0
STEPS = ("new", "aside", "swapped")  # the `minivl.atomic._step` seams: finished folder named, old aside, new in place


@dataclass
class KillTinyConfig:
    value: float = 1.0  # every weight holds this number, so config and weights both say which version
    width: int = 32  # big enough that a save takes a few syscalls, small enough to be quick


class KillTiny(Checkpointable, nn.Module):
    config_class = KillTinyConfig

    def __init__(self, config: KillTinyConfig):
        super().__init__()
        self.config = config
        self.a = nn.Linear(config.width, config.width)
        self.b = nn.Linear(config.width, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(config.value)


def _save_forever(path: str, first: int, kill_at: str | None, started) -> None:
    """Victim: save versions first, other, first, ... into `path` until killed. With `kill_at`, it
    SIGKILLs itself at that step of its second save (the first one makes the 'old' version)."""
    models = [KillTiny(KillTinyConfig(value=v)) for v in VERSIONS]
    saves = [0]
    if kill_at is not None:
        def step(where):
            if where == kill_at and saves[0] == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        atomic._step = step
    started()
    while True:
        save_model(models[(first + saves[0]) % 2], path)
        saves[0] += 1


def _killer(conn) -> None:
    """Helper process: for each (path, first, kill_at, delay) it receives, fork a victim, SIGKILL it
    `delay` s after it is ready (or let it kill itself at `kill_at`), and answer how it ended.
    Forking from here costs ~1 ms; a fresh multiprocessing child costs ~0.3 s under pytest."""
    while (job := conn.recv()) is not None:
        path, first, kill_at, delay = job
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the victim: never returns into this loop
            try:
                os.close(r)
                _save_forever(path, first, kill_at, started=lambda w=w: os.write(w, b"!"))
            finally:
                os._exit(1)
        os.close(w)
        ready = select.select([r], [], [], 20)[0]
        os.close(r)
        if delay is not None and ready:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        deadline, status = time.monotonic() + 20, None
        while status is None and time.monotonic() < deadline:  # bounded: never hang the suite
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else time.sleep(0.002)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        conn.send(status)


def _version(path) -> float:
    """Load the checkpoint; it must be one whole version: config and every weight agree."""
    model = load_model(path)
    v = model.config.value
    assert v in VERSIONS, v
    for name, p in model.named_parameters():
        assert torch.all(p == v), f"{name} is not all {v}: a mix of two saves"
    return v


def _temporaries(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _kill_after(conn, path, delay: float | None, first: int = 0, kill_at: str | None = None) -> None:
    conn.send((str(path), first, kill_at, delay))
    if not conn.poll(30):
        pytest.fail("the killer helper did not answer")
    status = conn.recv()
    assert status is not None, f"victim saving {path} did not stop (kill_at={kill_at})"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or "forkserver" not in multiprocessing.get_all_start_methods(),
                    reason="needs SIGKILL and the forkserver start method (POSIX)")
def test_checkpoint_survives_sigkill_at_random_moments_and_at_every_step(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "minivl.checkpoint", __name__])
    conn, theirs = ctx.Pipe()
    helper = ctx.Process(target=_killer, args=(theirs,), daemon=True)
    helper.start()
    try:
        _kill_loop(conn, tmp_path)
    finally:
        conn.send(None)
        helper.join(timeout=10)
        if helper.is_alive():
            helper.kill()


def _kill_loop(conn, tmp_path) -> None:
    path = tmp_path / "m"
    save_model(KillTiny(KillTinyConfig(value=VERSIONS[0])), path)

    # at each step of the swap, both ways round: exactly the old or exactly the new version
    for step, expect_new in zip(STEPS, (False, True, True)):
        for first in (0, 1):
            _kill_after(conn, path, None, first, kill_at=step)
            old, new = VERSIONS[first], VERSIONS[1 - first]
            assert _version(path) == (new if expect_new else old), step
            assert len(_temporaries(path)) <= 2, _temporaries(path)

    rng, seen, most, mid_save, gaps = random.Random(SEED), [], 0, 0, 0
    for _ in range(RANDOM_KILLS):
        _kill_after(conn, path, rng.uniform(0.0, 0.1), first=rng.randrange(2))
        left, gap = _temporaries(path), not path.exists()  # before loading: what the kill itself left
        seen.append(_version(path))
        most, mid_save, gaps = max(most, len(left)), mid_save + bool(left), gaps + gap
        assert len(left) <= 2, left  # each save cleans what the last kill left: no pile-up
    print(f"\n{RANDOM_KILLS} random kills ({mid_save} mid-save, {gaps} between the renames) + {2 * len(STEPS)} step kills: every one "
          f"loaded as one whole version ({seen.count(1.0)}x v1, {seen.count(2.0)}x v2); "
          f"at most {most} temporaries after a kill")
    assert set(seen) == set(VERSIONS)  # the kills did land at different moments of the save loop

    save_model(KillTiny(KillTinyConfig(value=VERSIONS[0])), path)  # the next save leaves nothing behind
    assert _temporaries(path) == [] and [p.name for p in tmp_path.iterdir()] == ["m"]
    assert _version(path) == VERSIONS[0]
