"""The course as a whole: checked claims (`expect`) and the course run that measures every notebook.

    python -m minivl course [--fast] [--only 03] [--out DIR] [--dir FOLDER]

runs the notebooks in order (full mode unless --fast), times each one, and writes a report to
data/runs/course/: `report.md` (each notebook's wall time, every claim its prose makes with the
figure the code computed, and its plots) and `report.json`. The run times quoted in the
notebooks' title cells and in the README's course map are the ones this report measured.

A notebook states a figure in prose only where a cell checks it:

    expect(acc, ">=", 0.95, "zero-shot top-1 on seen pairs", fast=0.0)

prints the figure beside the claim and raises `ClaimError` (an AssertionError) with both when it
does not hold. In fast mode (MINIVL_FAST=1, what the tests run: tiny models, a few steps) a claim
about a trained model cannot hold, so `fast=` gives the loosened target checked instead, and
`fast=None` (the default) skips the check and says so. A claim that holds in both modes
(a shape, an identity) passes `fast=target` or `always=True`.

The one idea to take away: a course is an experiment report. A sentence that quotes a number
is a test of that number, run every time the notebook runs.
"""
from __future__ import annotations

import base64
import json
import math
import operator
import os
import re
import time
from pathlib import Path

import minivl

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
       "!=": operator.ne, "in": lambda v, t: t[0] <= v <= t[1]}
LOG_ENV = "MINIVL_COURSE_LOG"  # the course run points this at a JSON-lines file that expect() appends to
NOTEBOOK_ENV = "MINIVL_COURSE_NOTEBOOK"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colours of a kernel's traceback


class ClaimError(AssertionError):
    """A figure the notebook's prose states does not hold."""


def _number(value, what: str):
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expect: {what} must be a real number, got {type(value).__name__} {value!r:.60}")
    return value


def _target(op: str, target):
    if op == "in":
        if not (isinstance(target, (tuple, list)) and len(target) == 2):
            raise TypeError(f"expect: op 'in' needs a (low, high) pair as target, got {target!r:.60}")
        return tuple(_number(t, "each bound") for t in target)
    return _number(target, "target")


def _show(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, tuple):
        return f"[{_show(x[0])}, {_show(x[1])}]"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.4g}"
    return str(x)


def expect(value, op: str, target, claim: str = "", *, fast=None, always: bool = False) -> bool:
    """Check a figure the prose states: `value op target`, e.g. expect(acc, ">=", 0.95, "top-1").

    op: one of >=, <=, >, <, ==, != or "in" (target = (low, high), bounds included); a yes/no
    claim is expect(flag, "==", True, claim). In fast mode
    the check uses `fast` as its target instead (a loosened bound, for tiny models trained a few
    steps), or is skipped when `fast` is left out; `always=True` checks `target` in both modes.
    Returns True when checked and true, False when skipped; raises ClaimError when it fails.
    """
    if op not in OPS:
        raise ValueError(f"expect: op must be one of {list(OPS)}, got {op!r}")
    if not isinstance(claim, str):
        raise TypeError(f"expect: claim must be a str, got {type(claim).__name__}")
    flag = isinstance(value, bool) and isinstance(target, bool) and op in ("==", "!=")
    if not flag:  # a yes/no claim ("the two outputs are identical") compares bools as they are
        value = _number(value, "value")
        target = _target(op, target)
    is_fast = minivl.fast_mode()
    checked = target
    if is_fast and not always:
        checked = None if fast is None else (fast if flag else _target(op, fast))
    if checked is not None and isinstance(value, float) and math.isnan(value):
        raise ClaimError(f"claim failed: {claim or 'figure'}: the figure is NaN")
    record = dict(notebook=os.environ.get(NOTEBOOK_ENV, ""), claim=claim, value=value, op=op, target=target,
                  fast=is_fast, checked=checked, ok=None if checked is None else bool(OPS[op](value, checked)))
    _log(record)
    label = claim or "figure"
    if checked is None:
        print(f"  (fast mode: not checked) {label}: {_show(value)} (full run: {op} {_show(target)})")
        return False
    if not record["ok"]:
        mode = "fast mode, loosened target" if is_fast and checked != target else "full mode"
        raise ClaimError(f"claim failed ({mode}): {label}: got {_show(value)}, expected {op} {_show(checked)}")
    print(f"  ✓ {label}: {_show(value)} {op} {_show(checked)}")
    return True


