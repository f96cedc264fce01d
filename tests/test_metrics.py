"""minivl.metrics: hand-computed values, parity with pycocoevalcap / pycocotools, edge cases.

Parity tests skip when the reference is not installed (CI installs them with `.[reference]`).
"""
import contextlib
import io
import math

import numpy as np
import pytest
import torch

from minivl.metrics import (accuracy_by_type, average_precision, bleu, box_convert, box_iou,
                            cider_d, cider_d_scores, confusion_matrix, exact_match,
                            generalized_box_iou, normalize_answer, referring_accuracy,
                            retrieval_metrics, tokenize_caption, topk_accuracy, vqa_accuracy,
                            vqa_scores)

# ----------------------------------------------------------------------------- retrieval


def test_retrieval_hand_computed_many_to_many():
    # 2 images, 4 texts; text 1 is a repeated caption that describes both images.
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.3],
                        [0.2, 0.4, 0.7, 0.6]])
    pos = torch.tensor([[1, 1, 0, 0],
                        [0, 1, 1, 1]], dtype=torch.bool)
    m = retrieval_metrics(sim, pos, ks=(1, 2))
    # i2t: image 0's best positive is text 0 (0.9), top -> rank 1.
    #      image 1's best positive is text 2 (0.7); the only negative (text 0, 0.2) is lower -> rank 1.
    assert m["i2t_R@1"] == 1.0 and m["i2t_median_rank"] == 1.0 and m["i2t_mean_rank"] == 1.0
    # t2i (columns): text 0 -> image 0 rank 1; text 1 -> both positive, rank 1;
    # text 2 -> positive image 1 (0.7) but negative image 0 has 0.8 -> rank 2; text 3 -> image 1 (0.6 > 0.3) rank 1.
    assert m["t2i_R@1"] == pytest.approx(3 / 4)
    assert m["t2i_R@2"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx((1 + 1 + 2 + 1) / 4)
    assert m["t2i_median_rank"] == 1.0


def test_retrieval_ties_count_against_the_model_and_median_is_mean_of_middle():
    sim = torch.zeros(2, 4)  # a constant (untrained) model
    pos = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    m = retrieval_metrics(sim, pos, ks=(1, 3))
    # i2t: the best positive ties with 2 negatives -> rank 3 (not a lucky 1); t2i: 1 tied negative -> rank 2
    assert m["i2t_R@1"] == 0.0 and m["i2t_mean_rank"] == 3.0 and m["i2t_R@3"] == 1.0
    assert m["t2i_R@1"] == 0.0 and m["t2i_median_rank"] == 2.0
    # sim[i, j] = i: for text j, images i > j outscore the positive image j -> ranks 4, 3, 2, 1
    m = retrieval_metrics(torch.arange(4.0)[:, None].repeat(1, 4), torch.eye(4).bool(), ks=(1,))
    assert m["t2i_median_rank"] == 2.5 and m["t2i_mean_rank"] == 2.5 and m["t2i_R@1"] == 0.25


def test_retrieval_validation():
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="image 1 has no positive"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([[1, 1], [0, 0]]).bool())
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan")]]), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-empty"):
        retrieval_metrics(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool))

# ----------------------------------------------------------------------------- classification


def test_topk_accuracy_and_confusion_matrix_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0],   # target 0: top1 correct
                           [3.0, 2.0, 1.0],   # target 1: 2nd -> top2 only
                           [3.0, 2.0, 1.0],   # target 2: 3rd -> top3 only
                           [1.0, 1.0, 0.0]])  # target 1 tied with class 0: counts against -> top2
    targets = torch.tensor([0, 1, 2, 1])
    acc = topk_accuracy(logits, targets, ks=(1, 2, 3))
    assert acc == {"top1": 1 / 4, "top2": 3 / 4, "top3": 1.0}
    cm = confusion_matrix(logits.argmax(1), targets, 3)
    # argmax: 0, 0, 0, 0 (tie -> first) -> every row predicts class 0
    assert cm.tolist() == [[1, 0, 0], [2, 0, 0], [1, 0, 0]]
    cm = confusion_matrix([0, 2, 1, 1], [0, 1, 1, 2], 3)  # rows = truth, cols = prediction
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 0]] and cm.dtype == torch.long
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]


