"""`python -m minivl bench metrics`: time minivl.metrics next to the reference implementations.

Three workloads, each timed with `minivl.bench.time_many` (interleaved rounds, median) and, when
the reference is installed, next to it on the same inputs, printing both numbers and how far
apart the results are:
- detection AP: 10,000 predictions and 5,000 ground-truth boxes over 500 images and 10 classes,
  minivl's `average_precision` vs pycocotools' COCOeval (evaluate + accumulate + summarize);
- captioning: BLEU-1..4 and CIDEr-D over 5,000 candidates with 5 references each, vs
  pycocoevalcap's Bleu and Cider;
- retrieval: recall@1/5/10 both ways on a 1,000 x 5,000 similarity matrix (no reference).

The one idea to take away: vectorised code (one tensor op over all box pairs, n-grams as integer
ids in flat arrays) makes an exact metric cheap enough to run at every evaluation step.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

import minivl
from minivl.bench import time_many
from minivl.metrics import average_precision, bleu, cider_d, retrieval_metrics

WORDS = ("a an the red green blue yellow purple orange circle square triangle star small big "
         "left right of above below next to is there one two three shapes").split()


def detection_data(n_images=500, preds_per_image=20, gts_per_image=10, n_classes=10, seed=0):
    """Random boxes in 64 px images: predictions jitter a ground-truth box 60% of the time."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n_images):
        xy = rng.uniform(0, 48, (gts_per_image, 2))
        gt = np.concatenate([xy, xy + rng.uniform(4, 16, (gts_per_image, 2))], 1)  # (G, 4)
        gl = rng.integers(0, n_classes, gts_per_image)
        src = rng.integers(0, gts_per_image, preds_per_image)
        near = rng.random(preds_per_image) < 0.6
        xy = rng.uniform(0, 48, (preds_per_image, 2))
        rand = np.concatenate([xy, xy + rng.uniform(4, 16, (preds_per_image, 2))], 1)
        jitter = gt[src] + rng.normal(0, 1.5, (preds_per_image, 4))
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2])
        pb = np.where(near[:, None], jitter, rand)  # (P, 4)
        pl = np.where(near & (rng.random(preds_per_image) < 0.8), gl[src], rng.integers(0, n_classes, preds_per_image))
        preds.append({"boxes": pb, "scores": rng.random(preds_per_image), "labels": pl})
        gts.append({"boxes": gt, "labels": gl})
    return preds, gts


def coco_map(preds, gts) -> tuple[float, float]:
    """(mAP@[.5:.95], mAP@0.5) from pycocotools' COCOeval, boxes converted to COCO's xywh."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns, res = [], []
    for i, (p, g) in enumerate(zip(preds, gts)):
        for b, lab in zip(g["boxes"], g["labels"]):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(lab), "iscrowd": 0,
                         "bbox": [b[0], b[1], w, h], "area": w * h})
        for b, s, lab in zip(p["boxes"], p["scores"], p["labels"]):
            res.append({"image_id": i, "category_id": int(lab), "score": float(s),
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    classes = sorted({a["category_id"] for a in anns} | {r["category_id"] for r in res})
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(len(gts))], "annotations": anns,
                      "categories": [{"id": c} for c in classes]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def caption_data(n=5000, refs_per_image=5, seed=0):
    rng = np.random.default_rng(seed)

    def sentence():
        return " ".join(rng.choice(WORDS, rng.integers(3, 13)))
    return [sentence() for _ in range(n)], [[sentence() for _ in range(refs_per_image)] for _ in range(n)]


def _report(title: str, timed: dict, values: dict) -> None:
    times = "  ".join(f"{name} {t['median_s'] * 1e3:8.1f} ms" for name, t in timed.items())
    print(f"{title}\n    {times}")
    if len(timed) == 2:
        (a, ta), (b, tb) = timed.items()
        print(f"    speed-up {a}/{b}: {tb['median_s'] / ta['median_s']:.1f}x")
    for name, v in values.items():
        print(f"    {name}: {v}")


def main(args) -> int:
    iters = getattr(args, "steps", None) or 3
    device = minivl.device(getattr(args, "device", None))
    print(f"minivl.metrics bench: median of {iters} runs, device {device}, {torch.get_num_threads()} threads")

    preds, gts = detection_data()
    to_dev = [{k: torch.as_tensor(v, device=device) for k, v in p.items()} for p in preds]
    gts_dev = [{k: torch.as_tensor(v, device=device) for k, v in g.items()} for g in gts]
    fns = {"minivl": lambda: average_precision(to_dev, gts_dev)}
    ours = average_precision(to_dev, gts_dev)
    values = {"minivl mAP@[.5:.95] / mAP@0.5": f"{ours['mAP@[.5:.95]']:.6f} / {ours['mAP@0.5']:.6f}"}
    try:
        ref = coco_map(preds, gts)
        fns["pycocotools"] = lambda: coco_map(preds, gts)
        values["pycocotools"] = f"{ref[0]:.6f} / {ref[1]:.6f}"
        values["max |difference|"] = f"{max(abs(ours['mAP@[.5:.95]'] - ref[0]), abs(ours['mAP@0.5'] - ref[1])):.1e}"
    except ImportError:
        values["pycocotools"] = "not installed: no reference"
    n_p, n_g = sum(len(p["scores"]) for p in preds), sum(len(g["labels"]) for g in gts)
    _report(f"detection AP: {n_p:,} predictions, {n_g:,} ground-truth boxes, {len(gts)} images, 10 classes",
            time_many(fns, warmup=1, iters=iters, device=device), values)

    cands, refs = caption_data()
    gts_c = {i: r for i, r in enumerate(refs)}
    res_c = {i: [c] for i, c in enumerate(cands)}
    for metric, ours_fn, ref_name in (("BLEU-1..4", lambda: bleu(cands, refs), "Bleu"),
                                      ("CIDEr-D", lambda: cider_d(cands, refs), "Cider")):
        fns = {"minivl": ours_fn}
        ours = ours_fn()
        values = {"minivl": ours}
        try:
            if ref_name == "Bleu":
                from pycocoevalcap.bleu.bleu import Bleu
                ref_fn = lambda: Bleu(4).compute_score(gts_c, res_c, verbose=0)[0]  # noqa: E731
            else:
                from pycocoevalcap.cider.cider import Cider
                ref_fn = lambda: Cider().compute_score(gts_c, res_c)[0]  # noqa: E731
            fns["pycocoevalcap"] = ref_fn
            ref = ref_fn()
            values["pycocoevalcap"] = ref
            mine = list(ours.values()) if isinstance(ours, dict) else [ours]
            theirs = list(ref) if isinstance(ref, list) else [ref]
            values["max |difference|"] = f"{max(abs(a - b) for a, b in zip(mine, theirs)):.1e}"
        except ImportError:
            values["pycocoevalcap"] = "not installed: no reference"
        _report(f"{metric}: {len(cands):,} candidates x {len(refs[0])} references",
                time_many(fns, warmup=1, iters=iters), values)

    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(1000, 5000, generator=gen).to(device)  # (N_img, N_txt)
    pos = (torch.arange(5000)[None, :] // 5 == torch.arange(1000)[:, None]).to(device)  # 5 captions each
    timed = time_many({"minivl": lambda: retrieval_metrics(sim, pos)}, warmup=1, iters=iters, device=device)
    _report("retrieval: 1,000 images x 5,000 texts, R@1/5/10 both ways", timed,
            {"i2t_R@10 of random scores (chance ~0.01)": retrieval_metrics(sim, pos)["i2t_R@10"]})
    return 0