def _log(record: dict) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- the course run
def notebooks_dir() -> Path:
    folder = Path(minivl.__file__).resolve().parent.parent / "notebooks"
    if not folder.is_dir():
        raise FileNotFoundError(f"no notebooks/ folder beside the minivl package ({folder}): run from a clone "
                                f"of the repository (pip install -e .)")
    return folder


def select(only=None, folder=None) -> list[Path]:
    """The notebooks in course order (of `folder`, default the course's); `only` = numbers or names
    ("03", "03_clip") to keep."""
    folder = Path(folder) if folder else notebooks_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"no notebook folder {folder}")
    books = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        keys = [str(k) for k in only]
        books = [b for b in books if any(b.stem == k or b.stem.split("_")[0] == k.zfill(2) for k in keys)]
        if not books:
            raise ValueError(f"--only {' '.join(keys)} matches no notebook; there are "
                             f"{[b.stem for b in sorted(folder.glob('*.ipynb'))]}")
    return books


def execute(path: Path, fast: bool, log: Path | None = None, timeout: int = 3600):
    """Run one notebook top to bottom in a fresh kernel -> (executed notebook, seconds, error or None)."""
    import nbclient
    import nbformat
    nb = nbformat.read(path, as_version=4)
    env = {"MINIVL_FAST": "1" if fast else "0", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           NOTEBOOK_ENV: path.stem}
    if log is not None:
        env[LOG_ENV] = str(log)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    error, t0 = None, time.perf_counter()
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    except Exception as e:  # CellExecutionError carries the failing cell's traceback
        error = f"{type(e).__name__}: {ANSI.sub('', str(e))[-1500:]}"
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return nb, time.perf_counter() - t0, error


def _plots(nb, folder: Path) -> list[str]:
    files = []
    for i, cell in enumerate(nb.cells):
        for j, out in enumerate(cell.get("outputs", [])):
            png = out.get("data", {}).get("image/png")
            if png:
                name = f"cell{i:02d}_{j}.png"
                (folder / name).write_bytes(base64.b64decode(png))
                files.append(name)
    return files


def run_course(fast: bool = False, only=None, out=None, progress=print, notebooks=None, folder=None) -> dict:
    """Execute the course's notebooks in order (or the given `notebooks` paths); write report.md +
    report.json in `out`; return the report."""
    out = Path(out) if out else minivl.data_dir() / "runs" / ("course-fast" if fast else "course")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in (select(only, folder) if notebooks is None else [Path(p) for p in notebooks]):
        log = out / f"{path.stem}.claims.jsonl"
        log.unlink(missing_ok=True)
        condition = "fast" if fast else ("trains" if needs_training(path) else "loads")
        progress(f"{path.stem}: running ({'fast mode' if fast else 'full mode, ' + condition}) ...")
        before = _checkpoint_names()
        nb, seconds, error = execute(path, fast, log)
        if condition == "loads" and _checkpoint_names() - before:  # it trained one (an ablation's, say) after all
            condition = "trains"
        folder = out / path.stem
        folder.mkdir(exist_ok=True)
        for old in folder.glob("cell*.png"):  # written by an earlier course run
            old.unlink()
        claims = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        row = dict(notebook=path.stem, seconds=round(seconds, 1), condition=condition, error=error, claims=claims,
                   plots=[f"{path.stem}/{p}" for p in _plots(nb, folder)])
        rows.append(row)
        failed = sum(c["ok"] is False for c in claims)
        progress(f"{path.stem}: {seconds:.0f} s, {sum(c['ok'] is True for c in claims)} claims checked"
                 + (f", {failed} failed" if failed else "") + (f"\n  ERROR {error.splitlines()[-1]}" if error else ""))
    report = dict(fast=fast, load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                  cpus=os.cpu_count(), when=time.strftime("%Y-%m-%d %H:%M"), notebooks=rows)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    if not fast:  # the times the title cells quote: one per condition, kept across course runs
        times_file = out / "times.json"
        times = json.loads(times_file.read_text()) if times_file.exists() else {}
        for r in rows:
            if not r["error"]:
                times.setdefault(r["notebook"], {})[r["condition"]] = dict(
                    seconds=r["seconds"], load=report["load_average"], when=report["when"])
        times_file.write_text(json.dumps(times, indent=1))
    progress(f"report: {out / 'report.md'}")
    return report


FAMILY_CALL = re.compile(r"load_or_train\(\s*\\?[\"']([a-z_]+)")  # in the .ipynb JSON text, quotes are escaped


