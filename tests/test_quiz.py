"""Quiz mode: the interview questions are read from the notebooks, asked in turn, answered on request."""
import json

import pytest

from minivl import quiz
from minivl.__main__ import main as cli


def test_every_notebook_has_numbered_questions_with_answers():
    qs = quiz.questions()
    by_notebook = {}
    for q in qs:
        by_notebook.setdefault(q.notebook, []).append(q)
    assert len(by_notebook) >= 9, sorted(by_notebook)  # 00-08
    for name, items in by_notebook.items():
        assert len(items) >= 3, name
        assert [q.number for q in items] == list(range(1, len(items) + 1)), name  # numbered 1..n, none lost
        for q in items:
            assert q.question.strip() and len(q.answer) > 40, (name, q.number)
            assert "<details>" not in q.answer and "</summary>" not in q.answer


def test_notebook_08_has_a_demo_cell_under_every_question():
    qs = quiz.questions(only=["08"])
    assert len(qs) >= 12
    assert all(q.demo and q.demo.strip() for q in qs), [q.number for q in qs if not q.demo]


def _notebook(tmp_path, name, *markdowns):
    cells = [{"cell_type": "markdown", "metadata": {}, "source": m} for m in markdowns]
    (tmp_path / name).write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


def test_parsing_a_made_notebook(tmp_path):
    _notebook(tmp_path, "01_a.ipynb",
              "## Interview questions\n\n1. **Why x?**\n   <details><summary>Answer</summary>\n\n"
              "   Because of [§2](#two), see\n   the cell.\n   </details>\n2. **And y?**\n"
              "   <details><summary>Answer</summary>\n   Also.\n   </details>\n")
    qs = quiz.questions(tmp_path)
    assert [(q.number, q.question) for q in qs] == [(1, "Why x?"), (2, "And y?")]
    assert qs[0].answer == "Because of §2, see\nthe cell."  # de-indented, in-notebook link kept as its text
    assert qs[0].demo is None
    text = quiz.handout(qs)
    assert "Why x?" in text and "Because" not in text  # the handout hides the answers
    assert "Because of §2" in quiz.handout(qs, answers=True)
    with pytest.raises(ValueError, match="no notebook numbered"):
        quiz.questions(tmp_path, only=["07"])
    with pytest.raises(FileNotFoundError):
        quiz.questions(tmp_path / "nowhere")


def test_quiz_asks_in_turn_and_reveals_on_request(capsys):
    q = quiz.Quiz.load(only=["03"])
    with pytest.raises(ValueError, match="ask"):
        q.reveal()  # nothing asked yet
    first = q.ask()
    shown = capsys.readouterr().out
    assert first.question in shown and first.answer not in shown
    assert q.reveal() == first.answer
    assert first.answer in capsys.readouterr().out
    second = q.ask()
    assert second.number == 2
    a = [x.label for x in quiz.Quiz.load(shuffle=True, seed=3).questions]
    b = [x.label for x in quiz.Quiz.load(shuffle=True, seed=3).questions]
    assert a == b and a != [x.label for x in quiz.questions()]  # shuffled, reproducibly
    with pytest.raises(ValueError, match="n must be"):
        quiz.Quiz.load(n=0)


def test_terminal_quiz_scores_and_names_notebooks_to_revisit():
    qs = quiz.questions(only=["01", "02"])[:3]
    replies = iter(["", "y", "", "n", "q"])
    lines = []
    score = quiz.run(qs, read=lambda prompt: next(replies), write=lines.append)
    assert score["asked"] == 2 and score["had"] == 1 and score["missed"] == [qs[1].label]
    text = "\n".join(lines)
    assert qs[0].answer.splitlines()[0] in text and "score: 1/2" in text
    assert f"{qs[1].notebook}.ipynb" in text


def test_cli_handout(tmp_path, capsys):
    out = tmp_path / "handout.md"
    assert cli(["quiz", "--list", "--only", "03", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## 03_clip" in text and "1. **" in text and "<details>" not in text
    assert cli(["quiz", "--only", "99"]) == 2
    assert "no notebook numbered" in capsys.readouterr().err
