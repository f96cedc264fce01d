"""Plots shared by every notebook and recipe: image grids with boxes, curves, attention maps,
similarity and confusion matrices.

Every function returns a matplotlib Figure and never calls plt.show(), so the same call works
in a notebook (the figure displays itself), in a script (`savefig`) and in a headless test.
The idea to take away: look at the data and at what the model attends to before trusting a metric.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def _array(x, name: str, dtype=np.float32, finite: bool = True) -> np.ndarray:
    """`x` (tensor, array or nested list) as a NumPy array of real numbers, never empty or NaN:
    matplotlib draws NaN as a blank cell and bools as 0/1 without a word."""
    if x is None or isinstance(x, (str, bytes, dict)):
        raise TypeError(f"{name} must be an array or tensor of numbers, got {type(x).__name__}")
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
        if a.dtype == bool or a.dtype.kind not in "uif":
            raise TypeError(f"dtype {a.dtype}")
        a = a.astype(dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must hold real numbers, got {type(x).__name__} ({e})") from None
    if a.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {a.shape}")
    if finite and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _sized(x, name: str) -> list:
    """A list-like argument (one entry per image / map / class), never a string or None."""
    try:
        if x is None or isinstance(x, (str, bytes, dict)):
            raise TypeError
        len(x)  # 0-d arrays and tensors have __len__ but no length
    except TypeError:
        raise TypeError(f"{name} must be a list, got {type(x).__name__} {x!r:.40}") from None
    return x


def _count(x, name: str, lo: int = 1) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r:.40}")
    if x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return int(x)


def _to_uint8(img, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 from a uint8 array or a (3, H, W) float tensor/array in [-1, 1]."""
    raw = img.detach().cpu().numpy() if hasattr(img, "detach") else img
    if isinstance(raw, np.ndarray) and raw.dtype == np.uint8:
        img = raw
    else:
        img = _array(raw, name)
    if img.ndim != 3:
        raise ValueError(f"expected one image (H, W, 3) uint8 or (3, H, W) float, got shape {img.shape}")
    if img.dtype == np.uint8:
        if img.shape[-1] != 3 or img.size == 0:
            raise ValueError(f"uint8 images must be (H, W, 3), got {img.shape}")
        return img
    if img.shape[0] != 3:
        raise ValueError(f"float images must be (3, H, W) in [-1, 1], got {img.shape}")
    if img.size == 0 or img.min() < -1.5 or img.max() > 1.5:  # [0, 255] floats would all clip to white
        raise ValueError(f"{name}: float images must be (3, H, W) in [-1, 1], got values in "
                         f"[{img.min() if img.size else 0:.3g}, {img.max() if img.size else 0:.3g}] (shape {img.shape})")
    return np.clip((img.transpose(1, 2, 0) * 0.5 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8)


def _grid(n: int, ncols: int, cell=(2.0, 2.0)):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell[0] * ncols, cell[1] * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


def show_images(images, titles=None, boxes=None, box_labels=None, ncols: int = 8, title_size: int = 7,
                wrap: int | None = 30):
    """A grid of images; optional titles (wrapped to `wrap` characters per line) and per-image
    xyxy boxes (with labels) drawn on top.

    images: a list of (H, W, 3) uint8 arrays or (3, H, W) tensors in [-1, 1], or a batch of either.
    boxes[i]: the boxes of image i, pixel xyxy (x2, y2 exclusive); box_labels[i]: one string per box.
    """
    images = [_to_uint8(im, f"images[{i}]") for i, im in enumerate(_sized(images, "images"))]
    n = len(images)
    if n == 0:
        raise ValueError("show_images needs at least one image")
    ncols = _count(ncols, "ncols")
    for name, extra in (("titles", titles), ("boxes", boxes), ("box_labels", box_labels)):
        if extra is not None and len(_sized(extra, name)) != n:
            raise ValueError(f"{name} has {len(extra)} entries for {n} images")
    if titles is not None:
        titles = [str(t) for t in titles]
        if wrap:
            wrap = _count(wrap, "wrap")
            titles = ["\n".join(w for line in t.split("\n") for w in textwrap.wrap(line, wrap) or [""]) for t in titles]
    if boxes is not None:  # checked before a figure exists, so a bad box leaks no figure
        boxes = [np.zeros((0, 4)) if len(_sized(b, f"boxes[{i}]")) == 0 else _array(b, f"boxes[{i}]")
                 for i, b in enumerate(boxes)]
        for i, b in enumerate(boxes):
            if b.ndim != 2 or b.shape[1] != 4:
                raise ValueError(f"boxes[{i}] must be (K, 4) pixel xyxy, got shape {b.shape}")
    lines = max(t.count("\n") + 1 for t in titles) if titles is not None else 0
    fig, axes = _grid(n, ncols, cell=(2.0, 2.0 + 0.16 * lines * title_size / 7))
    for i, (ax, im) in enumerate(zip(axes, images)):
        ax.imshow(im, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=title_size)
        for j, b in enumerate(boxes[i] if boxes is not None else []):
            x1, y1, x2, y2 = (float(v) for v in b)
            # pixel k covers [k - 0.5, k + 0.5] in imshow coordinates
            ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="white", lw=1))
            if box_labels is not None and j < len(box_labels[i]):
                top = y1 < 0.1 * im.shape[0]  # no room above: write inside the box
                ax.text(x1 - 0.5, y1 - 0.5 if top else y1 - 1, box_labels[i][j], color="white", fontsize=5,
                        va="top" if top else "bottom", bbox=dict(fc="black", alpha=0.5, pad=0.5, lw=0))
    fig.tight_layout()
    return fig


