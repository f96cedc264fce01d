"""Bad input at every public entry point of Shapes World, the datasets, the metrics and the plots.

Each entry point is called with one argument replaced by a bad value (wrong type, shape or
dtype, NaN/inf, empty, bool for an int, negative, a numpy scalar). Either the call returns (some
"bad" values are valid: np.int64(3) is an index) or it raises ValueError / TypeError whose
message names the argument; an error from deep inside torch, numpy or matplotlib (IndexError,
RuntimeError, AttributeError, ...) fails the test. `sweep()` runs a fixed seeded sample of the
same cases and counts them: `python tests/test_fuzz_data.py` prints the figures.
"""
from __future__ import annotations

import random
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivl import data, metrics, viz
from minivl.world import World, WorldConfig, shape_mask

# a plot of a bad-but-valid array may not fit its labels: matplotlib's warning says nothing here
pytestmark = pytest.mark.filterwarnings("ignore:Tight layout not applied")
WORLD = World()
SCENE = WORLD.scene(0)
IMG = SCENE.image
BOX = [[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 4.0]]
GT = [{"boxes": [[0, 0, 2, 2]], "labels": [0]}]
PRED = [{"boxes": [[0, 0, 2, 2]], "scores": [0.9], "labels": [0]}]
CAPS, REFS = ["a red circle", "a blue square"], [["a red circle"], ["a blue square", "blue square"]]
HIST = {"step": [1, 2], "loss": [1.0, 0.5]}

# ---- bad values --------------------------------------------------------------------------
SCALARS = [None, True, False, -1, 0, -(2**70), 2**70, 0.5, -2.5, float("nan"), float("inf"), 1 + 2j,
           "", "train", "nonsense", b"x", {}, {"a": 1}, [], [None], object(), np.int64(-1), np.int64(3),
           np.float16("nan"), np.bool_(True), np.float64(0.25)]
DTYPES = [np.bool_, np.float16, np.complex64, np.uint8, np.int64, np.float32, object]
SHAPES = [(), (0,), (4,), (0, 4), (2, 3), (2, 4), (3, 8, 8), (8, 8, 3), (1, 3, 8, 8), (2, 2, 2, 2, 2)]


def array(shape, dtype, fill) -> np.ndarray:
    if dtype is object:
        return np.full(shape, "x", dtype=object)
    with np.errstate(invalid="ignore"):  # NaN cast to an int dtype: any value will do
        return np.full(shape, fill).astype(dtype)


bad_arrays = st.builds(array, st.sampled_from(SHAPES), st.sampled_from(DTYPES),
                       st.sampled_from([0, 1, -1, 300, float("nan"), float("inf")]))
bad_tensors = bad_arrays.filter(lambda a: a.dtype != object).map(torch.from_numpy)
bad_values = st.one_of(st.sampled_from(SCALARS), bad_arrays, bad_tensors,
                       st.lists(st.sampled_from([1, "a", None, [1, 2], 2.5, float("nan")]), max_size=3),
                       st.just([[1, 2], [3]]))  # ragged


# ---- entry points: (name, call with the bad value, words one of which the message names) ---
def _cfg(field):
    return lambda v: World(WorldConfig(**{field: v}))


def _fig(fn):  # plots: close what they open, pass or fail
    def call(v):
        try:
            return fn(v)
        finally:
            plt.close("all")
    return call


def _not_valid_int(v) -> bool:  # valid ints are skipped where they would make huge work
    return isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))


CFG_WORDS = {"colors": ("colo",), "shapes": ("shape",), "heldout": ("held",), "small": ("small",),
             "large": ("large",), "min_objects": ("min_objects",), "max_objects": ("max_objects",),
             "image_size": ("image_size",), "texture": ("texture",), "questions_per_type": ("questions_per_type",),
             "seed": ("seed",)}
ENTRY = [(f"WorldConfig.{f}", _cfg(f), w, None) for f, w in CFG_WORDS.items()]
ENTRY += [
    ("World(config)", lambda v: World(v), ("config",), lambda v: v is not None),
    ("World.scene index", lambda v: WORLD.scene(v), ("index",), None),
    ("World.scene split", lambda v: WORLD.scene(0, v), ("split",), None),
    ("World.scene n_objects", lambda v: WORLD.scene(0, "train", v), ("n_objects",), None),
    ("World.answer_index", lambda v: WORLD.answer_index(v), ("answer",), None),
    ("World.fingerprint split", lambda v: WORLD.fingerprint(v, 1), ("split",), None),
    ("World.fingerprint n", lambda v: WORLD.fingerprint("train", v), ("n",), _not_valid_int),
    ("shape_mask shape", lambda v: shape_mask(v, 9), ("shape",), None),
    ("shape_mask side", lambda v: shape_mask("circle", v), ("side",), None),
]
ENTRY += [(f"World.{m}", (lambda m: lambda v: getattr(WORLD, m)(v))(m), ("scene",), None)
          for m in ("captions", "questions", "referring", "detection", "conversation", "all_text", "texts",
                    "class_index")]