def test_classification_validation():
    with pytest.raises(ValueError, match=r"ks must be ints in \[1, 3\]"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 1]), ks=(5,))
    with pytest.raises(ValueError, match="length 2"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]), ks=(1,))
    with pytest.raises(ValueError, match="NaN"):
        topk_accuracy(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), ks=(1,))
    with pytest.raises(ValueError, match="preds"):
        confusion_matrix([0, 5], [0, 1], 3)
    with pytest.raises(ValueError, match="length 2"):
        confusion_matrix([0, 1], [0], 3)

# ----------------------------------------------------------------------------- captioning


def test_tokenizer():
    assert tokenize_caption("A red Circle, left of a blue square.") == \
        "a red circle left of a blue square".split()
    assert tokenize_caption("Don't wear a t-shirt!") == ["don't", "wear", "a", "t-shirt"]
    assert tokenize_caption("  ") == []


def test_bleu_by_hand():
    cand = "the cat sat on the mat"
    refs = ["the cat is on the mat", "there is a cat on the mat"]
    b = bleu([cand], [refs])
    # unigrams: the x2 (max ref count 2), cat, sat (0), on, mat -> 5/6
    # bigrams: the cat, cat sat, sat on, on the, the mat -> 3/5; trigrams: only "on the mat" -> 1/4
    # 4-grams: none match -> BLEU-4 = 0. Lengths: c = 6, closest ref 6 -> BP = 1.
    assert b["BLEU-1"] == pytest.approx(5 / 6)
    assert b["BLEU-2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b["BLEU-3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert b["BLEU-4"] == 0.0
    # brevity penalty: c = 2, r = 4 -> exp(1 - 4/2)
    assert bleu(["the cat"], [["the cat sat here"]], n=2)["BLEU-2"] == pytest.approx(math.exp(-1))
    # closest reference length, ties to the shorter: c = 3, refs 2 and 4 -> r = 2 -> BP = 1
    assert bleu(["a b c"], [["a b", "a b c d"]], n=2)["BLEU-2"] == pytest.approx(1.0)
    # corpus BLEU sums counts before dividing: (1 + 0) / (1 + 3), not mean(1/1, 0/3)
    assert bleu(["x", "p q r"], [["x"], ["y"]], n=1)["BLEU-1"] == pytest.approx(1 / 4)
    # pre-tokenized input equals the string input
    assert bleu([cand.split()], [[r.split() for r in refs]]) == b


def test_cider_d_by_hand():
    L = math.log(2)  # two images: idf = log 2 - log df, every word here has df = 1
    # A: perfect unigram match; B: "blue square" vs "green square" shares one of two words.
    s = cider_d_scores(["red circle", "blue square"], [["red circle"], ["green square"]], n=1)
    assert s[0] == pytest.approx(10.0)
    assert s[1] == pytest.approx(10 * (L * L) / (math.sqrt(2) * L * math.sqrt(2) * L))  # 5
    # with n = 4 the tri- and 4-gram cosines are 0 for 2-word captions: (1 + 1 + 0 + 0) / 4
    s4 = cider_d_scores(["red circle", "blue square"], [["red circle"], ["green square"]])
    assert s4 == pytest.approx([10 * 2 / 4, 10 * 0.5 / 4])
    # clipping and the length penalty: cand "red red circle" vs ref "red circle"
    # w_c = (red 2L, circle L), w_r = (L, L): <min(w_c, w_r), w_r> = 2 L^2 (not 3 L^2 unclipped)
    s = cider_d_scores(["red red circle", "blue"], [["red circle"], ["blue"]], n=1)
    assert s[0] == pytest.approx(10 * 2 / (math.sqrt(5) * math.sqrt(2)) * math.exp(-1 / 72))
    # a word in every image's references has idf 0 and counts for nothing
    s = cider_d_scores(["a dog", "a cat"], [["a dog"], ["a bird"]], n=1)
    assert s[1] == 0.0 and s[0] == pytest.approx(10.0)
    assert cider_d(["a dog", "a cat"], [["a dog"], ["a bird"]], n=1) == pytest.approx(5.0)


def test_caption_edge_cases():
    assert bleu([""], [["a red circle"]]) == {f"BLEU-{k}": 0.0 for k in range(1, 5)}
    s = cider_d_scores(["", "red"], [["red circle"], [""]])
    assert s.tolist() == [0.0, 0.0] and np.isfinite(s).all()
    with pytest.raises(ValueError, match="at least 2 images"):
        cider_d(["a"], [["a"]])
    with pytest.raises(ValueError, match="one reference list per candidate"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty corpus"):
        bleu([], [])
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(TypeError):
        bleu([3], [["a"]])


def _random_corpus(rng, n, words, empty=False):
    def sentence(lo):
        return " ".join(rng.choice(words, size=rng.integers(lo, 12)))
    cands = [sentence(0 if empty else 1) for _ in range(n)]
    refs = [[sentence(0 if empty else 1) for _ in range(rng.integers(1, 6))] for _ in range(n)]
    return cands, refs


def test_bleu_and_cider_equal_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    rng = np.random.default_rng(0)
    for trial in range(3):
        cands, refs = _random_corpus(rng, 300, list("abcdefg"), empty=trial == 2)
        gts, res = dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)}
        ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        ours = bleu(cands, refs)
        assert [ours[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx(ref_bleu, rel=1e-9, abs=0)
        ref_cider, ref_per_image = Cider().compute_score(gts, res)
        assert cider_d(cands, refs) == pytest.approx(ref_cider, rel=1e-12)
        np.testing.assert_allclose(cider_d_scores(cands, refs), ref_per_image, rtol=1e-12, atol=1e-15)


def test_bleu_zero_matches_is_zero_where_pycocoevalcap_smooths():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    cands, refs = ["a b c d", "e f g h"], [["a b c x"], ["e f y h"]]  # no 4-gram in common
    ref, _ = Bleu(4).compute_score(dict(enumerate(refs)), {0: [cands[0]], 1: [cands[1]]}, verbose=0)
    ours = bleu(cands, refs)
    assert ours["BLEU-4"] == 0.0 and 0.0 < ref[3] < 1e-2  # the documented deviation
    assert ours["BLEU-3"] == pytest.approx(ref[2], rel=1e-9)

# ----------------------------------------------------------------------------- VQA


def test_vqa_accuracy_leave_one_out_by_hand():
    # m of 10 annotators say "2": mean over leave-one-out of min(1, matches / 3)
    # m=1: 9 subsets keep it (1/3), 1 drops it (0) -> 0.3; m=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    # m=3: (3 * 2/3 + 7 * 1) / 10 = 0.9; m=4: (4 * 1 + 6 * 1) / 10 = 1
    answers = [["2"] * m + ["3"] * (10 - m) for m in range(6)]
    assert vqa_scores(["2"] * 6, answers) == pytest.approx([0, 0.3, 0.6, 0.9, 1.0, 1.0])
    assert vqa_accuracy(["two", "Two."], [answers[3], answers[4]]) == pytest.approx((0.9 + 1.0) / 2)


def test_vqa_accuracy_equals_brute_force_loop():
    rng = np.random.default_rng(0)
    vocab = ["yes", "no", "2", "3", "red"]
    preds = list(rng.choice(vocab, 200))
    answers = [list(rng.choice(vocab, 10, p=[0.4, 0.3, 0.1, 0.1, 0.1])) for _ in range(200)]
    brute = []
    for p, ans in zip(preds, answers):
        subsets = [ans[:i] + ans[i + 1:] for i in range(10)]
        brute.append(sum(min(1.0, sum(a == p for a in s) / 3) for s in subsets) / 10)
    assert vqa_scores(preds, answers) == pytest.approx(brute)


def test_answer_normalisation():
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer(" The  Red\tball. ") == "red ball"
    assert normalize_answer("1,000") == "1000"  # digit,digit comma deleted
    assert normalize_answer("red,blue") == "red blue"  # lone comma becomes a space
    assert normalize_answer("yes, it is") == "yes it is"  # comma next to a space deleted
    assert normalize_answer("3.5") == "3.5" and normalize_answer("3.") == "3"
    assert normalize_answer("dont know") == "don't know" and normalize_answer("none") == "0"
    assert normalize_answer("an apple") == "apple"


def test_exact_match_and_breakdown_by_type():
    preds = ["2", "Red", "circle", "yes"]
    gold = ["two", "red", "square", "yes"]
    types = ["count", "color", "shape", "exist"]
    assert exact_match(preds, gold) == 0.75
    assert exact_match(preds, gold, normalize=False) == 0.25
    out = accuracy_by_type(preds, gold, types)
    assert out == {"overall": 0.75, "color": 1.0, "count": 1.0, "exist": 1.0, "shape": 0.0}
    out = accuracy_by_type(["2", "2"], [["2"] * 10, ["2"] + ["3"] * 9], ["count", "count"])
    assert out == pytest.approx({"overall": 0.65, "count": 0.65})


def test_vqa_validation():
    with pytest.raises(ValueError, match="one annotator answer list per prediction"):
        vqa_accuracy(["a"], [])
    with pytest.raises(ValueError, match="empty"):
        exact_match([], [])
    with pytest.raises(ValueError, match="exact_match"):
        vqa_accuracy(["a"], [["a"]])  # one annotator: leave-one-out would always give 0
    with pytest.raises(ValueError, match="all strings"):
        accuracy_by_type(["a", "b"], ["a", ["b", "b"]], ["x", "y"])
    with pytest.raises(TypeError):
        exact_match([1], ["1"])

# ----------------------------------------------------------------------------- boxes


def test_box_conversions_by_hand_and_round_trip():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    assert box_convert(xyxy, "xyxy", "xywh").tolist() == [[1, 2, 4, 8]]
    assert box_convert(xyxy, "xyxy", "cxcywh").tolist() == [[3, 6, 4, 8]]
    assert box_convert([[3, 6, 4, 8]], "cxcywh", "xywh").tolist() == [[1, 2, 4, 8]]
    boxes = box_convert(torch.rand(2, 7, 4) * 10, "xywh", "xyxy")  # any leading shape
    for fmt in ("xywh", "cxcywh"):
        torch.testing.assert_close(box_convert(box_convert(boxes, "xyxy", fmt), fmt, "xyxy"), boxes)
    with pytest.raises(ValueError, match="x2 >= x1"):
        box_convert([[5, 0, 1, 1]], "xyxy", "xywh")
    with pytest.raises(ValueError, match="width >= 0"):
        box_convert([[0, 0, -1, 1]], "xywh", "xyxy")
    with pytest.raises(ValueError, match="format"):
        box_convert(xyxy, "xyxy", "yxyx")


def test_iou_and_giou_by_hand():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [2, 0, 3, 2], [0, 0, 2, 2], [4, 4, 4, 4]])
    # overlap 1x1 of union 4 + 4 - 1; touching edge; identical; zero-area far away
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 0, 1, 0]]))
    # GIoU: enclosing boxes 3x3=9 (union 7), 3x2=6 (union 6), 2x2, 4x4=16 (union 4)
    torch.testing.assert_close(generalized_box_iou(a, b),
                               torch.tensor([[1 / 7 - 2 / 9, 0, 1, -(16 - 4) / 16]]))
    # disjoint boxes: IoU 0 but GIoU keeps falling as they move apart
    near, far = generalized_box_iou(a, [[3, 0, 5, 2], [10, 0, 12, 2]])[0]
    assert near < 0 and far < near
    # zero-area boxes: the union is empty -> IoU 0 (documented), enclosing area 0 -> GIoU 0
    z = torch.tensor([[1.0, 1, 1, 1]])
    assert box_iou(z, z).item() == 0.0 and generalized_box_iou(z, z).item() == 0.0


