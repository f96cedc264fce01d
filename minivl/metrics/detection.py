"""Detection average precision, COCO style: AP per class, mAP@0.5 and mAP@[.5:.95].

Follows the COCO detection evaluation (Lin et al., 2014) exactly as `pycocotools.COCOeval`
computes it for bounding boxes with area range "all" and no crowd annotations; the tests check
equality with COCOeval to 1e-12.

The one idea: a detector's output is a ranked list, so it is judged by a precision-recall curve.
For each class and IoU threshold t:
1. per image, visit detections from highest score down; each takes the still-unmatched ground
   truth with the highest IoU, if that IoU >= t (a true positive), else it is a false positive;
2. pool the detections of all images, sort by score, and after the k-th one compute
   precision_k = TP_k / k and recall_k = TP_k / #GT;
3. make precision monotone: p_interp(r) = max_{k: recall_k >= r} precision_k;
4. AP = mean of p_interp(r) over the 101 recall levels r = 0, 0.01, ..., 1 (0 where unreached).
mAP averages AP over the classes that have ground truth, and mAP@[.5:.95] also over the ten IoU
thresholds 0.50, 0.55, ..., 0.95.

COCOeval details matched on purpose: IoU without "+1"; a detection matches a gt with IoU >= t
(COCOeval caps t at 1 - 1e-10); among equally good gts the last one wins; only the
`max_detections` (100) highest-scoring detections per image *and class* are kept; score ties
keep the input order (stable sorts, like COCOeval's mergesort); the thresholds are the same
np.linspace values. A class with predictions but no ground truth has no AP and is left out of
the mean (COCOeval marks it -1 and skips it). Not modelled: crowd boxes, area ranges.
"""
from __future__ import annotations

import numpy as np
import torch

from minivl.metrics._checks import check_int, check_real, check_seq, to_tensor
from minivl.metrics.boxes import _iou_union, as_boxes

COCO_IOU_THRESHOLDS = tuple(np.linspace(0.5, 0.95, 10).tolist())
RECALL_LEVELS = np.linspace(0.0, 1.0, 101)  # the 101 points of COCO's interpolated AP


