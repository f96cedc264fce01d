"""The calls users know: Grounding DINO's `predict` / `annotate`, transformers' `post_process_object_detection`,
referring-expression `ground`, and image-guided queries - all on minivl's OWL-ViT.

Box formats - the thing users confuse most - differ on purpose, as in the libraries they copy:
- `predict` (Grounding DINO, Liu et al., 2023) returns boxes *normalised cxcywh* in [0, 1];
- `post_process_object_detection` (transformers' OwlViTProcessor) returns *absolute xyxy* pixels;
- `ground` and `image_guided_detection` return absolute xyxy pixels too (what IoU with a
  Shapes World box wants). `minivl.metrics.boxes.box_convert` goes between them.

The one idea to take away: an open-vocabulary detector is "score every patch against every phrase,
keep the patches whose best score clears a threshold". Grounding DINO and OWL-ViT post-processing
are the same max-over-queries rule, only the box format and the label (phrase vs index) differ.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from minivl import validate
from minivl.data import image_to_tensor
from minivl.metrics.boxes import box_convert, box_iou

SEPARATOR = "."


def split_caption(caption: str) -> list[str]:
    """"circle . red square ." -> ["circle", "red square"]: Grounding DINO's " . " separated phrases.
    An empty caption, or one of separators only, is a ValueError (it would detect nothing, silently)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str like 'circle . red square', got {type(caption).__name__}")
    if not caption.strip():
        raise ValueError("caption is empty: pass phrases separated by ' . ', e.g. 'circle . red square'")
    phrases = [" ".join(p.split()) for p in caption.split(SEPARATOR)]
    phrases = [p for p in phrases if p]
    if not phrases:
        raise ValueError(f"caption {caption!r} holds only separators: pass phrases separated by ' . ', "
                         "e.g. 'circle . red square'")
    return list(dict.fromkeys(phrases))  # a phrase twice would split its score between two labels


def check_threshold(name: str, value) -> float:
    """A threshold must be a real number in [0, 1] (a score is a probability)."""
    return validate.real(name, value, 0.0, 1.0)


def as_images(model, image) -> tuple[torch.Tensor, bool]:
    """-> (images (B, 3, S, S) in [-1, 1] on the model's device, whether one image came).

    Accepts a Shapes World uint8 array (S, S, 3), a float tensor (3, S, S) in [-1, 1], a batch of
    either ((B, S, S, 3) / (B, 3, S, S)), or a list of single images. S is the model's image size;
    any other shape is a ValueError saying what was expected."""
    S = model.config.clip.vision.image_size
    device = model.box_bias.device
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("an empty list of images: pass at least one")
        if all(isinstance(im, np.ndarray) and im.shape == image[0].shape and im.ndim == 3 for im in image):
            return as_images(model, np.stack(image))[0], False  # one conversion for the batch
        parts = [as_images(model, im) for im in image]
        if any(not single for _, single in parts):
            raise ValueError("a list of images must hold single images (S, S, 3) or (3, S, S), not batches")
        return torch.cat([t for t, _ in parts]), False
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-3:] != (S, S, 3):
            raise ValueError(f"image: expected a uint8 array ({S}, {S}, 3) or (B, {S}, {S}, 3) for this model, "
                             f"got {image.dtype} {image.shape}")
        t = image_to_tensor(image)
    elif isinstance(image, torch.Tensor):
        if image.dim() not in (3, 4) or tuple(image.shape[-3:]) != (3, S, S):
            raise ValueError(f"image: expected a tensor (3, {S}, {S}) or (B, 3, {S}, {S}) in [-1, 1] for this "
                             f"model, got shape {tuple(image.shape)}")
        t = image
    else:
        raise TypeError(f"image must be a uint8 numpy array, a float tensor or a list of them, "
                        f"got {type(image).__name__}")
    single = t.dim() == 3
    return (t[None] if single else t).to(device), single