DATASETS = [data.ClassificationDataset, data.CaptionDataset, data.VQADataset, data.ReferringDataset,
            data.DetectionDataset, data.ConversationDataset]
for D in DATASETS:
    ds = D(WORLD, "train", 4)
    ENTRY += [(f"{D.__name__} world", (lambda D: lambda v: D(v))(D), ("world",), None),
              (f"{D.__name__} split", (lambda D: lambda v: D(WORLD, v, 4))(D), ("split",), None),
              (f"{D.__name__} length", (lambda D: lambda v: D(WORLD, "train", v))(D), ("length",), None),
              (f"{D.__name__}[i]", (lambda ds: lambda v: ds[v])(ds), ("index",), None)]
ENTRY += [
    ("collate samples", lambda v: data.collate(v), ("collate",), None),
    ("collate items", lambda v: data.collate([{"a": 1}, v]), ("collate", "item"), None),
    ("collate tokenizer", lambda v: data.collate([{"text": "a"}], tokenizer=v), ("tokenizer",), None),
    ("collate context_length", lambda v: data.collate([{"a": 1}], context_length=v), ("context_length",), None),
    ("collate truncate", lambda v: data.collate([{"a": 1}], truncate=v), ("truncate",), None),
    ("make_collate tokenizer", lambda v: data.make_collate(tokenizer=v), ("tokenizer",), None),
    ("make_collate context_length", lambda v: data.make_collate(context_length=v), ("context_length",), None),
    ("pad_sequences seqs", lambda v: data.pad_sequences(v, 0), ("seqs", "input_ids"), None),
    ("pad_sequences item", lambda v: data.pad_sequences([[1, 2], v], 0), ("input_ids",), None),
    ("pad_sequences pad_id", lambda v: data.pad_sequences([[1]], v), ("pad_id",), None),
    ("image_to_tensor", lambda v: data.image_to_tensor(v), ("img",), None),
    ("tensor_to_image", lambda v: data.tensor_to_image(v), ("tensor_to_image",), None),
    ("world_corpus world", lambda v: data.world_corpus(v, 1), ("world",), lambda v: v is not None),
    ("world_corpus n_scenes", lambda v: data.world_corpus(WORLD, v), ("n_scenes",), _not_valid_int),
    ("world_tokenizer vocab_size", lambda v: data.world_tokenizer(v), ("vocab_size",), _not_valid_int),
    ("world_tokenizer world", lambda v: data.world_tokenizer(300, v), ("world",), lambda v: v is not None),
]
M = metrics
ENTRY += [
    ("box_convert boxes", lambda v: M.box_convert(v, "xyxy", "cxcywh"), ("boxes",), None),
    ("box_convert in_fmt", lambda v: M.box_convert(BOX, v, "xyxy"), ("format",), None),
    ("box_area", lambda v: M.box_area(v), ("boxes",), None),
    ("box_iou a", lambda v: M.box_iou(v, BOX), ("boxes",), None),
    ("box_iou b", lambda v: M.box_iou(BOX, v), ("boxes",), None),
    ("generalized_box_iou a", lambda v: M.generalized_box_iou(v, BOX), ("boxes",), None),
    ("referring_accuracy pred", lambda v: M.referring_accuracy(v, BOX), ("pred_boxes",), None),
    ("referring_accuracy gt", lambda v: M.referring_accuracy(BOX, v), ("gt_boxes",), None),
    ("referring_accuracy thresh", lambda v: M.referring_accuracy(BOX, BOX, v), ("thresh",), None),
    ("bleu candidates", lambda v: M.bleu(v, REFS), ("candidate",), None),
    ("bleu candidate", lambda v: M.bleu(["a", v], REFS), ("candidates[1]",), None),
    ("bleu references", lambda v: M.bleu(CAPS, v), ("reference",), None),
    ("bleu reference", lambda v: M.bleu(CAPS, [["a"], v]), ("references[1]",), None),
    ("bleu n", lambda v: M.bleu(CAPS, REFS, v), ("n ",), None),
    ("cider_d candidates", lambda v: M.cider_d(v, REFS), ("candidate",), None),
    ("cider_d references", lambda v: M.cider_d(CAPS, v), ("reference",), None),
    ("cider_d sigma", lambda v: M.cider_d(CAPS, REFS, sigma=v), ("sigma",), None),
    ("cider_d_scores n", lambda v: M.cider_d_scores(CAPS, REFS, n=v), ("n ",), None),
    ("tokenize_caption", lambda v: M.tokenize_caption(v), ("caption",), None),
    ("topk_accuracy logits", lambda v: M.topk_accuracy(v, [0, 1], ks=(1,)), ("logits",), None),
    ("topk_accuracy targets", lambda v: M.topk_accuracy(torch.eye(2, 5), v), ("targets",), None),
    ("topk_accuracy ks", lambda v: M.topk_accuracy(torch.eye(2, 5), [0, 1], v), ("ks",), None),
    ("confusion_matrix preds", lambda v: M.confusion_matrix(v, [0, 1], 3), ("preds",), None),
    ("confusion_matrix targets", lambda v: M.confusion_matrix([0, 1], v, 3), ("targets",), None),
    ("confusion_matrix num_classes", lambda v: M.confusion_matrix([0, 1], [0, 1], v), ("num_classes",),
     _not_valid_int),
    ("retrieval_metrics similarity", lambda v: M.retrieval_metrics(v, torch.eye(2, dtype=bool)), ("similarity",), None),
    ("retrieval_metrics positives", lambda v: M.retrieval_metrics(torch.eye(2), v), ("positives",), None),
    ("retrieval_metrics ks", lambda v: M.retrieval_metrics(torch.eye(2), torch.eye(2, dtype=bool), v), ("ks",), None),
    ("first_positive_rank similarity", lambda v: M.first_positive_rank(v, torch.eye(2, dtype=bool)), ("similarity",), None),
    ("first_positive_rank positives", lambda v: M.first_positive_rank(torch.eye(2), v), ("positives",), None),
    ("vqa_accuracy predictions", lambda v: M.vqa_accuracy(v, [["a", "b"]]), ("prediction",), None),
    ("vqa_accuracy answers_lists", lambda v: M.vqa_accuracy(["a"], v), ("answer",), None),
    ("vqa_accuracy annotators", lambda v: M.vqa_accuracy(["a"], [v]), ("answer",), None),
    ("exact_match predictions", lambda v: M.exact_match(v, ["a"]), ("prediction",), None),
    ("exact_match answer", lambda v: M.exact_match(["a"], [v]), ("answer",), None),
    ("exact_match normalize", lambda v: M.exact_match(["a"], ["a"], v), ("normalize",), None),
    ("accuracy_by_type types", lambda v: M.accuracy_by_type(["a"], ["a"], v), ("type",), None),
    ("accuracy_by_type type", lambda v: M.accuracy_by_type(["a"], ["a"], [v]), ("type",), None),
    ("normalize_answer", lambda v: M.normalize_answer(v), ("answer",), None),
    ("average_precision predictions", lambda v: M.average_precision(v, GT), ("prediction",), None),
    ("average_precision ground_truths", lambda v: M.average_precision(PRED, v), ("ground_truth",), None),
    ("average_precision item", lambda v: M.average_precision([v], GT), ("predictions[0]",), None),
    ("average_precision boxes", lambda v: M.average_precision([{**PRED[0], "boxes": v}], GT), ("boxes",), None),
    ("average_precision scores", lambda v: M.average_precision([{**PRED[0], "scores": v}], GT), ("scores",), None),
    ("average_precision labels", lambda v: M.average_precision([{**PRED[0], "labels": v}], GT), ("labels",), None),
    ("average_precision iou_thresholds", lambda v: M.average_precision(PRED, GT, v), ("iou_thresholds",), None),
    ("average_precision max_detections", lambda v: M.average_precision(PRED, GT, max_detections=v),
     ("max_detections",), None),
    ("show_images images", _fig(lambda v: viz.show_images(v)), ("image",), None),
    ("show_images image", _fig(lambda v: viz.show_images([IMG, v])), ("image",), None),
    ("show_images titles", _fig(lambda v: viz.show_images([IMG], titles=v)), ("titles",), None),
    ("show_images boxes", _fig(lambda v: viz.show_images([IMG], boxes=[v])), ("boxes",), None),
    ("show_images ncols", _fig(lambda v: viz.show_images([IMG], ncols=v)), ("ncols",), None),
    ("show_image_texts texts", _fig(lambda v: viz.show_image_texts([IMG], v)), ("texts",), None),
    ("plot_loss_curve history", _fig(lambda v: viz.plot_loss_curve(v)), ("history",), None),
    ("plot_loss_curve loss", _fig(lambda v: viz.plot_loss_curve({"step": [1, 2], "loss": v})), ("loss",), None),
    ("plot_attention_maps attn", _fig(lambda v: viz.plot_attention_maps(IMG, v)), ("attn",), None),
    ("plot_attention_maps image", _fig(lambda v: viz.plot_attention_maps(v, np.ones((1, 4)))), ("image",), None),
    ("plot_attention_maps grid_size", _fig(lambda v: viz.plot_attention_maps(IMG, np.ones((1, 4)), v)),
     ("grid_size",), None),
    ("plot_similarity_matrix sim", _fig(lambda v: viz.plot_similarity_matrix(v)), ("sim",), None),
    ("plot_similarity_matrix row_labels", _fig(lambda v: viz.plot_similarity_matrix(np.eye(2), v)),
     ("row_labels",), None),
    ("plot_confusion_matrix cm", _fig(lambda v: viz.plot_confusion_matrix(v, ["a", "b"])), ("cm",), None),
    ("plot_confusion_matrix labels", _fig(lambda v: viz.plot_confusion_matrix(np.eye(2), v)), ("labels",), None),
]
CLEAR = (ValueError, TypeError)


