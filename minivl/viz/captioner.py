"""Plots of the captioner family: loss per objective, captions under their images, cross-attention maps.

The one idea to take away: a caption is only checked by looking at the picture, so every plot
here puts the words next to the pixels they came from.
"""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np

from minivl.viz import savefig  # noqa: F401 (re-exported: recipes save through this module)


def plot_objective_curves(train_log: list[dict], keys=("itc", "itm", "lm", "loss"), smooth: int = 5):
    """Each objective's training loss against the step (History.train records), smoothed over `smooth` logs."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [r["step"] for r in train_log]
    for k in keys:
        if train_log and k in train_log[0]:  # ITC/ITM records stop where an LM-only fine-tune starts
            v = np.array([r.get(k, np.nan) for r in train_log], dtype=float)
            if smooth > 1 and len(v) >= smooth:
                v = np.convolve(v, np.ones(smooth) / smooth, mode="valid")
            ax.plot(steps[len(steps) - len(v):], v, label="total" if k == "loss" else k.upper(), lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("BLIP objectives: ITC + ITM + LM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def show_captions(images, captions, references=None, marks=None, ncols: int = 4, title: str | None = None):
    """Images in a grid, each with its caption drawn under it (green/red by `marks`: true or false),
    and a reference caption in grey when given."""
    n = len(images)
    if n == 0 or len(captions) != n:
        raise ValueError(f"need one caption per image, got {len(captions)} captions for {n} images")
    rows = (n + ncols - 1) // ncols
    texts = []
    for i in range(n):
        text = textwrap.wrap(captions[i], 40)
        if references is not None:
            text += textwrap.wrap("ref: " + references[i], 40)
        texts.append("\n".join(text))
    # room under each image for its longest text (7 pt lines, ~0.13 in each), so no caption runs into the next row
    below = 0.13 * max(t.count("\n") + 1 for t in texts) + 0.1  # inches
    side = 3.0  # inches per image
    fig, axes = plt.subplots(rows, ncols, figsize=(side * ncols, (side + below) * rows + (0.4 if title else 0.1)),
                             squeeze=False, gridspec_kw=dict(hspace=below / side, wspace=0.06))
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, img) in enumerate(zip(axes.flat, images)):
        ax.imshow(np.asarray(img), interpolation="nearest")
        color = "black" if marks is None else ("tab:green" if marks[i] else "tab:red")
        ax.text(0.5, -0.02, texts[i], transform=ax.transAxes, ha="center", va="top", fontsize=7, color=color)
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=below / height, top=1 - (0.4 if title else 0.1) / height)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_word_attention(image, words, maps, ncols: int = 6, title: str | None = None):
    """Cross-attention of each generated word over the patches: maps (T, grid, grid), words (T,)."""
    maps = np.asarray(maps, dtype=float)
    if maps.ndim != 3 or len(words) != len(maps):
        raise ValueError(f"need maps (T, grid, grid) with one word each, got {maps.shape} and {len(words)} words")
    n = len(words) + 1
    rows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(rows, ncols, figsize=(2.0 * ncols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    img = np.asarray(image)
    H, W = img.shape[:2]
    axes.flat[0].imshow(img, interpolation="nearest")
    axes.flat[0].set_title("image", fontsize=8)
    for ax, w, m in zip(list(axes.flat)[1:], words, maps):
        ax.imshow(img, interpolation="nearest")
        im = ax.imshow(m, cmap="inferno", alpha=0.6, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
        ax.set_title(repr(w.strip()), fontsize=8)
    fig.colorbar(im, ax=list(axes.flat), fraction=0.02, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


__all__ = ["plot_objective_curves", "show_captions", "plot_word_attention", "savefig"]