def test_iou_giou_properties_on_random_boxes():
    gen = torch.Generator().manual_seed(0)
    a = box_convert(torch.rand(40, 4, generator=gen, dtype=torch.float64) * 20 + 0.1, "xywh", "xyxy")
    b = box_convert(torch.rand(30, 4, generator=gen, dtype=torch.float64) * 20 + 0.1, "xywh", "xyxy")
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    assert iou.shape == (40, 30)
    torch.testing.assert_close(box_iou(b, a), iou.T)  # symmetric
    torch.testing.assert_close(generalized_box_iou(b, a), giou.T)
    torch.testing.assert_close(torch.diagonal(box_iou(a, a)), torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(torch.diagonal(generalized_box_iou(a, a)), torch.ones(40, dtype=torch.float64))
    assert ((iou >= 0) & (iou <= 1)).all() and ((giou > -1) & (giou <= iou + 1e-12)).all()
    assert (giou[iou == 0] < 0).all() and (iou == 0).any()  # disjoint pairs -> GIoU below 0
    # the loop-free result equals a plain per-pair computation
    i, j = 7, 11
    w = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
    h = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    assert iou[i, j].item() == pytest.approx(w * h / (area(a[i]) + area(b[j]) - w * h))


def test_giou_gradient_is_finite_for_degenerate_boxes():
    boxes = torch.tensor([[1.0, 1, 1, 1], [0, 0, 2, 2], [5, 5, 5, 6]], requires_grad=True)
    loss = (1 - generalized_box_iou(boxes, boxes.detach())).sum()
    loss.backward()
    assert torch.isfinite(boxes.grad).all()


def test_box_validation():
    with pytest.raises(ValueError, match=r"box \(0,\)"):
        box_iou([[2, 0, 1, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="y2 >= y1"):
        generalized_box_iou([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 3, 1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        box_iou([[0, 0, float("nan"), 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        box_iou([[0, 0, 1]], [[0, 0, 1, 1]])


def test_referring_accuracy():
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    pred = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4]])  # IoU 1, 0.5, 0.4
    assert referring_accuracy(pred, gt) == pytest.approx(2 / 3)  # IoU >= 0.5 counts
    assert referring_accuracy(pred, gt, thresh=0.45) == pytest.approx(2 / 3)
    assert referring_accuracy(pred, gt, thresh=0.3) == 1.0
    with pytest.raises(ValueError, match="both be"):
        referring_accuracy(pred[:2], gt)
    with pytest.raises(ValueError, match="at least one"):
        referring_accuracy(torch.zeros(0, 4), torch.zeros(0, 4))

# ----------------------------------------------------------------------------- detection AP


def test_average_precision_by_hand():
    gt = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [0, 0]}]
    pred = [{"boxes": [[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]],
             "scores": [0.9, 0.8, 0.7], "labels": [0, 0, 0]}]
    # ranked: TP (P=1, R=.5), FP (P=.5, R=.5), TP (P=2/3, R=1) at every IoU threshold.
    # interpolated precision: 1 for the 51 recall levels 0..0.50, 2/3 for the 50 levels .51..1
    expected = (51 * 1 + 50 * 2 / 3) / 101
    out = average_precision(pred, gt)
    assert out["mAP@0.5"] == pytest.approx(expected) and out["mAP@[.5:.95]"] == pytest.approx(expected)
    assert out["AP_per_class"] == pytest.approx({0: expected})
    # keep 1 detection per image and class: only the first TP remains -> recall 0.5, precision 1
    assert average_precision(pred, gt, max_detections=1)["mAP@0.5"] == pytest.approx(51 / 101)
    # a box matching at IoU 0.5 .. 0.65 but not above: AP@0.5 = 1, AP averaged over ten thresholds = 4/10
    one = [{"boxes": [[0, 0, 10, 10]], "labels": [3]}]
    shifted = [{"boxes": [[0, 0, 10, 6.5]], "scores": [1.0], "labels": [3]}]  # IoU 0.65
    out = average_precision(shifted, one)
    assert out["AP50_per_class"] == {3: 1.0} and out["mAP@[.5:.95]"] == pytest.approx(4 / 10)


def test_average_precision_tie_goes_to_the_last_gt_like_cocoeval():
    gt = [{"boxes": [[0, 0, 10, 10], [2, 0, 12, 10]], "labels": [0, 0]}]
    pred = [{"boxes": [[1, 0, 11, 10], [4, 0, 14, 10]], "scores": [0.9, 0.8], "labels": [0, 0]}]
    # det 1 overlaps both gts by 90 of 110 px (IoU 0.818, a tie) and takes the *last* one, gt 2;
    # det 2 then only has gt 1 left, at IoU 60/140 = 0.43 < 0.5: a false positive.
    # AP = 51/101 (TP then FP) at the 7 thresholds 0.50..0.80, 0 above; taking gt 1 would give 1.
    out = average_precision(pred, gt)
    assert out["mAP@0.5"] == pytest.approx(51 / 101)
    assert out["mAP@[.5:.95]"] == pytest.approx(7 * 51 / 101 / 10)
    if _has("pycocotools"):
        m, m50, _, _ = _cocoeval(pred, gt, 0)
        assert (out["mAP@[.5:.95]"], out["mAP@0.5"]) == pytest.approx((m, m50), abs=1e-12)


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_average_precision_edge_cases():
    gt = [{"boxes": [[0, 0, 10, 10]], "labels": [0]}, {"boxes": torch.zeros(0, 4), "labels": []}]
    # no predictions at all: AP 0 (defined), not NaN
    none = [{"boxes": [], "scores": [], "labels": []}] * 2
    assert average_precision(none, gt) == {"AP_per_class": {0: 0.0}, "AP50_per_class": {0: 0.0},
                                           "mAP@0.5": 0.0, "mAP@[.5:.95]": 0.0}
    # a class with predictions but no ground truth has no AP and does not drag the mean down
    pred = [{"boxes": [[0, 0, 10, 10], [0, 0, 10, 10]], "scores": [0.9, 0.95], "labels": [0, 7]},
            {"boxes": [[1, 1, 2, 2]], "scores": [0.99], "labels": [7]}]
    out = average_precision(pred, gt)
    assert out["AP_per_class"] == {0: 1.0} and out["mAP@0.5"] == 1.0
    # a duplicate detection of the same object is a false positive
    dup = [{"boxes": [[0, 0, 10, 10]] * 2, "scores": [0.9, 0.8], "labels": [0, 0]}, none[0]]
    gt2 = [{"boxes": [[0, 0, 10, 10], [30, 30, 40, 40]], "labels": [0, 0]}, gt[1]]
    assert average_precision(dup, gt2)["mAP@0.5"] == pytest.approx(51 / 101)
    # zero-area ground truth: IoU 0 with everything, so it is counted but never found
    zero = [{"boxes": [[5, 5, 5, 5]], "labels": [0]}]
    assert average_precision([{"boxes": [[5, 5, 5, 5]], "scores": [1.0], "labels": [0]}], zero)["mAP@0.5"] == 0.0


def test_average_precision_validation():
    gt = [{"boxes": [[0, 0, 1, 1]], "labels": [0]}]
    good = [{"boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [0]}]
    with pytest.raises(ValueError, match="same images"):
        average_precision(good, gt * 2)
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        average_precision(good, [{"boxes": [], "labels": []}])
    with pytest.raises(ValueError, match=r"predictions\[0\]\['boxes'\].*x2 >= x1"):
        average_precision([{"boxes": [[2, 0, 1, 1]], "scores": [0.5], "labels": [0]}], gt)
    with pytest.raises(ValueError, match="scores"):
        average_precision([{"boxes": [[0, 0, 1, 1]], "scores": [float("nan")], "labels": [0]}], gt)
    with pytest.raises(ValueError, match="same number|must be"):
        average_precision([{"boxes": [[0, 0, 1, 1]], "scores": [0.5, 0.2], "labels": [0]}], gt)
    with pytest.raises(ValueError, match="keys"):
        average_precision([{"boxes": [[0, 0, 1, 1]]}], gt)
    with pytest.raises(ValueError, match="at least one image"):
        average_precision([], [])


def _coco_case(rng, n_img=8, n_cls=4, tied_scores=False, crowded_image=False):
    """Integer boxes (exact IoUs, some ties), detections near gts or random, a class without gt."""
    preds, gts = [], []
    for i in range(n_img):
        G = int(rng.integers(0, 8))
        xy = rng.integers(0, 50, (G, 2))
        gb = np.concatenate([xy, xy + rng.integers(0, 20, (G, 2))], 1).astype(float)
        P = int(rng.integers(5, 15)) + (120 if crowded_image and i == 0 else 0)
        near = gb[rng.integers(0, max(G, 1), P)] + rng.integers(-3, 4, (P, 4)) if G else np.zeros((P, 4))
        xy = rng.integers(0, 50, (P, 2))
        rand = np.concatenate([xy, xy + rng.integers(1, 20, (P, 2))], 1)
        pb = np.where((rng.random(P) < 0.6)[:, None] & (G > 0), near, rand).astype(float)
        pb[:, 2:] = np.maximum(pb[:, 2:], pb[:, :2])
        labels = rng.integers(0, n_cls + 1, P)  # class n_cls never has ground truth
        if crowded_image and i == 0:
            labels[:] = 0  # > 100 detections of one class in one image: COCO's maxDets kicks in
        scores = rng.random(P).round(1) if tied_scores else rng.random(P)
        if crowded_image and i == 0:  # 120 high-scoring random boxes push the real hits past 100
            scores = np.where(np.arange(P) < 120, 0.5 + scores / 2, scores / 2)
            pb[:120] = rand[:120]
        preds.append({"boxes": pb, "scores": scores, "labels": labels})
        gts.append({"boxes": gb, "labels": rng.integers(0, n_cls, G)})
    return preds, gts


def _cocoeval(preds, gts, n_cls):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    anns, res = [], []
    for i, (p, g) in enumerate(zip(preds, gts)):
        for b, lab in zip(g["boxes"], g["labels"]):  # gt ids start at 1: COCOeval treats 0 as "unmatched"
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(lab) + 1, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b, s, lab in zip(p["boxes"], p["scores"], p["labels"]):
            res.append({"image_id": i + 1, "category_id": int(lab) + 1, "score": float(s),
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": [{"id": i + 1} for i in range(len(gts))], "annotations": anns,
                        "categories": [{"id": c + 1} for c in range(n_cls + 1)]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, 2]  # (T, R, K) at area "all", maxDets 100
    per_class = {c: precision[:, :, c].mean() for c in range(n_cls + 1) if (precision[:, :, c] > -1).all()}
    per_class50 = {c: precision[0, :, c].mean() for c in per_class}
    return ev.stats[0], ev.stats[1], per_class, per_class50


def test_average_precision_equals_pycocotools_cocoeval():
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(0)
    truncation_mattered = False
    for trial in range(12):
        preds, gts = _coco_case(rng, tied_scores=trial % 3 == 1, crowded_image=trial % 4 == 0)
        if not any(len(p["scores"]) for p in preds) or not any(len(g["labels"]) for g in gts):
            continue
        m, m50, per_class, per_class50 = _cocoeval(preds, gts, 4)
        ours = average_precision(preds, gts)
        assert ours["mAP@[.5:.95]"] == pytest.approx(m, abs=1e-12)
        assert ours["mAP@0.5"] == pytest.approx(m50, abs=1e-12)
        assert ours["AP_per_class"] == pytest.approx(per_class, abs=1e-12)
        assert ours["AP50_per_class"] == pytest.approx(per_class50, abs=1e-12)
        if trial % 4 == 0:
            truncation_mattered |= average_precision(preds, gts, max_detections=None)["mAP@0.5"] != ours["mAP@0.5"]
    assert truncation_mattered  # the >100-detection images did exercise COCO's maxDets


# ---- every metric returns a number or raises ValueError/TypeError: no silent wrong answer ----
from minivl.metrics import (box_area, first_positive_rank,  # noqa: E402
                            )


def test_inverted_boxes_are_rejected_even_when_their_area_is_positive():
    both_inverted = [[4.0, 4.0, 1.0, 2.0]]  # (x2 - x1) * (y2 - y1) = (-3) * (-2) = +6
    for fn in (box_area, lambda b: box_iou(b, [[0, 0, 1, 1]]), lambda b: generalized_box_iou([[0, 0, 1, 1]], b),
               lambda b: referring_accuracy(b, [[0, 0, 1, 1]]), lambda b: box_convert(b, "xyxy", "cxcywh")):
        with pytest.raises(ValueError, match="x2 >= x1"):
            fn(both_inverted)
    with pytest.raises(ValueError, match="x2 >= x1"):
        average_precision([{"boxes": both_inverted, "scores": [1.0], "labels": [0]}],
                          [{"boxes": [[0, 0, 1, 1]], "labels": [0]}])
    assert box_area([[0, 0, 2, 3]]).tolist() == [6.0]


def test_nan_inf_bool_and_complex_inputs_are_rejected():
    nan = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        box_iou([[0, 0, nan, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        first_positive_rank(torch.tensor([[nan]]), torch.tensor([[True]]))
    with pytest.raises(TypeError, match="similarity"):
        retrieval_metrics(torch.eye(2, dtype=torch.complex64), torch.eye(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="boxes"):
        box_iou(torch.ones(1, 4, dtype=torch.bool), [[0, 0, 1, 1]])
    with pytest.raises(TypeError, match="logits"):
        topk_accuracy("abc", [0])
    with pytest.raises(ValueError, match="thresh"):
        referring_accuracy([[0, 0, 1, 1]], [[0, 0, 1, 1]], thresh=nan)
    with pytest.raises(ValueError, match="sigma"):
        cider_d(["a", "b"], [["a"], ["b"]], sigma=0.0)


def test_empty_inputs_say_no_number_is_meaningful():
    for call in (lambda: referring_accuracy(torch.zeros(0, 4), torch.zeros(0, 4)),
                 lambda: bleu([], []), lambda: exact_match([], []), lambda: vqa_accuracy([], []),
                 lambda: topk_accuracy(torch.zeros(0, 3), [], ks=(1,)),
                 lambda: retrieval_metrics(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.bool)),
                 lambda: average_precision([], [])):
        with pytest.raises(ValueError, match="empty|at least one|non-empty|no questions"):
            call()


def test_k_out_of_range_and_bools_as_k():
    logits, y = torch.eye(3), torch.tensor([0, 1, 2])
    assert topk_accuracy(logits, y, ks=(np.int64(1),)) == {"top1": 1.0}
    for ks in ((0,), (4,), ()):
        with pytest.raises(ValueError, match="ks must be ints in"):
            topk_accuracy(logits, y, ks=ks)
    with pytest.raises(TypeError, match="ks"):
        topk_accuracy(logits, y, ks=(True,))  # used to report "topTrue"
    with pytest.raises(TypeError, match="ks"):
        retrieval_metrics(torch.eye(2), torch.eye(2, dtype=torch.bool), ks=5)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(torch.eye(2), torch.eye(2, dtype=torch.bool), ks=(0,))
    with pytest.raises(TypeError, match="num_classes"):
        confusion_matrix([0], [0], True)
    with pytest.raises(ValueError, match="no True entry"):
        first_positive_rank(torch.eye(2), torch.tensor([[True, False], [False, False]]))


def test_mismatched_lengths_and_wrong_types_of_captions_and_answers():
    with pytest.raises(ValueError, match="one reference list per candidate"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="candidates must be a list"):
        bleu("a red circle", [["a"]] * 12)  # a string would be scored character by character
    with pytest.raises(TypeError, match=r"candidates\[0\]"):
        cider_d_scores([None, "a"], [["a"], ["b"]])
    with pytest.raises(TypeError, match=r"references\[1\]\[0\]"):
        bleu(["a", "b"], [["a"], [3]])
    with pytest.raises(TypeError, match="n must be an int"):
        bleu(["a"], [["a"]], n=True)
    with pytest.raises(ValueError, match="one answer per prediction"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"predictions\[0\]"):
        vqa_scores([2], [["2", "2"]])
    with pytest.raises(TypeError, match="answers must be strings"):
        vqa_accuracy(["a"], [["a", 1]])
    with pytest.raises(TypeError, match="predictions must be a list"):
        exact_match(None, ["a"])
    with pytest.raises(TypeError, match=r"types\[0\]"):
        accuracy_by_type(["a"], ["a"], [["color"]])
    with pytest.raises(ValueError, match="pred_boxes and gt_boxes"):
        referring_accuracy([[0, 0, 1, 1]], [[0, 0, 1, 1]] * 2)
    with pytest.raises(TypeError, match="iou_thresholds"):
        average_precision([{"boxes": [], "scores": [], "labels": []}], [{"boxes": [[0, 0, 1, 1]], "labels": [0]}],
                          iou_thresholds="0.5")
