"""Evaluating open-vocabulary detection and grounding on Shapes World.

- `detection_eval`: COCO-style AP (`minivl.metrics.detection.average_precision`: mAP@[.5:.95] and
  mAP@0.5) for one kind of the world's detection prompts - "shapes" (all five shape names) or
  "combos" (colour-shape pairs, absent ones included) - one class per phrase across all images.
  On the "heldout" split the held-out pairs are queried *by their names*: the open-vocabulary
  test, since no training image ever boxed (or named) them; `classes=` restricts the mean to them.
- `referring_eval`: accuracy of `ground`'s top box (IoU >= 0.5) per expression type.
- `box_tightness`: IoU of the top box per object, apart from the ranking AP also judges.
- `precision_recall_curve`: the pooled curve at one IoU threshold, for plotting.

Every image is scored against all P patches for each of its prompt's phrases (OWL-ViT has no NMS:
the bipartite training already leaves one confident patch per object).

The one idea to take away: AP judges the *ranking* of all (patch, phrase) scores over the test set,
so a detector is good when true objects outrank every false alarm - in every image at once.
"""
from __future__ import annotations

import numpy as np
import torch

from minivl.data import image_to_tensor
from minivl.metrics.boxes import box_convert, box_iou, referring_accuracy
from minivl.metrics.detection import average_precision

KINDS = ("shapes", "combos", "mixed")


@torch.no_grad()
def _scores(model, scenes, texts: list[str], batch_size: int = 100):
    """(sigmoid scores (n, N, len(texts)), pixel xyxy boxes (n, N, 4)) of every scene's patches."""
    embeds = torch.cat([model.embed_text(**model.tokenize(texts[i:i + 256])) for i in range(0, len(texts), 256)])
    S = model.config.clip.vision.image_size
    scores, boxes = [], []
    for i in range(0, len(scenes), batch_size):
        images = image_to_tensor(np.stack([s.image for s in scenes[i:i + batch_size]])).to(model.box_bias.device)
        out = model(images, query_embeds=embeds)
        scores.append(out.logits.float().sigmoid().cpu())
        boxes.append(box_convert(out.pred_boxes.float(), "cxcywh", "xyxy").cpu() * S)
    return torch.cat(scores), torch.cat(boxes)


