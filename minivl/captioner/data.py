"""Your own captions: a COCO-captions JSON with an image folder, or an in-memory list, as batches.

Users ask first for "caption my own images" and "fine-tune on my data". Two formats come in:
- COCO captions (Chen et al., 2015): {"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]} next to a folder of images (`load_coco_captions`);
- a list of {"image": uint8 array (H, W, 3) or a path, "captions": [str, ...]} (`check_items`).
Images of another size are resized to the model's (bilinear, antialiased, `clip.Preprocess`).
PNG files are read with matplotlib (no extra dependency); other formats need Pillow.

`item_batches` turns items into the `get_batch(step)` the Trainer reads, the same batch format as
the Shapes World stream: {image, input_ids, attention_mask, positives}.

The one idea to take away: fine-tuning on your data is only a different batch stream; the model,
the loss and the loop do not change.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from minivl.clip.load import Preprocess


def read_image(path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3). PNG through matplotlib; JPEG and the rest through Pillow."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    if path.suffix.lower() == ".png":
        import matplotlib.image as mpimg
        img = mpimg.imread(path)  # float in [0, 1] for PNG, (H, W[, 3|4])
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.dtype != np.uint8 else img
    else:
        try:
            from PIL import Image
        except ImportError:
            raise ValueError(f"{path.name}: reading {path.suffix} files needs Pillow (pip install pillow); "
                             "PNG works without it") from None
        img = np.asarray(Image.open(path).convert("RGB"))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)  # grey -> RGB
    return np.ascontiguousarray(img[..., :3])  # drop alpha: (H, W, 3)


def load_coco_captions(annotation_file, image_dir) -> list[dict]:
    """COCO-captions JSON + image folder -> [{"image": path, "captions": [...]}], in the JSON's image order.

    Images without a caption are left out; a caption naming an unknown image id is a ValueError."""
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    try:
        data = json.loads(annotation_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the COCO captions file {annotation_file}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise ValueError(f"{annotation_file}: expected a COCO captions JSON with 'images' and 'annotations' lists")
    files, captions = {}, {}
    for im in data["images"]:
        if "id" not in im or "file_name" not in im:
            raise ValueError(f"{annotation_file}: every image needs 'id' and 'file_name', got {im}")
        files[im["id"]] = image_dir / im["file_name"]
    for ann in data["annotations"]:
        if ann.get("image_id") not in files or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{annotation_file}: annotation {ann} names no known image or has no caption")
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    return check_items([{"image": files[i], "captions": captions[i]} for i in files if i in captions])


def check_items(items) -> list[dict]:
    """The in-memory format, checked: a non-empty list of {"image": array or path, "captions": [str, ...]}."""
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("items must be a non-empty list of {'image': ..., 'captions': [...]}")
    for j, it in enumerate(items):
        if not isinstance(it, dict) or "image" not in it or "captions" not in it:
            raise ValueError(f"item {j} must be a dict with 'image' and 'captions', got {it!r:.80}")
        caps = it["captions"]
        if isinstance(caps, str) or not isinstance(caps, (list, tuple)) or not caps or not all(
                isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"item {j}: 'captions' must be a non-empty list of non-empty strings, got {caps!r:.80}")
        img = it["image"]
        if not isinstance(img, (str, Path)):
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"item {j}: 'image' must be a uint8 (H, W, 3) array or a path, got "
                                 f"{img.dtype} {img.shape}")
    return list(items)


def item_pixels(items, image_size: int) -> torch.Tensor:
    """Every item's image, read and resized: (N, 3, S, S) in [-1, 1]."""
    pre = Preprocess(image_size)
    return torch.stack([pre(read_image(it["image"]) if isinstance(it["image"], (str, Path)) else
                            np.asarray(it["image"])) for it in items])


def item_batches(items, tokenizer, image_size: int, batch_size: int, context_length: int = 40, seed: int = 0):
    """get_batch(step) over your items: `batch_size` random items, one random caption each (a pure
    function of (seed, step)); captions equal to another row's are marked as its positives."""
    items = check_items(items)
    pixels = item_pixels(items, image_size)  # read once: the images are small and reused every epoch

    def get_batch(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        rows = rng.integers(0, len(items), batch_size)
        texts = [items[r]["captions"][rng.integers(len(items[r]["captions"]))] for r in rows]
        enc = tokenizer(texts, context_length=context_length, truncate=True, padding="longest")
        refs = [set(items[r]["captions"]) for r in rows]
        positives = torch.tensor([[t in ref for t in texts] for ref in refs])  # (B, B)
        positives |= torch.tensor(rows[:, None] == rows[None, :])  # the same image twice
        return {"image": pixels[torch.as_tensor(rows)], **enc, "positives": positives}
    return get_batch


__all__ = ["read_image", "load_coco_captions", "check_items", "item_pixels", "item_batches"]