def show_image_texts(images, texts, marks=None, title: str | None = None, text_size: int = 8, wrap: int = 70):
    """One row per image: the image, then its list of texts (e.g. the top retrieved captions, ranked).

    texts[i]: the strings shown beside image i, in order. marks[i][j] (optional): True draws text j
    green with a check mark, False red with a cross (right / wrong answers).
    """
    images = [_to_uint8(im, f"images[{i}]") for i, im in enumerate(_sized(images, "images"))]
    n = len(images)
    if n == 0:
        raise ValueError("show_image_texts needs at least one image")
    if len(_sized(texts, "texts")) != n or (marks is not None and len(_sized(marks, "marks")) != n):
        raise ValueError(f"need one list of texts (and of marks) per image: {n} images, {len(texts)} text lists"
                         + ("" if marks is None else f", {len(marks)} mark lists"))
    for i in range(n):  # before any figure exists
        _sized(texts[i], f"texts[{i}]")
        if marks is not None and len(_sized(marks[i], f"marks[{i}]")) != len(texts[i]):
            raise ValueError(f"image {i}: {len(texts[i])} texts but {len(marks[i])} marks")
    fig, axes = plt.subplots(n, 2, figsize=(9, 1.6 * n), squeeze=False, gridspec_kw=dict(width_ratios=[1, 4.5]))
    for i, (im, lines) in enumerate(zip(images, texts)):
        if marks is not None and len(marks[i]) != len(lines):
            raise ValueError(f"image {i}: {len(lines)} texts but {len(marks[i])} marks")
        axes[i][0].imshow(im, interpolation="nearest")
        axes[i][1].set_xlim(0, 1)
        axes[i][1].set_ylim(0, 1)
        for ax in axes[i]:
            ax.axis("off")
        for j, line in enumerate(lines):
            mark = None if marks is None else bool(marks[i][j])
            prefix = "" if mark is None else ("\u2713 " if mark else "\u2717 ")
            color = "black" if mark is None else ("tab:green" if mark else "tab:red")
            wrapped = "\n   ".join(textwrap.wrap(prefix + str(line), wrap)) or prefix
            axes[i][1].text(0.0, 1 - (j + 0.5) / max(len(lines), 1), wrapped, va="center", ha="left",
                            fontsize=text_size, color=color)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_loss_curve(history: dict, title: str | None = None, log_y: bool = False):
    """Training loss against step, plus any `val_*` series (x from `val_step` when given)."""
    if not isinstance(history, dict):
        raise TypeError(f"history must be a dict of lists ('step', 'loss', ...), got {type(history).__name__}")
    if "step" not in history or "loss" not in history:
        raise ValueError(f"history needs 'step' and 'loss' lists, got keys {sorted(history)}")
    for key, values in history.items():  # series of real numbers; NaN allowed: a diverged run is worth a plot
        if key in ("step", "loss") or key.startswith("val_"):
            if len(_sized(values, f"history[{key!r}]")) and _array(values, f"history[{key!r}]", finite=False).ndim != 1:
                raise ValueError(f"history[{key!r}] must be a flat list of numbers")
    if len(history["step"]) != len(history["loss"]):
        raise ValueError(f"'step' has {len(history['step'])} entries but 'loss' has {len(history['loss'])}")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["step"], history["loss"], label="train loss", lw=1)
    for key, values in history.items():
        if key.startswith("val_") and key != "val_step":
            if "val_step" in history:
                steps = history["val_step"]
            elif len(values) == len(history["step"]):
                steps = history["step"]
            else:  # evaluated at evenly spaced points over the run
                steps = np.linspace(history["step"][0], history["step"][-1], len(values))
            ax.plot(steps, values, "o-", ms=3, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_attention_maps(image, attn, grid_size: int | None = None, titles=None, ncols: int = 5):
    """The image, then one attention map per row of `attn` (heads or layers) over the patch grid.

    attn: (K, N) with N = grid_size**2 patch weights, or N = grid_size**2 + 1 when a leading
    CLS token is included (it is dropped). Maps are upsampled over the image with nearest pixels.
    """
    img = _to_uint8(image)
    attn = _array(attn, "attn")
    ncols = _count(ncols, "ncols")
    if grid_size is not None:
        grid_size = _count(grid_size, "grid_size")
    if attn.ndim == 1:
        attn = attn[None]
    if attn.ndim != 2:
        raise ValueError(f"attn must be (K maps, N patches), got shape {attn.shape}")
    g = grid_size or math.isqrt(attn.shape[1])
    if attn.shape[1] == g * g + 1:
        attn = attn[:, 1:]
    if attn.shape[1] != g * g:
        raise ValueError(f"attn has {attn.shape[1]} entries per map; expected grid_size**2 = {g * g} (+1 for CLS)")
    if titles is not None and len(_sized(titles, "titles")) != len(attn):
        raise ValueError(f"titles has {len(titles)} entries for {len(attn)} maps")
    fig, axes = _grid(len(attn) + 1, ncols)
    axes[0].imshow(img, interpolation="nearest")
    axes[0].set_title("image", fontsize=8)
    H, W = img.shape[:2]
    for k, (ax, a) in enumerate(zip(axes[1:], attn)):
        ax.imshow(img, interpolation="nearest")
        ax.imshow(a.reshape(g, g), cmap="inferno", alpha=0.6, extent=(-0.5, W - 0.5, H - 0.5, -0.5),
                  interpolation="nearest")
        ax.set_title(titles[k] if titles is not None else f"map {k}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_similarity_matrix(sim, row_labels=None, col_labels=None, images=None, title: str | None = None):
    """Heatmap of an (N, M) similarity matrix (e.g. texts x images), values printed when small.
    `images` (M of them) are drawn as thumbnails above their columns, as in the CLIP paper."""
    sim = _array(sim, "sim")
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (N, M), got shape {sim.shape}")
    N, M = sim.shape
    for name, labels, want in (("row_labels", row_labels, N), ("col_labels", col_labels, M), ("images", images, M)):
        if labels is not None and len(_sized(labels, name)) != want:
            raise ValueError(f"{name} has {len(labels)} entries, expected {want} for sim of shape {sim.shape}")
    thumbs = [_to_uint8(img, f"images[{j}]") for j, img in enumerate(images if images is not None else [])]  # before any figure exists
    label_in = 0.055 * max((len(str(r)) for r in row_labels), default=0) if row_labels is not None else 0.3
    # widen by the longest row label (about 0.055 in per character at fontsize 7) so captions never squash the cells
    fig, ax = plt.subplots(figsize=(1.5 + label_in + 0.55 * M, 1.2 + 0.45 * N + 0.6 * (images is not None)))
    im = ax.imshow(sim, cmap="viridis", aspect="auto")
    if N * M <= 400:
        for i in range(N):
            for j in range(M):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if sim[i, j] < sim.mean() else "black")
    ax.set_yticks(range(N), row_labels if row_labels is not None else range(N), fontsize=7)
    if col_labels is not None or images is None:
        ax.set_xticks(range(M), col_labels if col_labels is not None else range(M), fontsize=7, rotation=90)
    else:
        ax.set_xticks([])
    for j, img in enumerate(thumbs):
        # one cell wide; height in axes units so the thumbnail is about square (cells are 0.55 x 0.45 in)
        sub = ax.inset_axes([j / M, 1.02, 1 / M, 1.2 / N])
        sub.imshow(img, interpolation="nearest")
        sub.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.04)
    if title:
        ax.set_title(title, pad=60 if images is not None else 6)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm, labels, normalize: bool = True, title: str | None = None):
    """Rows: true class, columns: predicted class; rows normalised to sum to 1 when `normalize`.

    Rows with no sample at all (a class the test set does not hold, e.g. a held-out pair in a
    seen-pairs test) are greyed and their label says so, so an empty row is not read as an error.
    """
    cm = _array(cm, "cm", dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(_sized(labels, "labels")):
        raise ValueError(f"cm must be square (K, K) with K = len(labels) = {len(labels)}, got {cm.shape}")
    if (cm < 0).any():
        raise ValueError("cm holds counts: negative entries are not a confusion matrix")
    empty = cm.sum(1) == 0
    if normalize:
        cm = cm / np.maximum(cm.sum(1, keepdims=True), 1e-12)
    K = len(labels)
    size = 8 if K > 20 else 7  # readable at 30-35 classes: the figure grows with K instead of the font shrinking
    fig, ax = plt.subplots(figsize=(2.5 + 0.32 * K, 2.0 + 0.32 * K))
    im = ax.imshow(np.ma.masked_where(np.repeat(empty[:, None], K, 1), cm), cmap="Blues", vmin=0)
    if empty.any():
        ax.imshow(np.where(np.repeat(empty[:, None], K, 1), 1.0, np.nan), cmap="Greys", vmin=0, vmax=4)
    if K <= 20:
        for i in range(K):
            for j in range(K):
                if cm[i, j]:
                    ax.text(j, i, f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}", ha="center",
                            va="center", fontsize=6, color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(K), labels, rotation=90, fontsize=size)
    ax.set_yticks(range(K), [f"{label} (no samples)" if e else label for label, e in zip(labels, empty)],
                  fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the row" if normalize else "count")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def savefig(fig, path, dpi: int = 100, close: bool = False) -> Path:
    """Write `fig` to `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if close:
        plt.close(fig)
    return path


__all__ = ["show_images", "plot_loss_curve", "plot_attention_maps", "plot_similarity_matrix",
           "plot_confusion_matrix", "savefig"]
