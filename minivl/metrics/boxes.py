"""Box geometry: format conversions, IoU, generalised IoU and referring-expression accuracy.

Boxes are pixel coordinates. The canonical format is xyxy with x1, y1 inclusive and x2, y2
exclusive, so a box's area is (x2 - x1) * (y2 - y1) with no "+1" (the convention of modern
pycocotools and torchvision; the original PASCAL VOC code added 1).

The one idea: IoU = |A ∩ B| / |A ∪ B| compares boxes independently of scale, but it is flat (0)
for every pair of disjoint boxes, so it gives a regressor no gradient. Generalised IoU
(Rezatofighi et al., 2019) subtracts the fraction of the smallest enclosing box C that the two
boxes leave empty:  GIoU = IoU - |C \\ (A ∪ B)| / |C|,  which lies in (-1, 1] and keeps
decreasing as disjoint boxes move apart.

Defined values (never NaN): the IoU of two boxes whose union has zero area (two zero-area boxes)
is 0; the GIoU correction term is 0 when the enclosing box has zero area.
"""
from __future__ import annotations

import torch

from minivl.metrics._checks import check_real, to_tensor

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def as_boxes(boxes, name: str = "boxes", fmt: str = "xyxy") -> torch.Tensor:
    """`boxes` as a floating tensor (..., 4), checked: finite, and x2 >= x1, y2 >= y1 (or w, h >= 0).

    Zero-area boxes are allowed; inverted ones raise ValueError, naming the first offender
    (never clamped: a box with x2 < x1 and y2 < y1 would otherwise get a positive area).
    """
    t = to_tensor(boxes, name)  # real, finite; ints -> float32; bool/complex/str rejected
    if t.dim() == 0 or t.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(t.shape)}")
    if fmt == "xyxy":
        size = t[..., 2:] - t[..., :2]  # (..., 2)  w, h
        what = "x2 >= x1 and y2 >= y1"
    else:
        size = t[..., 2:]
        what = "width >= 0 and height >= 0"
    bad = (size < 0).any(-1)
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise ValueError(f"{name} ({fmt}) must satisfy {what}; box {idx} is {t[idx].tolist()}")
    return t


def box_convert(boxes, in_fmt: str, out_fmt: str) -> torch.Tensor:
    """Convert (..., 4) boxes between "xyxy" (corners), "xywh" (top-left corner + size, COCO's
    format) and "cxcywh" (centre + size, DETR's and OWL-ViT's regression target)."""
    for fmt in (in_fmt, out_fmt):
        if not isinstance(fmt, str) or fmt not in BOX_FORMATS:
            raise ValueError(f"box format must be one of {BOX_FORMATS}, got {fmt!r}")
    b = as_boxes(boxes, fmt=in_fmt)
    if in_fmt == out_fmt:
        return b.clone()
    # go through xyxy: two conversions instead of six
    if in_fmt == "xywh":
        b = torch.cat([b[..., :2], b[..., :2] + b[..., 2:]], dim=-1)
    elif in_fmt == "cxcywh":
        b = torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], dim=-1)
    if out_fmt == "xywh":
        b = torch.cat([b[..., :2], b[..., 2:] - b[..., :2]], dim=-1)
    elif out_fmt == "cxcywh":
        b = torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], dim=-1)
    return b


def box_area(boxes) -> torch.Tensor:
    """Area (...,) of xyxy boxes (..., 4): (x2 - x1) * (y2 - y1). Inverted boxes raise ValueError
    (both sides inverted would multiply to a positive, silently wrong, area)."""
    return _area(as_boxes(boxes))


def _area(b: torch.Tensor) -> torch.Tensor:  # unchecked: for boxes as_boxes has already seen
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0; the clamp keeps gradients finite in the masked branch."""
    tiny = torch.finfo(den.dtype).tiny
    return torch.where(den > 0, num / den.clamp_min(tiny), torch.zeros_like(num))


def _iou_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of xyxy boxes a (..., 4) and b (..., 4), broadcast against each other.

    Same arithmetic as pycocotools' bbIou: inter = max(0, w) * max(0, h), union = A + B - inter.
    """
    top_left = torch.maximum(a[..., :2], b[..., :2])  # (..., 2)
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])  # (..., 2)
    wh = (bottom_right - top_left).clamp_min(0)  # (..., 2)
    inter = wh[..., 0] * wh[..., 1]  # (...)
    union = _area(a) + _area(b) - inter  # (...)
    return _safe_divide(inter, union), union


def box_iou(boxes_a, boxes_b) -> torch.Tensor:
    """Pairwise IoU (N, M) of xyxy boxes (N, 4) and (M, 4).

    IoU(A, B) = |A ∩ B| / (|A| + |B| - |A ∩ B|), and 0 when the union is empty.
    """
    a, b = _pair(boxes_a, boxes_b)
    iou, _ = _iou_union(a[:, None, :], b[None, :, :])  # (N, M)
    return iou


def generalized_box_iou(boxes_a, boxes_b) -> torch.Tensor:
    """Pairwise generalised IoU (N, M) of xyxy boxes (N, 4) and (M, 4).

    GIoU(A, B) = IoU - (|C| - |A ∪ B|) / |C|, with C the smallest box enclosing A and B.
    Differentiable; use 1 - GIoU as a box-regression loss (DETR, OWL-ViT).
    """
    a, b = _pair(boxes_a, boxes_b)
    return giou_broadcast(a[:, None, :], b[None, :, :])  # (N, M)


def giou_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of xyxy boxes a (..., 4) and b (..., 4), broadcast against each other, *unchecked*: for a
    hot path whose boxes are valid by construction (a matcher's every step). Checked pairwise: above."""
    iou, union = _iou_union(a, b)  # (...)
    enclose = _area(torch.cat([torch.minimum(a[..., :2], b[..., :2]),
                                  torch.maximum(a[..., 2:], b[..., 2:])], dim=-1))  # (...)
    return iou - _safe_divide(enclose - union, enclose)


def _pair(boxes_a, boxes_b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_boxes(boxes_a, "boxes_a"), as_boxes(boxes_b, "boxes_b")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"expected boxes (N, 4) and (M, 4), got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def referring_accuracy(pred_boxes, gt_boxes, thresh: float = 0.5) -> float:
    """Referring-expression comprehension accuracy (RefCOCO's "Acc@0.5").

    One predicted box per expression; it counts as correct when IoU(pred_i, gt_i) >= thresh.
    accuracy = (1/N) * sum_i [IoU(pred_i, gt_i) >= thresh]
    """
    pred, gt = as_boxes(pred_boxes, "pred_boxes"), as_boxes(gt_boxes, "gt_boxes")
    if pred.dim() != 2 or pred.shape != gt.shape:
        raise ValueError(f"pred_boxes and gt_boxes must both be (N, 4), got {tuple(pred.shape)} "
                         f"and {tuple(gt.shape)}")
    if pred.shape[0] == 0:
        raise ValueError("referring_accuracy needs at least one expression, got 0 boxes")
    if not 0.0 < check_real(thresh, "thresh") <= 1.0:
        raise ValueError(f"thresh must be in (0, 1], got {thresh}")
    dtype = torch.promote_types(pred.dtype, gt.dtype)
    iou, _ = _iou_union(pred.to(dtype), gt.to(dtype))  # (N,) paired, not N x N
    return (iou >= thresh).double().mean().item()
