"""The course tooling: checked claims, the course run's report, exercise checks and student notebooks."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from minivl import checks
from minivl.checks import CheckError
from minivl.course import ClaimError, expect, markdown, run_course
from minivl.exercises import stub_source, student_notebook, write_exercises

nbformat = pytest.importorskip("nbformat")
pytestmark = pytest.mark.usefixtures("one_thread")
NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# ---------------------------------------------------------------- expect
def test_expect_passes_and_fails_with_the_claim_and_the_figure(monkeypatch, capsys):
    monkeypatch.setenv("MINIVL_FAST", "0")
    assert expect(0.97, ">=", 0.95, "zero-shot top-1") is True
    assert "✓ zero-shot top-1: 0.97 >= 0.95" in capsys.readouterr().out
    with pytest.raises(ClaimError, match=r"zero-shot top-1: got 0.93, expected >= 0.95"):
        expect(0.93, ">=", 0.95, "zero-shot top-1")
    assert expect(torch.tensor(0.5), "in", (0.4, 0.6), "yes-ratio")
    with pytest.raises(ClaimError, match="NaN"):
        expect(float("nan"), "<=", 1, "loss")


def test_expect_in_fast_mode_skips_or_loosens(monkeypatch, capsys):
    monkeypatch.setenv("MINIVL_FAST", "1")
    assert expect(0.10, ">=", 0.95, "accuracy") is False  # skipped, and says so
    assert "not checked" in capsys.readouterr().out
    assert expect(0.10, ">=", 0.95, "accuracy", fast=0.0) is True
    with pytest.raises(ClaimError, match="fast mode"):
        expect(0.10, ">=", 0.95, "accuracy", fast=0.5)
    with pytest.raises(ClaimError):
        expect(3, "==", 4, "shape", always=True)


@pytest.mark.parametrize("args, error", [((1, "=>", 1), ValueError), (("1", ">=", 1), TypeError),
                                         ((1, "in", 1), TypeError), ((True, ">=", 1), TypeError),
                                         ((1, ">=", 1, 5), TypeError)])
def test_expect_bad_input(args, error):
    with pytest.raises(error):
        expect(*args)


def test_expect_logs_for_the_course_report(monkeypatch, tmp_path):
    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv("MINIVL_COURSE_LOG", str(log))
    monkeypatch.setenv("MINIVL_FAST", "0")
    expect(2, "<", 3, "two is small")
    rec = json.loads(log.read_text())
    assert rec["claim"] == "two is small" and rec["ok"] is True and rec["value"] == 2


@pytest.mark.slow
def test_course_run_writes_a_report_with_times_claims_and_plots(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nfrom minivl.course import expect\n"
                                          "plt.plot([0, 1]); plt.show()\nexpect(1.0, '>=', 0.5, 'one is big', fast=0.5)"),
                nbformat.v4.new_code_cell("expect(0.1, '>=', 0.5, 'a false claim', fast=0.5)")]
    path = tmp_path / "99_demo.ipynb"
    nbformat.write(nb, path)
    report = run_course(fast=True, out=tmp_path / "report", notebooks=[path], progress=lambda *_: None)
    (row,) = report["notebooks"]
    assert row["seconds"] > 0 and "ClaimError" in row["error"] and "a false claim" in row["error"]
    assert [c["ok"] for c in row["claims"]] == [True, False]
    assert row["plots"] and (tmp_path / "report" / row["plots"][0]).stat().st_size > 1000
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| 99_demo |" in text and "one is big" in text and "**FAILED**" in text
    assert markdown(report) == text


@pytest.mark.slow
def test_course_run_counts_a_notebook_that_writes_a_checkpoint_as_training(tmp_path, monkeypatch):
    """A notebook whose family checkpoint exists but that trains another one (notebook 04's LM-only ablation)
    is timed as "trains", not as "loads": the title cell must not quote minutes of training as a load time."""
    monkeypatch.setenv("MINIVL_DATA", str(tmp_path / "data"))
    (tmp_path / "data" / "checkpoints" / "clip-cpu").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import minivl\n(minivl.data_dir() / 'checkpoints' / 'clip-cpu-ablation').mkdir()\n"
                                          "# load_or_train('clip', 'cpu') is what the course looks for")]
    path = tmp_path / "98_trains.ipynb"
    nbformat.write(nb, path)
    report = run_course(fast=False, out=tmp_path / "report", notebooks=[path], progress=lambda *_: None)
    (row,) = report["notebooks"]
    assert row["error"] is None and row["condition"] == "trains"
    times = json.loads((tmp_path / "report" / "times.json").read_text())
    assert list(times["98_trains"]) == ["trains"]
    nb.cells = [nbformat.v4.new_code_cell("x = 1  # load_or_train('clip', 'cpu')")]  # writes no checkpoint
    nbformat.write(nb, path)
    report = run_course(fast=False, out=tmp_path / "report", notebooks=[path], progress=lambda *_: None)
    assert report["notebooks"][0]["condition"] == "loads"


# ---------------------------------------------------------------- checks: right passes, wrong fails with its hint
def attention_ok(q, k, v, mask):
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def attention_unscaled(q, k, v, mask):
    return (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(-1) @ v


def attention_unmasked(q, k, v, mask):
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1) @ v


def merge_ok(ids, pair, new):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_overlapping(ids, pair, new):  # replaces overlapping pairs: wrong on "a a a"
    out = []
    for i in range(len(ids)):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new)
        elif not (i > 0 and (ids[i - 1], ids[i]) == tuple(pair)):
            out.append(ids[i])
    return out


def loss_ok(logits, ids, mask):
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)


def loss_unshifted(logits, ids, mask):
    return F.cross_entropy(logits.flatten(0, 1), ids.masked_fill(mask == 0, -100).flatten(), ignore_index=-100)


def clip_ok(img, txt, t):
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / t
    y = torch.arange(len(img))
    return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2


def clip_one_way(img, txt, t):
    return F.cross_entropy(F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / t, torch.arange(len(img)))


def iou_ok(a, b):
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def iou_unclamped(a, b):
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def negatives_ok(sim, positives, g):
    w = sim.softmax(1).masked_fill(positives, 0)
    return torch.multinomial(w, 1, generator=g)[:, 0]


def negatives_argmax(sim, positives, g):
    return sim.masked_fill(positives, float("-inf")).argmax(1)


def negatives_uniform(sim, positives, g):
    return torch.multinomial((~positives).float(), 1, generator=g)[:, 0]


def negatives_unmasked(sim, positives, g):
    return torch.multinomial(sim.softmax(1).masked_fill(torch.eye(len(sim), dtype=torch.bool), 0), 1, generator=g)[:, 0]


def soft_ok(answers, label2id):
    n, out = len(answers), torch.zeros(len(label2id))
    for a, i in label2id.items():
        m = answers.count(a)
        if m:
            out[i] = 1.0 if n == 1 else (m * min(1, (m - 1) / 3) + (n - m) * min(1, m / 3)) / n
    return out


def focal_ok(logits, targets, alpha, gamma):
    p = logits.sigmoid()
    p_t = p * targets + (1 - p) * (1 - targets)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (alpha * targets + (1 - alpha) * (1 - targets)) * (1 - p_t) ** gamma * ce


def match_ok(cost):
    from scipy.optimize import linear_sum_assignment
    return linear_sum_assignment(cost.numpy())


def match_greedy(cost):
    cost, rows, cols = cost.clone(), [], []
    for _ in range(cost.shape[1]):
        r, c = divmod(int(cost.argmin()), cost.shape[1])
        rows.append(r)
        cols.append(c)
        cost[r, :], cost[:, c] = float("inf"), float("inf")
    return rows, cols


def _bias_ok(r, c, g):
    p = torch.tensor([(c + 0.5) / g, (r + 0.5) / g, 1 / g, 1 / g], dtype=torch.float64)
    return torch.log(p + 1e-4) - torch.log1p(-p + 1e-4)


def labels_ok(ids, a, e):
    out, inside = [], False
    for t in ids:
        out.append(t if inside else -100)
        inside = True if t == a else (False if t == e else inside)
    return out


def labels_no_end(ids, a, e):
    return [-100 if t == e else x for t, x in zip(ids, labels_ok(ids, a, e))]


def pixels_ok(b, size):
    H, W = size
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1) * torch.tensor([W, H, W, H], dtype=b.dtype)


CASES = [  # check, a right implementation, [(a wrong one, words its hint must contain)]
    (checks.attention, attention_ok, [(attention_unscaled, "sqrt(d)"), (attention_unmasked, "mask is not applied")]),
    (checks.patch_embed, lambda x, w: rearrange(x, "b c (h p) (v q) -> b (h v) (c p q)", p=4, q=4) @
     w.flatten(1).T, [(lambda x, w: rearrange(x, "b c (h p) (v q) -> b (v h) (c p q)", p=4, q=4) @ w.flatten(1).T,
                       "row by row")]),
    (checks.merge, merge_ok, [(merge_overlapping, "overlap")]),
    (checks.causal_mask, lambda T: torch.ones(T, T, dtype=torch.bool).tril(),
     [(lambda T: torch.ones(T, T, dtype=torch.bool).triu(), "transpose")]),
    (checks.next_token_loss, loss_ok, [(loss_unshifted, "predicts token t + 1")]),
    (checks.contrastive_loss, clip_ok, [(clip_one_way, "both directions")]),
    (checks.zero_shot_classify, lambda i, c: (F.normalize(i, dim=-1) @ F.normalize(c, dim=-1).T).argmax(-1),
     [(lambda i, c: (i @ c.T).argmax(-1), "normalise the class embeddings")]),
    (checks.box_iou, iou_ok, [(iou_unclamped, "clamp")]),
    (checks.to_tensor, lambda im: torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1,
     [(lambda im: torch.from_numpy(im).permute(2, 0, 1).float() / 255, "[0, 1]"),
      (lambda im: torch.from_numpy(im).float() / 127.5 - 1, "channels first")]),
    (checks.hard_negatives, negatives_ok, [(negatives_argmax, "samples"), (negatives_uniform, "softmax"),
                                           (negatives_unmasked, "positive")]),
    (checks.caption_labels, lambda ids, m, P: torch.cat([torch.full_like(ids[:, :P], -100), ids[:, P:].masked_fill(m[:, P:] == 0, -100)], 1),
     [(lambda ids, m, P: ids.masked_fill(m == 0, -100), "first P"), (lambda ids, m, P: torch.cat([torch.full_like(ids[:, :P], -100), ids[:, P:]], 1), "padding")]),
    (checks.soft_scores, soft_ok, [(lambda ans, l2i: torch.tensor([min(1.0, ans.count(a) / 3) for a in l2i]), "leave one out")]),
    (checks.vqa_loss, lambda x, t: F.binary_cross_entropy_with_logits(x, t) * t.shape[-1],
     [(lambda x, t: F.binary_cross_entropy_with_logits(x, t), "number of answers"),
      (lambda x, t: -(t * x.log_softmax(-1)).sum(-1).mean(), "not a softmax")]),
    (checks.focal_loss, focal_ok, [(lambda x, t, a, g: F.binary_cross_entropy_with_logits(x, t, reduction="none"), "plain BCE"),
                                   (lambda x, t, a, g: focal_ok(x, t, 0.5, g) * 2, "alpha")]),
    (checks.match, match_ok, [(match_greedy, "greedy")]),
    (checks.box_bias, _bias_ok, [(lambda r, c, g: _bias_ok(r, c, g).sigmoid(), "logit space"),
                                 (lambda r, c, g: _bias_ok(c, r, g), "row by row")]),
    (checks.pixel_shuffle, lambda x, r: rearrange(x, "b (h a w c) d -> b (h w) (a c d)", h=int(x.shape[1] ** .5) // r, a=r, c=r),
     [(lambda x, r: x.reshape(x.shape[0], x.shape[1] // r ** 2, -1), "plain reshape")]),
    (checks.box_to_pixels, pixels_ok, [(lambda b, s: pixels_ok(b, s[::-1]), "x goes with the width"),
                                       (lambda b, s: pixels_ok(b, s) / torch.tensor([s[1], s[0]] * 2), "scale by the image size"),
                                       (lambda b, s: torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, 2:]], -1) * torch.tensor([s[1], s[0]] * 2), "xywh")]),
    (checks.assistant_labels, labels_ok, [(labels_no_end, "<|end|>"),
                                          (lambda ids, a, e: [t if t not in (a, e) else -100 for t in ids], "ignored")]),
]


@pytest.mark.parametrize("check, right, wrongs", CASES, ids=[c[0].__name__ for c in CASES])
def test_check_passes_right_and_fails_wrong_with_its_hint(check, right, wrongs, capsys):
    check(right)
    assert "✓" in capsys.readouterr().out
    for wrong, words in wrongs:
        with pytest.raises(CheckError, match="Hint") as e:
            check(wrong)
        assert words in str(e.value), str(e.value)

    def stub(*args):
        raise NotImplementedError("exercise 01.1: a hint")
    with pytest.raises(NotImplementedError, match="a hint"):
        check(stub)
    with pytest.raises(TypeError, match="pass your function"):
        check(3)


def test_every_check_is_tested():
    assert {c[0].__name__ for c in CASES} == set(checks.CHECKS)


# ---------------------------------------------------------------- student notebooks
def test_stub_source_replaces_blocks_at_their_indentation():
    src = ("def f(x):\n    ### BEGIN SOLUTION\n    ### HINT: double it\n    return 2 * x\n    ### END SOLUTION\n"
           "print(f)")
    out = stub_source(src, "nb cell 3", counter := [0, "04"])
    assert "return 2 * x" not in out and counter[0] == 1
    assert "    raise NotImplementedError('exercise 04.1: double it')" in out and out.endswith("print(f)")
    ns = {}
    exec(out, ns)
    with pytest.raises(NotImplementedError, match="double it"):
        ns["f"](1)


@pytest.mark.parametrize("src, words", [("### BEGIN SOLUTION\nx = 1", "without an"),
                                        ("x = 1\n### END SOLUTION", "without a"),
                                        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another")])
def test_stub_source_refuses_broken_markers(src, words):
    with pytest.raises(ValueError, match=words):
        stub_source(src, "nb cell 0", [0, "00"])


def _exercise_cells(nb):
    """(exercise cell, the check cell after it) pairs of a notebook."""
    cells = nb.cells
    return [(c.source, cells[i + 1].source) for i, c in enumerate(cells)
            if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source]


SETUP = "import math\nimport torch\nimport torch.nn.functional as F\nfrom einops import rearrange\nfrom minivl import checks\n"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_solutions_pass_their_checks_and_stubs_fail_with_their_hints(path):
    nb = nbformat.read(path, as_version=4)
    pairs = _exercise_cells(nb)
    assert 2 <= len(pairs) <= 4, f"{path.name}: {len(pairs)} exercises (the course gives two to four per notebook)"
    student, n = student_notebook(nb, path.stem)
    assert n == len(pairs)
    for (solution, check), (stub, _) in zip(pairs, _exercise_cells_student(student, nb)):
        assert "checks." in check, f"{path.name}: the cell after an exercise must call a minivl.checks function"
        ns = {}
        exec(SETUP + solution + "\n" + check, ns)  # the solution passes its check
        ns = {}
        with pytest.raises(NotImplementedError, match="exercise"):
            exec(SETUP + stub + "\n" + check, ns)


def _exercise_cells_student(student, original):
    idx = [i for i, c in enumerate(original.cells) if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source]
    return [(student.cells[i].source, student.cells[i + 1].source) for i in idx]


def test_exercises_are_written_the_same_twice(tmp_path):
    a = write_exercises(tmp_path / "a", NOTEBOOKS)
    b = write_exercises(tmp_path / "b", NOTEBOOKS)
    assert a == b and sum(a.values()) >= 2 * len(NOTEBOOKS)
    for p in NOTEBOOKS:
        assert (tmp_path / "a" / p.name).read_bytes() == (tmp_path / "b" / p.name).read_bytes()
        assert "### BEGIN SOLUTION" not in (tmp_path / "a" / p.name).read_text()


def test_measured_times_are_stamped_into_the_title_cell(tmp_path):
    from minivl.course import stamp_times
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 05 · Demo\n\n**Run time**: about 2 minutes (typed by hand)\n\nmore")]
    nbformat.write(nb, tmp_path / "05_demo.ipynb")
    times = {"05_demo": {"trains": dict(seconds=300.0, load=1.5, when="x"), "loads": dict(seconds=12.0, load=1.2, when="y")}}
    (tmp_path / "times.json").write_text(json.dumps(times))
    assert stamp_times(tmp_path / "times.json", tmp_path) == ["05_demo"]
    title = nbformat.read(tmp_path / "05_demo.ipynb", as_version=4).cells[0].source
    assert "5.0 min when it trains" in title and "12 s with the checkpoint" in title and "typed by hand" not in title
    assert title.endswith("more") and stamp_times(tmp_path / "times.json", tmp_path) == []  # idempotent
