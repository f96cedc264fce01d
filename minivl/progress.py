"""Progress for long loops: a tqdm bar on a terminal, a few plain lines everywhere else.

What it builds: `progress_bar(total, ...)` and `LineProgress`, the plain-line display it falls back
to. `minivl.train.Trainer` shows its steps with it; `minivl.train` re-exports both.

The one idea: a redrawing bar is for a terminal. In a log file, in CI, or in a Jupyter kernel
(ipykernel's streams are no tty), each redraw is kept as text, so a saved notebook would hold
hundreds of progress fragments; a line every 5% (or every minute) tells the same story in ~20.
"""
from __future__ import annotations

import contextlib
import sys
import time

from tqdm import tqdm


def _isatty(stream) -> bool:
    with contextlib.suppress(Exception):  # closed or odd streams: treat as a file
        return bool(stream.isatty())
    return False


class LineProgress:
    """tqdm's interface (update, set_postfix, write, close), printed as one plain line every `every`
    of the total or every `seconds`, whichever comes first, and at the end."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", file=None, every: float = 0.05,
                 seconds: float = 60.0):
        if not 0 < every <= 1 or seconds < 0 or total < 0:
            raise ValueError(f"need total >= 0, 0 < every <= 1, seconds >= 0; got {total}, {every}, {seconds}")
        self.total, self.n, self.initial, self.desc, self.file = total, initial, initial, desc, file or sys.stdout
        self.every, self.seconds, self.postfix = every, seconds, {}
        self._start = self._last = time.perf_counter()
        self._mark, self._printed = self._marks(initial), initial

    def _marks(self, n: int) -> int:  # how many `every` fractions of the total n has passed
        return int(n / self.total / self.every + 1e-9) if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._marks(self.n) > self._mark or time.perf_counter() - self._last >= self.seconds:
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def write(self, s: str) -> None:
        print(s, file=self.file, flush=True)

    def _line(self) -> None:
        now = time.perf_counter()
        rate = (self.n - self.initial) / max(1e-9, now - self._start)
        parts = [f"{self.desc}: " if self.desc else "", f"{self.n}/{self.total}",
                 f" ({100 * self.n / self.total:.0f}%)" if self.total else "",
                 "".join(f" | {k} {v}" for k, v in self.postfix.items()),
                 f" | {rate:.3g} it/s | {tqdm.format_interval(now - self._start)}"]
        self.write("".join(parts))
        self._last, self._mark, self._printed = now, self._marks(self.n), self.n

    def close(self) -> None:
        if self.n != self._printed:
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(total: int, initial: int = 0, desc: str = "", disable: bool = False, file=None,
                 every: float = 0.05, seconds: float = 60.0):
    """A progress display for loops: tqdm when it draws on a terminal; otherwise a `LineProgress`,
    which writes a plain line every 5% or minute to `file` (default stdout, with the trainer's other
    messages) instead of one redraw per step."""
    if disable or _isatty(file if file is not None else sys.stderr):  # tqdm draws on stderr
        return tqdm(total=total, initial=initial, desc=desc, disable=disable, file=file, dynamic_ncols=True)
    return LineProgress(total, initial, desc, file, every, seconds)


__all__ = ["progress_bar", "LineProgress"]