def detection_predictions(model, world, split: str = "test", n_scenes: int = 500, kind: str = "combos",
                          offset: int = 0, batch_size: int = 100):
    """-> (predictions, ground_truths, phrases) as `average_precision` reads them: per image, every
    patch x every phrase of the scene's `kind` prompt (pixel xyxy boxes, label = index into phrases)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    scenes = [world.scene(offset + i, split) for i in range(n_scenes)]
    queries = [next(q for q in world.detection(s) if q.type == kind) for s in scenes]
    phrases = sorted({p for q in queries for p in q.phrases})
    ids = {p: i for i, p in enumerate(phrases)}
    scores, boxes = _scores(model, scenes, phrases, batch_size)  # (n, N, C), (n, N, 4)
    preds, gts = [], []
    for s, b, q in zip(scores, boxes, queries):
        cols = torch.tensor([ids[p] for p in q.phrases])  # this prompt's classes
        N = b.shape[0]
        preds.append({"boxes": b.repeat(len(cols), 1), "scores": s[:, cols].T.reshape(-1),
                      "labels": cols.repeat_interleave(N)})
        gts.append({"boxes": torch.tensor(q.boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor([ids[q.phrases[k]] for k in q.labels], dtype=torch.long)})
    return preds, gts, phrases


def detection_eval(model, world, split: str = "test", n_scenes: int = 500, kind: str = "combos",
                   classes=None, offset: int = 0, details: dict | None = None) -> dict:
    """{"AP": COCO mAP@[.5:.95], "AP50": mAP@0.5} over the phrases with ground truth (or only over
    `classes`, phrase strings, e.g. the held-out pair names), plus "AP50_per_class"."""
    preds, gts, phrases = detection_predictions(model, world, split, n_scenes, kind, offset)
    res = average_precision(preds, gts)
    keep = [i for i in res["AP_per_class"] if classes is None or phrases[i] in set(classes)]
    if not keep:
        raise ValueError(f"none of the classes {classes} has a ground-truth box in these {n_scenes} scenes")
    if details is not None:
        details.update(predictions=preds, ground_truths=gts, phrases=phrases)
    return {"AP": float(np.mean([res["AP_per_class"][i] for i in keep])),
            "AP50": float(np.mean([res["AP50_per_class"][i] for i in keep])),
            "AP50_per_class": {phrases[i]: res["AP50_per_class"][i] for i in keep}}


def heldout_names(world) -> list[str]:
    """The held-out colour-shape pairs as query phrases: "red triangle", ..."""
    return [f"{c} {s}" for c, s in world.config.heldout]


@torch.no_grad()
def referring_eval(model, world, split: str = "test", n_scenes: int = 300, offset: int = 0,
                   batch_size: int = 25) -> dict:
    """Referring accuracy (top box IoU >= 0.5) per expression type ("attribute", "relation",
    "extreme") and over all, with the number of expressions of each type. Each scene is asked only
    its own expressions, as `ground` asks them (through the fusion enhancer when the model has one)."""
    scenes = [world.scene(offset + i, split) for i in range(n_scenes)]
    refs = [world.referring(s) for s in scenes]
    S = model.config.clip.vision.image_size
    pred, gt, kinds = [], [], []
    for i in range(0, n_scenes, batch_size):
        chunk, chunk_refs = scenes[i:i + batch_size], refs[i:i + batch_size]
        texts = sorted({r.text for rs in chunk_refs for r in rs})
        if not texts:
            continue
        col = {t: j for j, t in enumerate(texts)}
        tok = model.tokenize(texts)  # (U, T)
        Q = max(len(rs) for rs in chunk_refs)
        index = torch.tensor([[col[r.text] for r in rs] + [0] * (Q - len(rs)) for rs in chunk_refs])  # (b, Q)
        real = torch.tensor([[True] * len(rs) + [False] * (Q - len(rs)) for rs in chunk_refs])  # (b, Q)
        index, real = index.to(tok["input_ids"].device), real.to(tok["input_ids"].device)
        images = image_to_tensor(np.stack([s.image for s in chunk])).to(model.box_bias.device)
        out = model(images, tok["input_ids"][index], tok["attention_mask"][index], query_mask=real, fuse=True)
        boxes = box_convert(out.pred_boxes.float(), "cxcywh", "xyxy").cpu() * S  # (b, N, 4)
        logits = out.logits.float().cpu()  # (b, N, Q)
        for b, rs in enumerate(chunk_refs):
            for j, r in enumerate(rs):
                pred.append(boxes[b, int(logits[b, :, j].argmax())])
                gt.append(torch.tensor(r.box, dtype=torch.float32))
                kinds.append(r.type)
    pred, gt = torch.stack(pred), torch.stack(gt)
    out = {}
    for kind in ("attribute", "relation", "extreme"):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if rows:
            out[kind] = referring_accuracy(pred[rows], gt[rows])
            out[f"n_{kind}"] = len(rows)
    out["all"] = referring_accuracy(pred, gt)
    return out


@torch.no_grad()
def box_tightness(model, world, split: str = "test", n_scenes: int = 200, drop_detail: bool = False) -> dict:
    """How tight the boxes are, apart from ranking: for every object of `n_scenes` scenes, the box of the
    patch scoring highest for its colour-shape phrase ("red circle") in its own image. -> {"mean_iou",
    "iou_0.9", "iou_0.95" (fractions of objects at or above), "mean_edge_error_px", "n"}.
    drop_detail=True feeds the box head zeros for the first-layer neighbourhoods (a model with
    config.box_detail): what the boxes are without it."""
    scenes = [world.scene(i, split) for i in range(n_scenes)]
    phrases = sorted({o.name for s in scenes for o in s.objects})
    col = {p: j for j, p in enumerate(phrases)}
    embeds = model.embed_text(**model.tokenize(phrases))  # (P, E)
    S = model.config.clip.vision.image_size
    device = model.box_bias.device
    pred, gt = [], []
    for i in range(0, n_scenes, 100):
        chunk = scenes[i:i + 100]
        images = image_to_tensor(np.stack([s.image for s in chunk])).to(device)
        feats, detail = model.encode_image(images)  # (b, N, D), (b, N, 9 D) or None
        if drop_detail and detail is not None:
            detail = torch.zeros_like(detail)
        logits, _ = model.class_head(model.class_features(feats), embeds.expand(len(chunk), -1, -1))  # (b, N, P)
        boxes = box_convert(model.boxes(feats, detail).float(), "cxcywh", "xyxy").cpu() * S  # (b, N, 4) pixels
        for b, scene in enumerate(chunk):
            for o in scene.objects:
                pred.append(boxes[b, int(logits[b, :, col[o.name]].argmax())])
                gt.append(torch.tensor(o.box, dtype=torch.float32))
    pred, gt = torch.stack(pred), torch.stack(gt)
    iou = box_iou(pred, gt).diagonal()
    return {"mean_iou": float(iou.mean()), "iou_0.9": float((iou >= 0.9).float().mean()),
            "iou_0.95": float((iou >= 0.95).float().mean()),
            "mean_edge_error_px": float((pred - gt).abs().mean()), "n": len(iou)}


def precision_recall_curve(predictions: list[dict], ground_truths: list[dict], iou: float = 0.5) -> dict:
    """The pooled precision-recall curve at one IoU threshold, all classes together: detections
    ranked by score; per image and class each takes the best still-free ground truth (greedy, as
    COCO). -> {"precision", "recall", "scores"} (numpy arrays, one entry per detection)."""
    flags, all_scores, n_gt = [], [], 0
    for p, g in zip(predictions, ground_truths):
        n_gt += len(g["labels"])
        for c in torch.unique(torch.as_tensor(p["labels"])).tolist():
            sel = torch.as_tensor(p["labels"]) == c
            s, order = torch.as_tensor(p["scores"])[sel].sort(descending=True)
            b = torch.as_tensor(p["boxes"])[sel][order]
            gb = torch.as_tensor(g["boxes"]).reshape(-1, 4)[torch.as_tensor(g["labels"]) == c]
            free = torch.ones(len(gb), dtype=torch.bool)
            ious = box_iou(b, gb) if len(gb) else torch.zeros(len(b), 0)
            for k in range(len(b)):
                cand = torch.where(free, ious[k], torch.full_like(ious[k], -1.0)) if len(gb) else ious[k]
                hit = len(gb) > 0 and cand.max() >= iou
                if hit:
                    free[int(cand.argmax())] = False
                flags.append(bool(hit))
            all_scores.append(s)
    scores = torch.cat(all_scores).numpy() if all_scores else np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    tp = np.asarray(flags, dtype=float)[order]
    cum = np.cumsum(tp)
    return {"precision": cum / np.arange(1, len(tp) + 1), "recall": cum / max(1, n_gt), "scores": scores[order]}


def evaluate(model, world, n_scenes: int = 500, n_referring: int = 300) -> dict:
    """The headline figures: AP / AP50 for shape and colour-shape queries on test scenes (seen pairs),
    for the held-out pairs queried by name on held-out scenes, and referring accuracy per type."""
    out = {}
    for kind in ("shapes", "combos"):
        r = detection_eval(model, world, "test", n_scenes, kind)
        out[f"{kind}_AP"], out[f"{kind}_AP50"] = r["AP"], r["AP50"]
    r = detection_eval(model, world, "heldout", n_scenes, "combos", classes=heldout_names(world))
    out["heldout_AP"], out["heldout_AP50"] = r["AP"], r["AP50"]
    out["heldout_AP50_per_pair"] = r["AP50_per_class"]
    r = detection_eval(model, world, "heldout", n_scenes, "combos",
                       classes=[f"{c} {s}" for c, s in world.train_combos])
    out["heldout_scenes_seen_pairs_AP50"] = r["AP50"]
    ref = referring_eval(model, world, "test", n_referring)
    out.update({f"referring_{k}": v for k, v in ref.items()})
    return out


__all__ = ["KINDS", "detection_predictions", "detection_eval", "heldout_names", "referring_eval", "box_tightness",
           "precision_recall_curve", "evaluate"]