def needs_training(path: Path) -> bool:
    """Does the notebook train (a checkpoint its `load_or_train("family", ...)` loads is missing)?"""
    text = Path(path).read_text()
    families = set(FAMILY_CALL.findall(text))
    return any(not (minivl.data_dir() / "checkpoints" / f"{f}-cpu").exists() for f in families)


def _checkpoint_names() -> set[str]:
    """The checkpoints in data/checkpoints now (a run that adds one has trained, whatever its name)."""
    root = minivl.data_dir() / "checkpoints"
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


TIME_LINE = re.compile(r"^\*\*Run time\*\*.*$", re.M)


def time_line(times: dict) -> str:
    """The title cell's run-time line, from the course run's measured times of one notebook."""
    parts = []
    if "trains" in times:
        parts.append(f"{_duration(times['trains']['seconds'])} when it trains its model (no checkpoint yet)")
    if "loads" in times:
        parts.append(f"{_duration(times['loads']['seconds'])} with the checkpoint in data/checkpoints/"
                     if "trains" in times else _duration(times["loads"]["seconds"]))
    loads = sorted({f"{t['load']:.1f}" for t in times.values()})
    return (f"**Run time** (full mode, 2-core CPU, measured by `python -m minivl course`, load average "
            f"{' / '.join(loads)}): {'; '.join(parts)}. With `MINIVL_FAST=1`: seconds.")


def stamp_times(times_file=None, folder=None) -> list[str]:
    """Write the measured run times into each notebook's title cell (its "**Run time**" line)."""
    import nbformat
    times_file = Path(times_file) if times_file else minivl.data_dir() / "runs" / "course" / "times.json"
    times = json.loads(times_file.read_text())
    stamped = []
    for path in select(folder=folder):
        if path.stem not in times:
            continue
        nb = nbformat.read(path, as_version=4)
        title = nb.cells[0]
        line = time_line(times[path.stem])
        if "trains" not in times[path.stem] and FAMILY_CALL.search(path.read_text()):
            line = line.replace(". With `MINIVL_FAST=1`", " with its checkpoints in data/checkpoints/ (without them it "
                                "trains first: the README's *Measured* table has each training time). With `MINIVL_FAST=1`")
        new = TIME_LINE.sub(lambda _: line, title.source) if TIME_LINE.search(title.source) else \
            title.source.rstrip() + "\n\n" + line
        if new != title.source:
            title.source = new
            nbformat.write(nb, path)
            stamped.append(path.stem)
    return stamped


def markdown(report: dict) -> str:
    mode = "fast mode (MINIVL_FAST=1)" if report["fast"] else "full mode"
    lines = [f"# Course run, {mode}", "",
             f"{report['when']}, {report['cpus']} CPUs, load average {report['load_average']:.2f} at the end.", "",
             "| notebook | wall time | ran | claims checked | status |", "|---|---|---|---|---|"]
    for r in report["notebooks"]:
        ok = sum(c["ok"] is True for c in r["claims"])
        bad = sum(c["ok"] is False for c in r["claims"])
        status = "error" if r["error"] else ("claims failed" if bad else "ok")
        lines.append(f"| {r['notebook']} | {r['seconds'] / 60:.1f} min ({r['seconds']:.0f} s) | {r['condition']} | "
                     f"{ok} of {len(r['claims'])} | {status} |")
    for r in report["notebooks"]:
        lines += ["", f"## {r['notebook']}", ""]
        if r["error"]:
            lines += ["```", r["error"][-1200:], "```", ""]
        if r["claims"]:
            lines += ["| claim | figure | target | checked |", "|---|---|---|---|"]
            for c in r["claims"]:
                mark = {True: "yes", False: "**FAILED**", None: "skipped"}[c["ok"]]
                target = c["target"] if c["op"] != "in" else tuple(c["target"])
                lines.append(f"| {c['claim']} | {_show(c['value'])} | {c['op']} {_show(target)} | {mark} |")
        lines += [f"![]({p})" for p in r["plots"]]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    if args.stamp:
        stamped = stamp_times(folder=args.dir)
        print(f"run times written into the title cells of: {', '.join(stamped) or 'none (already up to date)'}")
        return 0
    report = run_course(fast=args.fast, only=args.only, out=args.out, folder=args.dir)
    bad = [r["notebook"] for r in report["notebooks"] if r["error"] or any(c["ok"] is False for c in r["claims"])]
    if bad:
        print(f"failed: {', '.join(bad)}")
    return 1 if bad else 0


__all__ = ["expect", "ClaimError", "run_course", "execute", "select", "markdown"]