@torch.no_grad()
def post_process_object_detection(outputs, threshold: float = 0.1, target_sizes=None) -> list[dict]:
    """transformers' `OwlViTProcessor.post_process_object_detection`: per image {"scores", "labels",
    "boxes"} for the patches whose best query scores above `threshold`.

    scores: sigmoid of the best logit; labels: the index of that query; boxes: **absolute xyxy**
    (x1, y1, x2, y2) in pixels of `target_sizes` ((B, 2) as (height, width)), or normalised xyxy
    in [0, 1] when target_sizes is None.
    """
    threshold = check_threshold("threshold", threshold)
    logits, boxes = outputs.logits, outputs.pred_boxes  # (B, N, Q), (B, N, 4)
    if logits is None:
        raise ValueError("outputs has no logits: run the model with text queries or query_embeds")
    best, labels = logits.max(-1)  # (B, N) each
    scores = best.float().sigmoid()
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")  # (B, N, 4) normalised
    if target_sizes is not None:
        sizes = torch.as_tensor(target_sizes, dtype=torch.float32, device=xyxy.device)
        if sizes.shape != (len(xyxy), 2):
            raise ValueError(f"target_sizes must be (B={len(xyxy)}, 2) as (height, width), got {tuple(sizes.shape)}")
        h, w = sizes.unbind(1)
        xyxy = xyxy * torch.stack([w, h, w, h], 1)[:, None, :]  # (B, N, 4) pixels
    return [{"scores": s[s > threshold], "labels": lab[s > threshold], "boxes": b[s > threshold]}
            for s, lab, b in zip(scores, labels, xyxy)]


@torch.no_grad()
def predict(model, image, caption: str = "circle . red square", box_threshold: float = 0.35,
            text_threshold: float = 0.25):
    """Grounding DINO's `predict`: -> (boxes, logits, phrases) for one image, or a list of such
    triples for a list (or batch) of images - one forward pass for all of them.

    boxes (K, 4): **normalised cxcywh** in [0, 1] (Grounding DINO's format; multiply by the image
    size and convert for pixels). logits (K,): each box's best phrase score (a sigmoid, as Grounding
    DINO's "logits" are). phrases: per box, the caption's phrases (split on " . ", never merged across
    a separator) that score above text_threshold, best first, joined by " . "; "" when none does.
    A box is kept when its best score exceeds box_threshold.
    """
    box_threshold = check_threshold("box_threshold", box_threshold)
    text_threshold = check_threshold("text_threshold", text_threshold)
    phrases = split_caption(caption)
    images, single = as_images(model, image)
    out = model(images, **model.tokenize(phrases))
    scores = out.logits.float().sigmoid()  # (B, N, Q)
    best = scores.max(-1).values  # (B, N)
    keep = best > box_threshold  # (B, N)
    count = (scores > text_threshold).sum(-1)  # (B, N): phrases above the text threshold, per patch
    per_image = keep.sum(-1).tolist()  # kept boxes per image
    # the phrases above the threshold are the first `count` of the phrases sorted best first: only those are
    # sorted out (topk), -1 past the count; one string is built per distinct row, not per box
    top = int(count[keep].max()) if keep.any() else 0
    if top:
        order = scores.topk(top, dim=-1).indices  # (B, N, top)
        chosen = torch.where(torch.arange(top, device=order.device) < count[..., None], order, -1)[keep]  # (K, top)
        Q = scores.shape[-1]
        if top * math.log2(Q + 1) < 62:  # each row as one int64, digits in base Q + 1: a 1-D unique, ~50x faster
            code = ((chosen + 1) * (Q + 1) ** torch.arange(top, device=chosen.device)).sum(-1)  # (K,)
            _, which = torch.unique(code, return_inverse=True)  # (K,) in 0..U-1
        else:
            _, which = torch.unique(chosen, dim=0, return_inverse=True)
        K = len(which)
        first = torch.full((int(which.max()) + 1,), K, device=which.device).scatter_reduce(
            0, which, torch.arange(K, device=which.device), "amin")  # (U,): a box holding each distinct row
        strings = [" . ".join(phrases[q] for q in row if q >= 0) for row in chosen[first].tolist()]
        names = [strings[u] for u in which.tolist()]
    else:
        names = [""] * sum(per_image)
    boxes, logits = out.pred_boxes[keep].float().split(per_image), best[keep].split(per_image)  # per image
    starts = np.cumsum([0] + per_image).tolist()
    results = [(b, s, names[starts[i]:starts[i + 1]]) for i, (b, s) in enumerate(zip(boxes, logits))]
    return results[0] if single else results


