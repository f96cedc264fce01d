"""Classification metrics: top-k accuracy and the confusion matrix.

The ImageNet protocol (Russakovsky et al., 2015): a prediction is top-k correct when the true
class is among the k highest-scoring classes; CLIP's zero-shot classifier (Radford et al., 2021)
is scored the same way, with text prompts as the classes.

The one idea: accuracy is a single number; the confusion matrix says *which* classes get mixed
up (for Shapes World: colour or shape?), which is what you need to improve a model.

Ties count against the model: the target is top-k correct when fewer than k other classes score
at least as high, so constant logits give 0 top-1 accuracy, not a lucky 1/C.
"""
from __future__ import annotations

import torch

from minivl.metrics._checks import check_int, check_ks, to_tensor


def _targets(targets, n: int, num_classes: int, name: str = "targets", per: str = "row of logits") -> torch.Tensor:
    t = to_tensor(targets, name, kind="any")
    t = t.long() if t.numel() == 0 and t.dim() == 1 else t  # [] arrives as float32
    if t.dim() != 1 or len(t) != n:
        raise ValueError(f"{name} must be a 1-D tensor of length {n} (one per {per}), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    if n and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"{name} must be in [0, {num_classes}), got values in "
                         f"[{t.min().item()}, {t.max().item()}]")
    return t.long()


def topk_accuracy(logits, targets, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy for each k in ks: {"top1": ..., "top5": ...}, fractions in [0, 1].

    top-k = (1/N) * sum_i [ #{c != y_i : logit_ic >= logit_iy_i} < k ]
    logits: (N, C) scores (any monotone transform: probabilities work too); targets: (N,) ints.
    """
    x = to_tensor(logits, "logits")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty (N, C) matrix, got shape {tuple(x.shape)}")
    N, C = x.shape
    y = _targets(targets, N, C).to(x.device)
    ks = check_ks(ks, "ks", hi=C)  # k > C would be a trivially perfect score
    target_score = x.gather(1, y[:, None])  # (N, 1)
    rivals = (x >= target_score).sum(1) - 1  # (N,) other classes scoring at least as high
    return {f"top{k}": (rivals < k).double().mean().item() for k in ks}


def confusion_matrix(preds, targets, num_classes: int) -> torch.Tensor:
    """Counts (C, C) LongTensor: entry [t, p] = how many samples of true class t were predicted p.

    Rows are the truth, columns the prediction; the diagonal holds the correct ones, so
    accuracy = trace / sum and per-class recall = diagonal / row sums. Empty inputs give zeros.
    """
    num_classes = check_int(num_classes, "num_classes", 1)
    p = to_tensor(preds, "preds", kind="any")
    if p.dim() != 1:
        raise ValueError(f"preds must be a 1-D tensor of class indices, got shape {tuple(p.shape)}")
    p = _targets(p, len(p), num_classes, name="preds", per="prediction")
    t = _targets(targets, len(p), num_classes, per="entry of preds").to(p.device)
    flat = t * num_classes + p  # one bin per (true, predicted) pair
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)
