"""Plots of the grounding family: detections on images, the box bias, a bipartite matching, the
box_threshold grid, loss terms and the precision-recall curve.

Every function returns a matplotlib Figure (never plt.show()). Boxes come in the format each
function names: `predict`'s normalised cxcywh, or pixel xyxy.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from minivl.viz import _grid, _to_uint8


def _draw_boxes(ax, image, boxes_xyxy, labels=None, colour="white", lw=1.2):
    img = _to_uint8(image)
    ax.imshow(img, extent=(0, img.shape[1], img.shape[0], 0), interpolation="nearest")
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes_xyxy, dtype=float).reshape(-1, 4)):
        c = colour[k] if isinstance(colour, (list, tuple)) else colour
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=c, lw=lw))
        if labels is not None:
            ax.text(x1, y1, labels[k], color="white", fontsize=5, va="bottom",
                    bbox=dict(fc="black", alpha=0.6, pad=0.5, lw=0))
    ax.set_xticks([]), ax.set_yticks([])


def _pixels(boxes_cxcywh, size: int) -> np.ndarray:
    from minivl.metrics.boxes import box_convert
    b = torch.as_tensor(boxes_cxcywh, dtype=torch.float32).reshape(-1, 4)
    return (box_convert(b, "cxcywh", "xyxy") * size).numpy()


def plot_predictions(model, images, caption: str, box_threshold: float = 0.35, text_threshold: float = 0.25,
                     ncols: int = 4):
    """`predict` on each image, its boxes (normalised cxcywh, converted here) labelled 'phrase score'."""
    from minivl.grounding import predict
    results = predict(model, list(images), caption, box_threshold, text_threshold)
    fig, axes = _grid(len(images), ncols, cell=(2.4, 2.4))
    for ax, im, (boxes, logits, phrases) in zip(axes, images, results):
        S = _to_uint8(im).shape[0]
        _draw_boxes(ax, im, _pixels(boxes, S), [f"{p} {s:.2f}" for p, s in zip(phrases, logits.tolist())])
    fig.suptitle(f"predict(caption={caption!r}, box_threshold={box_threshold})", fontsize=8)
    fig.tight_layout()
    return fig


def plot_box_bias(boxes_cxcywh, image=None, size: int = 64, every: int = 1, title: str = "one box per patch"):
    """The boxes every patch predicts (normalised cxcywh (N, 4)), e.g. an untrained model's: the grid bias."""
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    img = image if image is not None else np.zeros((size, size, 3), np.uint8)
    b = _pixels(boxes_cxcywh, size)[::every]
    colours = [f"C{k % 10}" for k in range(len(b))]
    _draw_boxes(ax, img, b, colour=colours, lw=0.8)
    centres = (b[:, :2] + b[:, 2:]) / 2
    ax.scatter(centres[:, 0], centres[:, 1], s=4, c=colours)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("x (pixels)"), ax.set_ylabel("y (pixels)")
    fig.tight_layout()
    return fig


def plot_matching(image, pred_boxes_xyxy, target_boxes_xyxy, pairs, cost=None):
    """A bipartite matching: every predicted box faint, matched ones bold with a line to their target;
    with `cost` (N, G), the cost matrix beside it, matched cells marked."""
    rows, cols = (np.asarray(p) for p in pairs)
    ncols = 2 if cost is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(3.4 * ncols, 3.2))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    pred, tgt = np.asarray(pred_boxes_xyxy, float), np.asarray(target_boxes_xyxy, float)
    _draw_boxes(ax, image, pred, colour="gray", lw=0.3)
    for k, (r, c) in enumerate(zip(rows, cols)):
        col = f"C{k % 10}"
        _draw_boxes(ax, image, pred[r:r + 1], colour=col, lw=1.5)
        _draw_boxes(ax, image, tgt[c:c + 1], colour="white", lw=1.0)
        a, b = (pred[r, :2] + pred[r, 2:]) / 2, (tgt[c, :2] + tgt[c, 2:]) / 2
        ax.plot([a[0], b[0]], [a[1], b[1]], color=col, lw=1)
    ax.set_title("one patch per object (Hungarian)", fontsize=8)
    if cost is not None:
        c = np.asarray(cost, float)
        im = axes[1].imshow(c.T, aspect="auto", cmap="viridis")
        axes[1].scatter(rows, cols, marker="x", color="red", s=30, label="matched")
        axes[1].set_xlabel("patch"), axes[1].set_ylabel("object")
        axes[1].set_title("matching cost", fontsize=8)
        axes[1].legend(fontsize=6)
        fig.colorbar(im, ax=axes[1], label="cost")
    fig.tight_layout()
    return fig


def plot_threshold_grid(model, image, caption: str, thresholds=(0.1, 0.2, 0.35, 0.5, 0.7, 0.9)):
    """The same image under several box_threshold values: the 'slider' as a grid of panels."""
    from minivl.grounding import predict
    S = _to_uint8(image).shape[0]
    fig, axes = _grid(len(thresholds), min(3, len(thresholds)), cell=(2.4, 2.4))
    for ax, t in zip(axes, thresholds):
        boxes, logits, phrases = predict(model, image, caption, box_threshold=t, text_threshold=min(t, 0.25))
        _draw_boxes(ax, image, _pixels(boxes, S), [f"{p} {s:.2f}" for p, s in zip(phrases, logits.tolist())])
        ax.set_title(f"box_threshold={t}: {len(boxes)} boxes", fontsize=7)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_terms(curves: dict, title: str = "grounding set loss"):
    """curves: {"step": [...], "loss": [...], "loss_class": [...], ...}: one line per term, log scale."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for k, v in curves.items():
        if k != "step" and v and all(x is not None for x in v):
            ax.plot(curves["step"], v, label=k)
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("loss (log)"), ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_pr_curve(curve: dict, title: str = "precision-recall, IoU 0.5"):
    """curve: `minivl.grounding.precision_recall_curve`'s dict."""
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.plot(curve["recall"], curve["precision"])
    ax.set_xlabel("recall"), ax.set_ylabel("precision"), ax.set_xlim(0, 1.01), ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


__all__ = ["plot_predictions", "plot_box_bias", "plot_matching", "plot_threshold_grid", "plot_loss_terms",
           "plot_pr_curve"]