def annotate(image, boxes, logits, phrases, scale: int = 4) -> np.ndarray:
    """Grounding DINO's `annotate`: the image (uint8 (S, S, 3) or a tensor in [-1, 1]) with each box
    drawn and labelled "phrase 0.87". boxes: **normalised cxcywh**, as `predict` returns them.
    Returns an RGB uint8 array `scale` times the image's size (labels need the room)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from minivl.data import tensor_to_image
    img = tensor_to_image(image) if isinstance(image, torch.Tensor) else np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"annotate needs one image, uint8 (H, W, 3) or a tensor (3, H, W); got {img.dtype} {img.shape}")
    H, W = img.shape[:2]
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if not (len(boxes) == len(logits) == len(phrases)):
        raise ValueError(f"need one logit and phrase per box, got {len(boxes)} boxes, {len(logits)} logits, "
                         f"{len(phrases)} phrases")
    xyxy = box_convert(boxes, "cxcywh", "xyxy") * torch.tensor([W, H, W, H])
    fig = Figure(figsize=(W * scale / 100, H * scale / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(img, extent=(0, W, H, 0), interpolation="nearest")
    ax.set_xlim(0, W), ax.set_ylim(H, 0), ax.axis("off")
    colours = {}
    for (x1, y1, x2, y2), s, p in zip(xyxy.tolist(), torch.as_tensor(logits).tolist(), phrases):
        c = colours.setdefault(p, f"C{len(colours) % 10}")
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=1.5))
        ax.text(x1, y1, f"{p} {s:.2f}", color="white", fontsize=7, va="bottom",
                bbox=dict(facecolor=c, edgecolor="none", pad=1, alpha=0.8))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@torch.no_grad()
def ground(model, image, expression: str):
    """The one box a referring expression names: -> (box, score) with box **absolute xyxy** pixels
    (4,) of the patch scoring highest for the whole expression, score its sigmoid. For a list of
    images, a list of (box, score). A model with a fusion enhancer (`OWLViTConfig.fusion_depth`) scores
    the expression on query-conditioned patches (Grounding DINO's early fusion)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"expression must be a non-empty str like 'the object left of the red circle', "
                         f"got {expression!r}")
    images, single = as_images(model, image)
    out = model(images, **model.tokenize([" ".join(expression.split())]), fuse=True)  # the enhancer, if any
    S = model.config.clip.vision.image_size
    res = []
    for logit, boxes in zip(out.logits[..., 0], out.pred_boxes):  # (N,), (N, 4)
        n = int(logit.argmax())
        res.append((box_convert(boxes[n].float(), "cxcywh", "xyxy") * S, logit[n].float().sigmoid()))
    return res[0] if single else res


# ---------------------------------------------------------------- image-guided queries
def paste_crop(model, crop: np.ndarray) -> tuple[np.ndarray, tuple]:
    """An object crop (h, w, 3) uint8 -> (a model-sized image with the crop in its centre on a plain
    background of the crop's border colour, the crop's pixel xyxy box there). A crop is not blown up
    to the model's size: the detector knows objects at their own size."""
    S = model.config.clip.vision.image_size
    crop = np.asarray(crop)
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[-1] != 3 or not (0 < crop.shape[0] <= S and
                                                                             0 < crop.shape[1] <= S):
        raise ValueError(f"crop must be uint8 (h, w, 3) with 0 < h, w <= {S}, got {crop.dtype} {crop.shape}")
    h, w = crop.shape[:2]
    border = np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]])
    canvas = np.empty((S, S, 3), np.uint8)
    canvas[:] = np.median(border, 0).astype(np.uint8)
    y, x = (S - h) // 2, (S - w) // 2
    canvas[y:y + h, x:x + w] = crop
    return canvas, (x, y, x + w, y + h)


@torch.no_grad()
def image_query_embedding(model, image, box) -> torch.Tensor:
    """The query embedding (E,) of the object at pixel xyxy `box` in `image`: the class embedding of
    the patch whose predicted box overlaps it most (OWL-ViT's image-conditioned detection)."""
    images, single = as_images(model, image)
    if not single:
        raise ValueError("image_query_embedding takes one image")
    out = model(images)
    S = model.config.clip.vision.image_size
    pred = box_convert(out.pred_boxes[0].float(), "cxcywh", "xyxy") * S  # (N, 4) pixels
    iou = box_iou(pred, torch.as_tensor(box, dtype=torch.float32, device=pred.device)[None])[:, 0]  # (N,)
    return out.class_embeds[0, int(iou.argmax())]


@torch.no_grad()
def image_guided_detection(model, image, query_crop: np.ndarray, threshold: float = 0.5):
    """Find objects that look like `query_crop` (an (h, w, 3) uint8 crop of an object) in `image`:
    -> (boxes (K, 4) **absolute xyxy** pixels, scores (K,)), the patches scoring above threshold."""
    threshold = check_threshold("threshold", threshold)
    canvas, box = paste_crop(model, query_crop)
    query = image_query_embedding(model, canvas, box)  # (E,)
    images, _ = as_images(model, image)
    out = model(images[:1], query_embeds=query[None])
    S = model.config.clip.vision.image_size
    res = post_process_object_detection(out, threshold, target_sizes=[(S, S)])[0]
    return res["boxes"], res["scores"]


__all__ = ["split_caption", "check_threshold", "as_images", "post_process_object_detection", "predict", "annotate",
           "ground", "paste_crop", "image_query_embedding", "image_guided_detection"]