def average_precision(predictions: list[dict], ground_truths: list[dict],
                      iou_thresholds=COCO_IOU_THRESHOLDS, max_detections: int | None = 100) -> dict:
    """COCO-style AP from plain per-image lists.

    predictions[i]: {"boxes": (P, 4) xyxy, "scores": (P,), "labels": (P,) int} for image i.
    ground_truths[i]: {"boxes": (G, 4) xyxy, "labels": (G,) int} for the same image.
    iou_thresholds: averaged for "mAP@[.5:.95]" (default COCO's ten); 0.5 is always evaluated.
    max_detections: keep the top-scoring this many per image and class (COCO: 100); None = all.

    Returns {"AP_per_class": {label: AP averaged over iou_thresholds}, "AP50_per_class": {...},
    "mAP@0.5": float, "mAP@[.5:.95]": float}. Classes without ground truth are absent.
    Raises ValueError when there is no ground-truth box at all (AP would be undefined).
    """
    predictions, ground_truths = check_seq(predictions, "predictions"), check_seq(ground_truths, "ground_truths")
    if len(predictions) != len(ground_truths):
        raise ValueError(f"predictions and ground_truths must list the same images, got "
                         f"{len(predictions)} and {len(ground_truths)}")
    if len(ground_truths) == 0:
        raise ValueError("average_precision needs at least one image, got 0")
    if isinstance(iou_thresholds, (int, float)):  # one threshold is fine; a string is not
        iou_thresholds = [iou_thresholds]
    user_t = [check_real(t, "iou_thresholds entry") for t in check_seq(iou_thresholds, "iou_thresholds")]
    if not user_t or not all(0.0 < t <= 1.0 for t in user_t):
        raise ValueError(f"iou_thresholds must be a non-empty list of values in (0, 1], got {user_t}")
    if max_detections is not None:
        # above any count an image can hold it means "all" (and must still fit an int64 compare)
        max_detections = min(check_int(max_detections, "max_detections (or None)", 1), 1 << 62)
    thresholds = sorted(set(user_t) | {0.5})
    det_img, det_box, det_score, det_label = _flatten(predictions, "predictions", with_scores=True)
    gt_img, gt_box, _, gt_label = _flatten(ground_truths, "ground_truths", with_scores=False)
    if gt_label.numel() == 0:
        raise ValueError("no ground-truth boxes in any image: AP is undefined")
    device = gt_box.device
    det_img, det_box, det_score, det_label = (x.to(device) for x in (det_img, det_box, det_score, det_label))

    # Classes are those with ground truth; detections of other classes can never be TP and
    # COCOeval ignores them, so drop them. Class ids become 0..C-1.
    classes = torch.unique(gt_label)  # (C,) sorted
    known = torch.isin(det_label, classes)
    det_img, det_box, det_score, det_label = det_img[known], det_box[known], det_score[known], det_label[known]
    C = len(classes)
    det_cls, gt_cls = torch.searchsorted(classes, det_label), torch.searchsorted(classes, gt_label)

    # One group per (image, class): matching happens inside a group. Order detections by
    # (group, score desc), ties keeping input order, and keep the top max_detections per group.
    det_group = det_img * C + det_cls
    order = _stable_argsort_keys(det_group, -det_score)
    det_group, det_box, det_score, det_cls = det_group[order], det_box[order], det_score[order], det_cls[order]
    det_rank = _rank_in_group(det_group)
    if max_detections is not None:
        keep = det_rank < max_detections
        det_group, det_box, det_score, det_cls, det_rank = (
            x[keep] for x in (det_group, det_box, det_score, det_cls, det_rank))
    gt_group = gt_img * C + gt_cls
    order = torch.sort(gt_group, stable=True).indices
    gt_group, gt_box = gt_group[order], gt_box[order]
    gt_rank = _rank_in_group(gt_group)

    t = torch.tensor(thresholds, dtype=torch.float64, device=device).clamp_max(1 - 1e-10)
    is_tp = _greedy_match(det_group, det_rank, det_box, gt_group, gt_rank, gt_box, t)  # (T, P)

    # Pool each class over images: sort by (class, score desc); ties keep (image, rank) order.
    order = _stable_argsort_keys(det_cls, -det_score)
    det_cls, is_tp = det_cls[order], is_tp[:, order]
    n_gt = torch.bincount(gt_cls, minlength=C)  # (C,)
    starts = torch.searchsorted(det_cls, torch.arange(C + 1, device=device))  # class segments
    levels = torch.as_tensor(RECALL_LEVELS, device=device)  # (R,)
    ap = torch.zeros(len(thresholds), C, dtype=torch.float64, device=device)  # (T, C)
    for c in range(C):  # one vectorised pass per class, over all thresholds at once
        tp = is_tp[:, starts[c]:starts[c + 1]].double()  # (T, n_c)
        if tp.shape[1] == 0:
            continue  # no detections: precision is 0 at every recall level
        tp_cum = tp.cumsum(1)  # (T, n_c)
        recall = tp_cum / n_gt[c]
        precision = tp_cum / torch.arange(1, tp.shape[1] + 1, device=device)
        envelope = precision.flip(1).cummax(1).values.flip(1)  # max precision at this recall or beyond
        idx = torch.searchsorted(recall, levels.expand(len(thresholds), -1).contiguous())  # (T, R)
        reached = idx < tp.shape[1]
        p_at = envelope.gather(1, idx.clamp_max(tp.shape[1] - 1))
        ap[:, c] = torch.where(reached, p_at, torch.zeros_like(p_at)).mean(1)

    user_rows = [thresholds.index(x) for x in sorted(set(user_t))]
    ap_avg = ap[user_rows].mean(0)  # (C,)
    ap50 = ap[thresholds.index(0.5)]  # (C,)
    labels = classes.tolist()
    return {
        "AP_per_class": dict(zip(labels, ap_avg.tolist())),
        "AP50_per_class": dict(zip(labels, ap50.tolist())),
        "mAP@0.5": ap50.mean().item(),
        "mAP@[.5:.95]": ap_avg.mean().item(),
    }


