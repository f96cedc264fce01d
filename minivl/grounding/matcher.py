"""Bipartite matching of per-patch predictions to ground-truth objects, as DETR and OWL-ViT train.

Follows "End-to-End Object Detection with Transformers" (Carion et al., 2020), the matcher OWL-ViT
(Minderer et al., 2022) reuses. Every patch predicts a box, so an image with G objects has N >> G
predictions. Each object is assigned to exactly one patch - the assignment of least total cost,
found by the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`) - with

    cost[n, g] = w_class * focal_cost(patch n, the queries object g answers)
               + w_l1 * |box_n - box_g|_1 + w_giou * (-GIoU(box_n, box_g)).

The one idea to take away: matching is *one-to-one*. If every patch that overlaps an object were
told "you are that object", the detector would learn to fire many duplicates and need NMS; with a
bipartite assignment exactly one patch is rewarded per object and all others learn "no object", so
the ranking of scores - what AP measures - is clean without any post-processing.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from minivl.metrics.boxes import giou_broadcast  # the one GIoU arithmetic, unchecked (hot path)


def focal_cost(logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """(.., Q) logits -> (.., Q) cost of calling each pair positive, minus that of calling it negative
    (Deformable DETR's focal matching cost): low where the model already says "yes"."""
    p = logits.float().sigmoid()
    neg = (1 - alpha) * p.pow(gamma) * -(1 - p + 1e-8).log()
    pos = alpha * (1 - p).pow(gamma) * -(p + 1e-8).log()
    return pos - neg


def pairwise_giou(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """GIoU (B, N, G) of every predicted box (B, N, 4) with every target (B, G, 4) of its own image;
    both normalised cxcywh. One broadcast over the batch (B images x N patches x G targets) with the
    arithmetic of `minivl.metrics.boxes.generalized_box_iou`, minus its input checks: the matcher runs
    every step, and a loop of checked per-image calls cost about a sixth of a cpu training step."""
    xyxy = lambda b: torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)  # noqa: E731
    return giou_broadcast(xyxy(pred_boxes)[:, :, None], xyxy(target_boxes)[:, None])  # (B, N, 1, 4) x (B, 1, G, 4) -> (B, N, G)


def patch_centres(N: int, device=None) -> torch.Tensor:
    """(N, 2) normalised (x, y) centres of a square grid of N patches, row-major as the ViT's."""
    g = int(round(N ** 0.5))
    steps = (torch.arange(g, dtype=torch.float32, device=device) + 0.5) / g
    ys, xs = torch.meshgrid(steps, steps, indexing="ij")  # (g, g) each
    return torch.stack([xs, ys], -1).reshape(N, 2)


@torch.no_grad()
def match_cost(logits, pred_boxes, query_mask, target_boxes, target_labels, config) -> torch.Tensor:
    """The matching cost (B, N, G): class (mean focal cost over the object's queries), L1, -GIoU."""
    labels = target_labels.float() * query_mask[:, None, :].float()  # (B, G, Q): padding answers nothing
    per_pair = focal_cost(logits, config.focal_alpha, config.focal_gamma)  # (B, N, Q)
    cls = torch.einsum("bnq,bgq->bng", per_pair, labels) / labels.sum(-1).clamp_min(1)[:, None, :]  # (B, N, G)
    l1 = torch.cdist(pred_boxes.float(), target_boxes.float(), p=1)  # (B, N, G)
    giou = pairwise_giou(pred_boxes.float(), target_boxes.float())  # (B, N, G)
    cost = config.cost_class * cls + config.cost_l1 * l1 - config.cost_giou * giou
    if getattr(config, "cost_center", 0.0) > 0:  # where the patch sits, not what it predicts: a stable choice
        centres = patch_centres(pred_boxes.shape[1], pred_boxes.device)  # (N, 2)
        cost = cost + config.cost_center * torch.cdist(centres[None].expand(len(target_boxes), -1, -1),
                                                       target_boxes[..., :2].float(), p=1)
    return cost


def hungarian_match(cost: torch.Tensor, target_mask: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, (patch indices, target indices) of the least-cost one-to-one assignment of its real
    targets (target_mask (B, G) True) to patches; cost (B, N, G). One host transfer for the batch."""
    cost, mask = cost.detach().cpu().numpy(), target_mask.detach().cpu().numpy().astype(bool)
    out = []
    for c, m in zip(cost, mask):
        real = np.flatnonzero(m)
        rows, cols = linear_sum_assignment(c[:, real])  # rows: patches, cols: positions among the real targets
        out.append((rows, real[cols]))
    return out


__all__ = ["patch_centres", "focal_cost", "pairwise_giou", "match_cost", "hungarian_match"]
