"""Quiz mode: the course's interview questions, one at a time, each answer shown only when asked for.

    python -m minivl quiz                        every notebook's questions, in course order
    python -m minivl quiz --only 03 08 --shuffle --seed 1 --n 5
    python -m minivl quiz --list [--answers]     a handout: the questions (and the answer key)

Every notebook ends with interview questions written as a numbered item with a bold question and a
collapsed answer (`<details><summary>Answer</summary> ... </details>`); notebook 08 follows each
one with the cell that demonstrates it. This module reads them from the notebooks themselves, so
the quiz can never drift from the course. In the terminal it asks a question, waits for Enter,
shows the answer (and where the course demonstrates it), asks whether you had it, and ends with a
score and the notebooks to go back to. In a notebook:

    q = Quiz.load(only=["08"]); q.ask()   # the next question
    q.reveal()                            # its answer, rendered

The one idea to take away: an answer you can only recognise is not an answer you can give;
say yours before you look.
"""
from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# one item: "3. **question**" (indented or not), then its collapsed answer
ITEM = re.compile(r"^[ \t]*(\d+)\.[ \t]+\*\*(.+?)\*\*(.*?)<details>\s*<summary>\s*(?i:answer)\s*</summary>(.*?)</details>",
                  re.S | re.M)
LINK = re.compile(r"\[([^\]]+)\]\(#[^)]*\)")  # a link to a section of the same notebook: keep its text


@dataclass(frozen=True)
class Question:
    notebook: str  # the notebook's file stem, e.g. "03_clip"
    number: int  # the question's number in that notebook
    question: str
    answer: str  # markdown, without the <details> wrapping
    demo: str | None = None  # the code of the cell that demonstrates the answer (notebook 08), if any

    @property
    def label(self) -> str:
        return f"{self.notebook[:2]} · Q{self.number}"


def _clean(text: str) -> str:
    """The answer's markdown, de-indented (it sits inside a list item) and with in-notebook links as text."""
    lines = text.strip("\n").splitlines()
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return LINK.sub(r"\1", "\n".join(x[indent:] for x in lines).strip())


def notebook_questions(path) -> list[Question]:
    """The interview questions of one notebook (.ipynb), in order."""
    path = Path(path)
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable notebook: {e}") from None
    out = []
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "markdown":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        nxt = cells[i + 1] if i + 1 < len(cells) else None
        demo = None
        if nxt is not None and nxt.get("cell_type") == "code":
            demo = "".join(nxt["source"]) if isinstance(nxt["source"], list) else nxt["source"]
        items = list(ITEM.finditer(source))
        for m in items:
            # a demo cell belongs to a question only where the question has a cell of its own (as in 08)
            out.append(Question(path.stem, int(m.group(1)), " ".join(m.group(2).split()), _clean(m.group(4)),
                                demo if len(items) == 1 else None))
    return out


def questions(folder=None, only=None) -> list[Question]:
    """Every notebook's interview questions, in course order; only=["03", "08"] keeps those notebooks."""
    folder = Path(folder) if folder is not None else NOTEBOOKS
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no course notebooks (NN_name.ipynb) in {folder}")
    if only is not None:
        only = [str(n).zfill(2) for n in only]
        unknown = sorted(set(only) - {p.name[:2] for p in paths})
        if unknown:
            raise ValueError(f"no notebook numbered {unknown} in {folder}; there are {[p.name[:2] for p in paths]}")
        paths = [p for p in paths if p.name[:2] in only]
    return [q for p in paths for q in notebook_questions(p)]


def handout(qs: list[Question], answers: bool = False) -> str:
    """Markdown: the questions by notebook (a handout), with answers the answer key."""
    lines, current = [], None
    for q in qs:
        if q.notebook != current:
            current = q.notebook
            lines += ["", f"## {current}", ""]
        lines.append(f"{q.number}. **{q.question}**")
        if answers:
            lines += ["", *("   " + x if x else "" for x in q.answer.splitlines()), ""]
    return "\n".join(lines).strip() + "\n"


class Quiz:
    """Questions asked in turn; `ask()` shows the next one, `reveal()` its answer."""

    def __init__(self, qs: list[Question], shuffle: bool = False, seed: int = 0, n: int | None = None):
        qs = list(qs)
        if not qs:
            raise ValueError("a quiz needs at least one question, got none")
        if shuffle:
            random.Random(seed).shuffle(qs)
        if n is not None:
            if n < 1:
                raise ValueError(f"n must be >= 1, got {n}")
            qs = qs[:n]
        self.questions = qs
        self.index = -1  # the question last asked

    @classmethod
    def load(cls, folder=None, only=None, **kwargs) -> "Quiz":
        return cls(questions(folder, only), **kwargs)

    @property
    def current(self) -> Question:
        if self.index < 0:
            raise ValueError("no question asked yet: call ask() first")
        return self.questions[self.index]

    def ask(self) -> Question | None:
        """Show the next question (None when all were asked)."""
        if self.index + 1 >= len(self.questions):
            _show("All questions asked.")
            return None
        self.index += 1
        q = self.current
        _show(f"**[{q.label}] ({self.index + 1}/{len(self.questions)})** {q.question}\n\n"
              "Say your answer out loud, then call `reveal()`.")
        return q

    def reveal(self) -> str:
        """Show the current question's answer (and the code that demonstrates it, where there is one)."""
        q = self.current
        text = q.answer
        if q.demo:
            text += f"\n\nDemonstrated by the cell under Q{q.number} in {q.notebook}.ipynb."
        _show(text)
        return q.answer


def _show(markdown: str) -> None:
    """Rendered in Jupyter, plain in a terminal."""
    try:
        from IPython import get_ipython
        if get_ipython() is not None:
            from IPython.display import Markdown, display
            display(Markdown(markdown))
            return
    except ImportError:
        pass
    print(markdown)


def run(qs: list[Question], read=input, write=print) -> dict:
    """The terminal quiz: Enter reveals, then y/n scores; q quits. Returns the score."""
    had, missed = [], []
    write(f"{len(qs)} questions. Answer each one aloud before you press Enter; q quits.\n")
    for k, q in enumerate(qs, 1):
        write(f"[{q.label}] ({k}/{len(qs)}) {q.question}")
        try:
            if read("  Enter: show the answer > ").strip().lower() == "q":
                break
            write("\n" + "\n".join("  " + x for x in q.answer.splitlines()) + "\n")
            reply = read("  Did you have it? [y/n/q] > ").strip().lower()
        except EOFError:
            break
        if reply == "q":
            break
        (had if reply.startswith("y") else missed).append(q)
        write("")
    asked = len(had) + len(missed)
    write(f"\nscore: {len(had)}/{asked}")
    if missed:
        write("to go back to: " + ", ".join(sorted({f"{q.notebook}.ipynb" for q in missed})))
    return {"asked": asked, "had": len(had), "missed": [q.label for q in missed]}


def main(args) -> int:
    qs = questions(args.dir, args.only)
    if args.list or args.answers:
        text = handout(qs, answers=args.answers)
        if args.out:
            Path(args.out).write_text(text, encoding="utf-8")
            print(f"wrote {args.out}: {len(qs)} questions{' with answers' if args.answers else ''}")
        else:
            sys.stdout.write(text)
        return 0
    quiz = Quiz(qs, shuffle=args.shuffle, seed=args.seed, n=args.n)
    run(quiz.questions)
    return 0