def outcome(entry, value) -> str:
    """"ok" (returned), "clear" (ValueError/TypeError naming the argument), or a description of
    what went wrong. A Dataset's out-of-range index may raise IndexError: that is the protocol."""
    name, fn, words, keep = entry
    if keep is not None and not keep(value):
        return "skipped"
    try:
        out = fn(value)
    except CLEAR as e:
        msg = str(e).lower()
        return "clear" if any(w.lower() in msg for w in words) else f"unnamed {type(e).__name__}: {e}"
    except IndexError as e:
        return "clear" if name.endswith("[i]") and "out of range" in str(e) else f"other IndexError: {e}"
    except Exception as e:  # noqa: BLE001 - the point is to catch whatever leaks
        return f"other {type(e).__name__}: {e}"
    if isinstance(out, float) and not np.isfinite(out):
        return f"silent non-finite answer {out}"
    return "ok"


@pytest.mark.parametrize("entry", ENTRY, ids=[e[0] for e in ENTRY])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(value=bad_values)
def test_bad_input_gives_a_clear_error(entry, value):
    result = outcome(entry, value)
    assert result in ("ok", "clear", "skipped"), f"{entry[0]}({value!r:.80}) -> {result}"


def test_plots_reject_silently_wrong_pictures():
    with pytest.raises(ValueError, match="NaN"):
        _fig(viz.plot_similarity_matrix)(np.array([[1.0, np.nan]]))  # drawn as a blank cell before
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        _fig(viz.show_images)([np.full((3, 8, 8), 200.0)])  # [0, 255] floats: all white before
    with pytest.raises(ValueError, match="negative"):
        _fig(lambda cm: viz.plot_confusion_matrix(cm, ["a", "b"]))(np.array([[1, -1], [0, 2]]))
    with pytest.raises(TypeError, match="attn"):
        _fig(lambda a: viz.plot_attention_maps(IMG, a))(np.ones((1, 4), dtype=bool))
    with pytest.raises(ValueError, match="grid_size"):
        _fig(lambda g: viz.plot_attention_maps(IMG, np.ones((1, 4)), g))(-2)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        _fig(lambda b: viz.show_images([IMG], boxes=b))([[[0, 0, 1]]])
    assert not plt.get_fignums()  # no figure left open by a failed call


