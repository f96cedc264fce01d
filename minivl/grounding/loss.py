"""The set loss of OWL-ViT / DETR: sigmoid focal loss for the classes, L1 + GIoU for matched boxes.

Follows Carion et al. (2020) for the set loss and Lin et al. (2017), "Focal Loss for Dense Object
Detection", for the class term. After Hungarian matching (`minivl.grounding.matcher`) the matched
patch of object g must answer "yes" to every query that names g (a multi-hot row: "circle",
"red circle" and "the leftmost object" may all be the same object) and every other (patch, query)
pair "no"; only matched patches are asked for a box.

The one idea to take away: with N patches x Q queries and a handful of objects, almost every
pair is an easy negative. Plain BCE lets their sum swamp the few positives; the focal factor
(1 - p_t)^gamma shrinks the loss of pairs already classified well, so the gradient goes to the
hard ones (and alpha rebalances what is left).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minivl import validate
from minivl.grounding.matcher import hungarian_match, match_cost, patch_centres
from minivl.metrics.boxes import box_convert, generalized_box_iou


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Elementwise focal loss (same shape as logits): alpha_t * (1 - p_t)^gamma * BCE. gamma=0 and
    alpha=0.5 give BCE / 2; alpha < 0 turns the weighting off (torchvision's convention)."""
    logits, targets = logits.float(), targets.float()
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def check_targets(target_boxes, target_mask, target_labels, B: int, Q: int):
    """-> checked (boxes (B, G, 4) normalised cxcywh, mask (B, G) bool, labels (B, G, Q))."""
    boxes = validate.tensor("target_boxes", target_boxes, shape=(B, "G", 4), kind="float", finite=True, nonempty=False)
    mask = validate.tensor("target_mask", target_mask, shape=(B, boxes.shape[1]), nonempty=False).bool()
    labels = validate.tensor("target_labels", target_labels, shape=(B, boxes.shape[1], Q), nonempty=False)
    if validate.on_cpu(boxes) and (boxes[..., 2:][mask] < 0).any():
        raise ValueError("target_boxes (normalised cxcywh) have a negative width or height: a box with "
                         "x2 < x1 or y2 < y1 came in (see minivl.grounding.targets.boxes_to_targets)")
    return boxes, mask, labels


def set_loss(logits, pred_boxes, query_mask, target_boxes, target_mask, target_labels, config):
    """-> (loss, logs). logits (B, N, Q); pred_boxes (B, N, 4) normalised cxcywh; query_mask (B, Q)
    True for real queries; targets as `check_targets`. Terms are summed and divided by the number of
    objects in the batch (DETR), then weighted by config.cost_class / cost_l1 / cost_giou."""
    B, N, Q = logits.shape
    query_mask = validate.tensor("query_mask", query_mask, shape=(B, Q)).bool()
    boxes, mask, labels = check_targets(target_boxes, target_mask, target_labels, B, Q)
    boxes, mask, labels = boxes.to(logits.device), mask.to(logits.device), labels.to(logits.device)
    pairs = hungarian_match(match_cost(logits, pred_boxes, query_mask, boxes, labels, config), mask)
    b_idx = torch.cat([torch.full((len(r),), b, dtype=torch.long) for b, (r, _) in enumerate(pairs)]).to(logits.device)
    n_idx = torch.cat([torch.as_tensor(r, dtype=torch.long) for r, _ in pairs]).to(logits.device)
    g_idx = torch.cat([torch.as_tensor(c, dtype=torch.long) for _, c in pairs]).to(logits.device)
    num = max(1, len(b_idx))

    target = torch.zeros_like(logits, dtype=torch.float32)  # (B, N, Q): "no" everywhere ...
    target[b_idx, n_idx] = labels[b_idx, g_idx].float()  # ... but the matched patch answers its object's queries
    focal = sigmoid_focal_loss(logits, target, config.focal_alpha, config.focal_gamma)  # (B, N, Q)
    loss_class = (focal * query_mask[:, None, :]).sum() / num

    pred, tgt = pred_boxes[b_idx, n_idx].float(), boxes[b_idx, g_idx].float()  # (M, 4) each
    if len(pred):
        loss_l1 = (pred - tgt).abs().sum() / num
        giou = generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")).diagonal()
        loss_giou = (1 - giou).sum() / num
    else:  # no object in the batch: only the "no object" class term teaches
        loss_l1 = loss_giou = giou = pred_boxes.sum() * 0
    loss = config.cost_class * loss_class + config.cost_l1 * loss_l1 + config.cost_giou * loss_giou
    logs = {}
    if config.dense_boxes > 0:
        dense = dense_box_loss(pred_boxes, boxes, mask, config)
        loss = loss + config.dense_boxes * dense
        logs["loss_dense_boxes"] = dense.detach()
    return loss, {**logs, "loss_class": loss_class.detach(), "loss_l1": loss_l1.detach(), "loss_giou": loss_giou.detach(),
                  "matched_giou": giou.detach().mean() if len(pred) else giou.detach()}


def dense_box_loss(pred_boxes, target_boxes, target_mask, config) -> torch.Tensor:
    """L1 + GIoU (weighted as the matched terms) of every patch whose centre lies inside an object,
    against that object's box (FCOS-style dense supervision): many box lessons per object and step,
    so whichever patch ends up scoring highest has learnt a tight box too. Objects never overlap in
    Shapes World; where boxes overlap elsewhere the last one wins."""
    B, N, _ = pred_boxes.shape
    c = patch_centres(N, pred_boxes.device)  # (N, 2)
    t = target_boxes.float()  # (B, G, 4) cxcywh
    inside = ((c[None, :, None, :] - t[:, None, :, :2]).abs() < t[:, None, :, 2:] / 2).all(-1)  # (B, N, G)
    inside &= target_mask[:, None, :]
    hit = inside.any(-1)  # (B, N)
    if not hit.any():
        return pred_boxes.sum() * 0
    owner = inside.float().argmax(-1)  # (B, N): the object whose box holds the patch centre
    b_idx, n_idx = hit.nonzero(as_tuple=True)
    pred, tgt = pred_boxes[b_idx, n_idx].float(), t[b_idx, owner[b_idx, n_idx]]  # (M, 4) each
    giou = generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")).diagonal()
    return (config.cost_l1 * (pred - tgt).abs().sum(-1) + config.cost_giou * (1 - giou)).mean()


__all__ = ["dense_box_loss", "sigmoid_focal_loss", "check_targets", "set_loss"]
