"""VQA metrics: the standard VQA accuracy over ten annotators, exact match, and per-type breakdown.

Follows the official VQA evaluation (Antol et al., 2015; Goyal et al., 2017, GT-Vision-Lab's
vqaEval.py): answers are normalised, then

    acc(a) = mean over the 10 leave-one-out subsets of 9 annotators of min(1, #matches(a) / 3)

so an answer given by 3 or more of the 9 counts fully, and one given by fewer counts partly.
With m of 10 annotators agreeing: m=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, m>=4 -> 1.0.

The one idea: open-ended answers are ambiguous ("2" vs "two", "red" vs "dark red"), so VQA
scores agreement with humans rather than equality with one string; single-answer data such as
Shapes World ("how many circles?" -> "2") is scored by plain exact match after the same
normalisation.

Normalisation (`normalize_answer`), as the official script: strip newlines/tabs and spaces;
punctuation ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when the answer has it next to a
space or has a digit,digit comma ("1,000"), else replaced by a space; a period not followed by a
digit is deleted ("3." -> "3", "1.5" kept); then lowercase, number words zero..ten (and "none")
become digits, the articles a/an/the are dropped, and contractions missing their apostrophe are
repaired ("dont" -> "don't").
Deviations, on purpose: the official script normalises the prediction fully but the human
answers only for punctuation, and only when they disagree, because VQA's released answers are
already normalised; here both sides get the full normalisation, which gives the same scores on
VQA's data and sane ones on data that is not pre-normalised. The official period regex also
stops after 32 periods; this one does not.
"""
from __future__ import annotations

import re

from minivl.metrics._checks import check_seq

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA = re.compile(r"\d,\d")
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
# Contractions as the official table repairs them; each maps from every spelling that lost some
# apostrophes ("wouldntve", "wouldnt've", "wouldn'tve"). The official keys for I'm / I've /
# I'd've are capitalised and so never match a lowercased word: they are left out here too.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am
mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've
should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll that's there'd there'd've there're
there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've""".split()


def _spellings_without_apostrophes(word: str) -> list[str]:
    parts = word.split("'")
    variants = [parts[0]]
    for part in parts[1:]:  # each apostrophe kept or dropped
        variants = [v + sep + part for v in variants for sep in ("'", "")]
    return [v for v in variants if v != word]


_CONTRACTIONS = {v: w for w in _CONTRACTED for v in _spellings_without_apostrophes(w)}


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (see the module docstring): "Two dogs!" -> "2 dogs"."""
    if not isinstance(answer, str):
        raise TypeError(f"answers must be strings, got {type(answer).__name__}: {answer!r:.60}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    # Punctuation: the decision for each mark looks at the whole original answer.
    out = text
    for p in _PUNCT:
        glued = (p + " " in text) or (" " + p in text) or _DIGIT_COMMA.search(text) is not None
        out = out.replace(p, "" if glued else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _check_lengths(predictions, answers, what: str) -> None:
    # check_seq: a string would be scored character by character, a dict by its keys
    predictions, answers = check_seq(predictions, "predictions"), check_seq(answers, f"{what}s")
    if len(predictions) != len(answers):
        raise ValueError(f"need one {what} per prediction, got {len(predictions)} predictions "
                         f"and {len(answers)} {what}s")
    if len(predictions) == 0:
        raise ValueError("no questions to score (empty predictions)")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise TypeError(f"predictions[{i}] must be an answer string, got {type(p).__name__} {p!r:.40}")


def vqa_scores(predictions: list[str], answers_lists: list[list[str]]) -> list[float]:
    """Per-question VQA accuracy (see the module docstring); annotator lists need >= 2 answers.

    acc = (1/n) * sum_{i=1..n} min(1, #{j != i : answer_j == prediction} / 3)
    """
    _check_lengths(predictions, answers_lists, "annotator answer list")
    scores = []
    for q, (pred, answers) in enumerate(zip(predictions, answers_lists)):
        if not isinstance(answers, (list, tuple)) or len(answers) < 2:
            raise ValueError(f"answers_lists[{q}] must list the annotators' answers (10 in VQA, at "
                             f"least 2 for leave-one-out), got {answers!r:.60}; use exact_match "
                             f"for single-answer data")
        pred = normalize_answer(pred)
        matches = sum(normalize_answer(a) == pred for a in answers)
        # leaving out a matching annotator removes one match; leaving out another removes none
        n = len(answers)
        loo = matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)
        scores.append(loo / n)
    return scores


def vqa_accuracy(predictions: list[str], answers_lists: list[list[str]]) -> float:
    """Mean VQA accuracy in [0, 1] (the official script reports it x100)."""
    scores = vqa_scores(predictions, answers_lists)
    return sum(scores) / len(scores)


def exact_match(predictions: list[str], answers: list[str], normalize: bool = True) -> float:
    """Fraction of predictions equal to the single reference answer (after `normalize_answer`)."""
    _check_lengths(predictions, answers, "answer")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    clean = normalize_answer if normalize else _as_str
    return sum(clean(p) == clean(a) for p, a in zip(predictions, answers)) / len(predictions)


def _as_str(x) -> str:
    if not isinstance(x, str):
        raise TypeError(f"answers must be strings, got {type(x).__name__}")
    return x


def accuracy_by_type(predictions: list[str], answers: list, types: list[str]) -> dict[str, float]:
    """{"overall": ..., type: accuracy, ...} for each question type (e.g. "color", "count").

    answers: one string per question (exact match) or one list of annotator answers per
    question (VQA accuracy). "overall" is the mean over questions, not over types.
    """
    _check_lengths(predictions, types, "question type")
    _check_lengths(predictions, answers, "answer")
    multi = [not isinstance(a, str) for a in answers]
    if any(multi) and not all(multi):
        raise ValueError("answers must be all strings (exact match) or all lists (VQA accuracy)")
    for i, t in enumerate(types):
        if not isinstance(t, str):
            raise TypeError(f"types[{i}] must be a question-type string, got {type(t).__name__} {t!r:.40}")
    if "overall" in types:
        raise ValueError('"overall" is reserved for the total; rename that question type')
    if all(multi):
        scores = vqa_scores(predictions, answers)
    else:
        scores = [float(normalize_answer(p) == normalize_answer(a)) for p, a in zip(predictions, answers)]
    out = {"overall": sum(scores) / len(scores)}
    for t in sorted(set(types)):
        mine = [s for s, ty in zip(scores, types) if ty == t]
        out[t] = sum(mine) / len(mine)
    return out