def sweep(seed: int = 0, per_entry: int = 12) -> dict:
    """A fixed seeded sample of the same cases: counts of tried / clear / ok / other, and the
    failures. Deterministic (random.Random(seed) picks from a fixed pool), unlike hypothesis."""
    rng = random.Random(seed)
    pool = SCALARS + [array(s, d, f) for s in SHAPES for d in DTYPES for f in (0, 1, -1, 300, float("nan"))]
    pool += [torch.from_numpy(a) for a in pool[len(SCALARS):] if isinstance(a, np.ndarray) and a.dtype != object]
    pool += [[1, "a"], [[1, 2], [3]], [None], [float("nan")]]
    counts, failures = {"tried": 0, "clear": 0, "ok": 0, "other": 0}, []
    for entry in ENTRY:
        for value in rng.sample(pool, per_entry):
            result = outcome(entry, value)
            if result == "skipped":
                continue
            counts["tried"] += 1
            key = result if result in ("clear", "ok") else "other"
            counts[key] += 1
            if key == "other":
                failures.append(f"{entry[0]}({value!r:.60}) -> {result[:160]}")
    return {**counts, "failures": failures}


def test_seeded_sweep_has_no_unclear_error():
    result = sweep()
    print(f"\nfuzz sweep: {result['tried']} cases tried, {result['clear']} clear errors, "
          f"{result['ok']} returned, {result['other']} other")
    assert result["other"] == 0, "\n".join(result["failures"][:30])
    assert result["clear"] > result["tried"] // 2  # the pool really is mostly bad input


if __name__ == "__main__":
    r = sweep()
    print(f"{r['tried']} cases tried, {r['clear']} clear errors, {r['ok']} returned, {r['other']} other")
    print("\n".join(r["failures"]))
    sys.exit(1 if r["other"] else 0)
