"""Atomic files and folders: a crash never leaves half a checkpoint, a save never deletes a user's files.

What it builds: `atomic_dir(path)` (write a folder's files into a temporary sibling, then swap it
into place), `resolve(path)` (repair a folder a kill left mid-swap), `write_json` (one file,
atomically), and `CHECKPOINT_FILES`, the names minivl writes into a checkpoint folder. A folder
holding anything else is the user's, and saving refuses to replace it.

The one idea: a rename is the only step a file system performs all at once, so every change is
prepared beside its target and published by renames; each intermediate state is either the old
version or the new one, whole, and a later save or load can tell which and finish the job.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
# What minivl writes into a checkpoint folder, named once: a folder holding anything else is the
# user's, and saving over it would delete their files.
CHECKPOINT_FILES = frozenset({CONFIG, WEIGHTS, TOKENIZER, "history.json",
                              "train_state.json", "train_state.safetensors"})


def _fsync(path: Path) -> None:  # data on disk before the rename that publishes it
    with contextlib.suppress(OSError):  # directories cannot be opened on some platforms
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _siblings(path: Path, kinds: str = "tmp|new|old") -> list[Path]:
    """minivl's own temporaries of `path`: `.NAME.tmp-XXXXXXXX` (8 characters, as uuid and
    mkdtemp make them) and friends. Anything else beside `path` is not ours and never touched."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({kinds})-[a-z0-9_]{{8}}")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def _unique(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """Write JSON atomically: temp file in the same folder, fsync, then rename over `path`.

    Temp files a killed writer left behind (`.NAME.tmp-*`) are removed first."""
    path = Path(path)
    for stale in _siblings(path, "tmp"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
    tmp = _unique(path, "tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_checkpoint(folder: Path) -> bool:
    cfg = folder / CONFIG
    try:
        meta = json.loads(cfg.read_text()) if cfg.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "class" in meta and "minivl_version" in meta


def _check_replaceable(path: Path) -> None:
    """Refuse to save over anything but nothing, an empty folder, or a minivl checkpoint."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"cannot save a checkpoint to {path}: it is a file or a link, not a folder; choose another path")
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return
    foreign = [n for n in names if n not in CHECKPOINT_FILES]
    if foreign or not _is_checkpoint(path):
        shown = ", ".join(foreign[:8] or names[:8]) + (" ..." if len(foreign or names) > 8 else "")
        why = f"it holds files minivl did not write ({shown})" if foreign else \
            f"it is not a minivl checkpoint (no {CONFIG} with \"class\" and \"minivl_version\"; it holds {shown})"
        raise ValueError(f"refusing to save a checkpoint to {path}: {why}, and saving replaces the whole folder. "
                         "Save to a new or empty folder (e.g. a subfolder), or move those files away first.")


def resolve(path: str | Path) -> Path:
    """`path`, restored first when a kill during a save left it missing.

    A save renames the finished new folder to `.NAME.new-*`, the old checkpoint aside to
    `.NAME.old-*`, the new one to `path`. A kill between those renames leaves no `path` but a whole
    `.new-*` (preferred: it is the newer version) or a whole `.old-*`, which is renamed back. Both
    are complete folders (each got its name by one rename), so the result is one version, never a mix.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        return path
    for kind in ("new", "old"):
        found = sorted(_siblings(path, kind), key=lambda p: p.lstat().st_mtime_ns if p.exists() else 0)
        if found:
            with contextlib.suppress(OSError):  # a concurrent loader or saver restored it first
                os.rename(found[-1], path)
                _fsync(path.parent)
            break
    return path


def _remove(folder: Path, path: Path) -> None:
    """Delete one of our temporaries: renamed to `.tmp-*` first, so a kill halfway through
    `rmtree` leaves a folder `resolve` never takes for a whole checkpoint."""
    doomed = _unique(path, "tmp")
    try:
        os.rename(folder, doomed)
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def _step(where: str) -> None:
    """A seam between the steps of a save: tests/test_checkpoint_kill.py kills the process here."""


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp folder next to `path`; on success it replaces `path`, on error it is removed.

    `path` must be new, empty, or a minivl checkpoint (only `CHECKPOINT_FILES` in it): saving never
    deletes what minivl did not write. Folders cannot be swapped in one rename, so the finished
    folder is renamed to `.NAME.new-*` (now whole), the old one aside, the new one in, and the old
    one deleted; `resolve` (used by `load_model`) repairs a kill between the renames, and the next
    save deletes the temporaries a kill left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    resolve(path)  # a kill mid-swap: bring the checkpoint back before judging or cleaning around it
    _check_replaceable(path)
    for stale in _siblings(path):
        if stale.is_dir() and not stale.is_symlink():
            _remove(stale, path)
    tmp = _unique(path, "tmp")
    os.mkdir(tmp)  # mode 0o777 minus the umask, like any folder (mkdtemp would make it 0o700)
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        new = _unique(path, "new")
        os.rename(tmp, new)
        _fsync(path.parent)
        tmp = new  # removed by `finally` if anything below fails
        _step("new")
        _check_replaceable(path)  # files added while the model was being written are not ours either
        old = _unique(path, "old")
        if path.exists():
            os.rename(path, old)
        _step("aside")
        try:
            os.rename(new, path)
        except FileNotFoundError:  # a loader's `resolve` saw the gap and moved our folder in already
            if new.exists() or not path.exists():
                raise
        _fsync(path.parent)
        _step("swapped")
        if old.exists():
            _remove(old, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["CONFIG", "WEIGHTS", "TOKENIZER", "CHECKPOINT_FILES", "atomic_dir", "resolve", "write_json"]