def _greedy_match(det_group, det_rank, det_box, gt_group, gt_rank, gt_box, thresholds):
    """is_tp (T, P): COCO's greedy matching, run for all groups and thresholds at once.

    Detections and gts are padded into (groups, D, 4) and (groups, G, 4); the only Python loop
    walks the D detection ranks, because detection k may only take what detections < k left.
    """
    T, P = len(thresholds), len(det_group)
    is_tp = torch.zeros(T, P, dtype=torch.bool, device=det_box.device)
    # Only groups holding both detections and gts can produce a match.
    shared = torch.isin(det_group, gt_group)
    if not shared.any():
        return is_tp
    groups = torch.unique(det_group[shared])  # (Ng,)
    gt_in = torch.isin(gt_group, groups)
    d_idx = torch.searchsorted(groups, det_group[shared])  # padded row of each detection
    g_idx = torch.searchsorted(groups, gt_group[gt_in])
    Ng, D, G = len(groups), int(det_rank[shared].max()) + 1, int(gt_rank[gt_in].max()) + 1
    dets = det_box.new_zeros(Ng, D, 4)
    dets[d_idx, det_rank[shared]] = det_box[shared]
    gts = gt_box.new_zeros(Ng, G, 4)
    gts[g_idx, gt_rank[gt_in]] = gt_box[gt_in]
    gt_real = torch.zeros(Ng, G, dtype=torch.bool, device=det_box.device)
    gt_real[g_idx, gt_rank[gt_in]] = True
    det_real = torch.zeros(Ng, D, dtype=torch.bool, device=det_box.device)
    det_real[d_idx, det_rank[shared]] = True

    iou, _ = _iou_union(dets[:, :, None, :], gts[:, None, :, :])  # (Ng, D, G)
    iou = torch.where(gt_real[:, None, :], iou, torch.full_like(iou, -1.0))  # padding never matches
    taken = torch.zeros(T, Ng, G, dtype=torch.bool, device=det_box.device)  # gt already matched
    hit = torch.zeros(T, Ng, D, dtype=torch.bool, device=det_box.device)
    for k in range(D):
        iou_k = iou[:, k, :].unsqueeze(0)  # (1, Ng, G)
        ok = (iou_k >= thresholds[:, None, None]) & ~taken  # (T, Ng, G)
        score = torch.where(ok, iou_k, torch.full_like(ok, -1.0, dtype=iou.dtype))
        best = G - 1 - score.flip(-1).argmax(-1)  # (T, Ng): the *last* maximal gt, as COCOeval
        matched = ok.any(-1) & det_real[:, k]  # (T, Ng)
        taken |= torch.nn.functional.one_hot(best, G).bool() & matched[..., None]
        hit[:, :, k] = matched
    is_tp[:, shared] = hit[:, d_idx, det_rank[shared]]
    return is_tp


def _stable_argsort_keys(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by (primary, secondary), ties keeping the current order."""
    order = torch.sort(secondary, stable=True).indices
    return order[torch.sort(primary[order], stable=True).indices]


def _rank_in_group(sorted_groups: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... within each run of equal values of an already grouped tensor."""
    first = torch.searchsorted(sorted_groups, sorted_groups)  # index where each group starts
    return torch.arange(len(sorted_groups), device=sorted_groups.device) - first


def _flatten(per_image: list[dict], name: str, with_scores: bool):
    """Concatenate per-image dicts into flat tensors: image index, boxes (float64), scores, labels.

    Shapes are checked per image; values (finite, x2 >= x1) once on the concatenation, going back
    to the offending image only to word the error.
    """
    imgs, boxes, scores, labels = [], [], [], []
    keys = ("boxes", "scores", "labels") if with_scores else ("boxes", "labels")
    for i, item in enumerate(per_image):
        if not isinstance(item, dict) or any(k not in item for k in keys):
            raise ValueError(f"{name}[{i}] must be a dict with keys {keys}, got {item!r:.80}")
        b = to_tensor(item["boxes"], f"{name}[{i}]['boxes']", kind="any")  # finiteness: below, once
        if b.dtype == torch.bool:
            raise TypeError(f"{name}[{i}]['boxes'] must hold numbers, got dtype torch.bool")
        b = (b.reshape(0, 4) if b.numel() == 0 else b).double()
        lab = to_tensor(item["labels"], f"{name}[{i}]['labels']", kind="int").reshape(-1)
        s = (to_tensor(item["scores"], f"{name}[{i}]['scores']", kind="any").double().reshape(-1)
             if with_scores else torch.zeros(len(lab)))
        if b.dim() != 2 or b.shape[1] != 4 or not (len(b) == len(lab) == len(s)):
            raise ValueError(f"{name}[{i}]: boxes {tuple(b.shape)}, labels {tuple(lab.shape)}"
                             + (f" and scores {tuple(s.shape)}" if with_scores else "")
                             + " must be (K, 4), (K,)" + (" and (K,)" if with_scores else ""))
        imgs.append(torch.full((len(b),), i, dtype=torch.long, device=b.device))
        boxes.append(b)
        scores.append(s.to(b.device))
        labels.append(lab.long().to(b.device))
    img, box, score, label = torch.cat(imgs), torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    bad = ~torch.isfinite(box).all(1) | (box[:, 2:] < box[:, :2]).any(1)
    if bad.any():
        i = img[bad.nonzero()[0, 0]].item()
        as_boxes(per_image[i]["boxes"], f"{name}[{i}]['boxes']")  # raises with the details
    if with_scores and not torch.isfinite(score).all():
        i = img[(~torch.isfinite(score)).nonzero()[0, 0]].item()
        raise ValueError(f"{name}[{i}]['scores'] contains NaN or infinite values")
    return img, box, score, label
