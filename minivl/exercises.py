"""Student versions of the notebooks: each solution block becomes a stub with its hint.

    python -m minivl exercises [--out DIR]       (default data/exercises/)

A notebook is the one source of an exercise and its solution. In a code cell, the solution sits
between two marker lines, as nbgrader marks them:

    def attention(q, k, v, mask):
        ### BEGIN SOLUTION
        ### HINT: scores = q @ k^T / sqrt(d); masked scores -> -inf; softmax over the keys
        scores = ...
        ### END SOLUTION

The student version keeps everything else and replaces the block, at its indentation, with

        # YOUR CODE HERE (hint: scores = q @ k^T / sqrt(d); ...)
        raise NotImplementedError("exercise 01.2: scores = q @ k^T / sqrt(d); ...")

so the check cell that follows (`minivl.checks.attention(attention)`) stops with the hint until
the student writes the code. A markdown cell's block becomes "YOUR ANSWER HERE". Outputs are
cleared, and the same notebooks give byte-identical student files every time.
"""
from __future__ import annotations

import re
from pathlib import Path

import minivl

BEGIN, END, HINT = "### BEGIN SOLUTION", "### END SOLUTION", "### HINT:"
_LINE = re.compile(r"^(\s*)(### (?:BEGIN|END) SOLUTION|### HINT:)(.*)$")


def stub_source(source: str, where: str, counter: list) -> str:
    """The cell source with each solution block replaced by its stub; `counter` numbers the exercises."""
    out, block, indent, hints = [], None, "", []
    for n, line in enumerate(source.split("\n"), 1):
        m = _LINE.match(line)
        marker = m.group(2) if m else None
        if marker == BEGIN:
            if block is not None:
                raise ValueError(f"{where}, line {n}: {BEGIN} inside another solution block (missing {END}?)")
            block, indent, hints = n, m.group(1), []
        elif marker == END:
            if block is None:
                raise ValueError(f"{where}, line {n}: {END} without a {BEGIN}")
            counter[0] += 1
            hint = " ".join(hints) or "see the text above this cell"
            out.append(f"{indent}# YOUR CODE HERE (hint: {hint})")
            out.append(f"{indent}raise NotImplementedError({f'exercise {counter[1]}.{counter[0]}: {hint}'!r})")
            block = None
        elif block is not None:
            if marker == HINT:
                hints.append(m.group(3).strip())
        else:
            out.append(line)
    if block is not None:
        raise ValueError(f"{where}, line {block}: {BEGIN} without an {END}")
    return "\n".join(out)


def student_notebook(nb, name: str):
    """A copy of notebook `nb` (nbformat) with stubs for its solutions and no outputs -> (notebook, exercises)."""
    import copy
    nb = copy.deepcopy(nb)
    counter = [0, name.split("_")[0]]
    for i, cell in enumerate(nb.cells):
        src = cell.source
        if BEGIN not in src and END not in src:
            continue
        if cell.cell_type == "code":
            cell.source = stub_source(src, f"{name} cell {i}", counter)
        else:
            cell.source = re.sub(rf"{re.escape(BEGIN)}.*?{re.escape(END)}", "*YOUR ANSWER HERE*", src, flags=re.S)
            counter[0] += 1
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb, counter[0]


def write_exercises(out=None, notebooks=None) -> dict:
    """Write the student version of every notebook to `out` -> {notebook: number of exercises}."""
    import nbformat
    from minivl.course import notebooks_dir
    out = Path(out) if out else minivl.data_dir() / "exercises"
    out.mkdir(parents=True, exist_ok=True)
    books = notebooks if notebooks is not None else sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    counts = {}
    for path in books:
        nb, n = student_notebook(nbformat.read(path, as_version=4), Path(path).stem)
        nbformat.write(nb, out / Path(path).name)
        counts[Path(path).stem] = n
    return counts


def main(args) -> int:
    counts = write_exercises(args.out)
    out = Path(args.out) if args.out else minivl.data_dir() / "exercises"
    for name, n in counts.items():
        print(f"{name}: {n} exercise{'s' * (n != 1)}")
    print(f"student notebooks: {out}")
    return 0


__all__ = ["stub_source", "student_notebook", "write_exercises", "BEGIN", "END", "HINT"]
