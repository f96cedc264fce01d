"""Use minivl's CLIP the way `openai/clip` is used: `load`, `tokenize`, `preprocess`, `available_models`.

Mirrors the interface of OpenAI's `clip` package (Radford et al., 2021): `load(name)` returns the
model and the image transform it expects, `tokenize` turns strings into the fixed-length id tensor
the text tower reads, and a model name is simply a checkpoint folder that training wrote under
data/checkpoints. Everything here is re-exported by `minivl.clip` (the package).

The one idea to take away: a checkpoint is more than weights. The same preprocessing and the same
tokenizer must travel with them, or the model sees inputs it was never trained on; so a CLIP
checkpoint folder carries its tokenizer.json, and `load` hands back the matching `preprocess`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import minivl
from minivl import validate
from minivl.checkpoint import checkpoints_dir, save_model
from minivl.clip.model import CLIP, CONTEXT_LENGTH
from minivl.data import world_tokenizer


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False,
             tokenizer=None) -> torch.Tensor:
    """Texts -> (B, context_length) LongTensor of token ids, right-padded, bos ... eos, like `clip.tokenize`.

    A text longer than `context_length` raises ValueError unless `truncate=True`, which cuts it
    and keeps eos last. The default tokenizer is the Shapes World BPE every preset uses; pass
    `tokenizer=model.tokenizer` to use the one saved with a checkpoint (they are the same file
    for checkpoints trained by `minivl.recipes.clip`).
    """
    context_length = validate.positive_int("context_length", context_length)
    truncate = validate.boolean("truncate", truncate)
    if tokenizer is None:
        tokenizer = world_tokenizer()
    return tokenizer(texts, context_length=context_length, truncate=truncate)["input_ids"]  # (B, T)


class Preprocess:
    """Image -> (3, S, S) float tensor in [-1, 1], the input `CLIP.encode_image` expects.

    Takes a PIL image, a uint8 numpy array (H, W, 3), a uint8 tensor (H, W, 3) or (3, H, W), or a
    float tensor (3, H, W) in [0, 1]; resizes (bilinear, antialiased) when the size differs.
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = validate.positive_int("image_size", image_size)

    def __repr__(self) -> str:
        return f"Preprocess(image_size={self.image_size}, range=[-1, 1])"

    def __call__(self, image) -> torch.Tensor:
        if type(image).__module__.startswith("PIL."):  # a PIL image, without importing PIL
            image = np.asarray(image.convert("RGB"))
        if not isinstance(image, torch.Tensor):
            if not isinstance(image, np.ndarray):
                raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
            if image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"numpy images must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
            image = torch.from_numpy(image.copy())
        if image.dim() != 3 or 3 not in (image.shape[0], image.shape[-1]) or image.numel() == 0:
            raise ValueError(f"image tensors must be (H, W, 3) or (3, H, W), non-empty, got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            if image.shape[-1] == 3 and image.shape[0] != 3:
                image = image.permute(2, 0, 1)  # (3, H, W)
            x = image.float() / 255
        elif image.is_floating_point():
            if image.shape[0] != 3:
                raise ValueError(f"float image tensors must be (3, H, W), got {tuple(image.shape)}")
            if not torch.isfinite(image).all():  # NaN compares False both ways: the range test misses it
                raise ValueError("float image tensors must be finite, got NaN or inf pixels")
            if image.min() < 0 or image.max() > 1:
                raise ValueError(f"float image tensors must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
            x = image.float()
        else:
            raise TypeError(f"image tensors must be uint8 or float, got {image.dtype}")
        if x.shape[1:] != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear",
                              antialias=True, align_corners=False)[0].clamp(0, 1)
        return (x - 0.5) / 0.5  # (3, S, S), the minivl.data.image_to_tensor convention


def available_models() -> list[str]:
    """Names `load` accepts: the CLIP checkpoints under data/checkpoints (written by training)."""
    root, names = checkpoints_dir(), []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            cfg = d / "config.json"
            if d.is_dir() and not d.name.startswith(".") and cfg.is_file():
                try:
                    if json.loads(cfg.read_text()).get("class") == "CLIP":
                        names.append(d.name)
                except (OSError, ValueError):
                    continue
    return names


def save(model, path, tokenizer=None) -> None:
    """Write a checkpoint folder: config.json + model.safetensors (+ tokenizer.json), atomically.

    The same as `model.save(path, tokenizer)`, the one save every minivl model uses."""
    if not isinstance(model, CLIP):
        raise TypeError(f"clip.save takes a CLIP model, got {type(model).__name__}")
    save_model(model, path, tokenizer)


def load(name_or_path, device: str | torch.device | None = None) -> tuple:
    """-> (model in eval mode on `device`, preprocess), like `clip.load`.

    `name_or_path` is a name from `available_models()` or a checkpoint folder. The checkpoint's
    tokenizer (tokenizer.json) is attached as `model.tokenizer`; `model.tokenize(texts)` uses it.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or Path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        names = available_models()
        if str(name_or_path) not in names:
            listed = ", ".join(repr(n) for n in names) or "none yet (train one: python -m minivl train clip)"
            raise ValueError(f"unknown CLIP model {str(name_or_path)!r}; available models: {listed} "
                             f"(in {checkpoints_dir()}), or pass a checkpoint folder")
        path = checkpoints_dir() / str(name_or_path)
    dev = minivl.device(None if device is None else str(device))
    model = CLIP.load(path, map_location=dev).eval()  # attaches the folder's tokenizer.json as model.tokenizer
    return model, Preprocess(model.config.vision.image_size)


__all__ = ["CONTEXT_LENGTH", "tokenize", "Preprocess", "checkpoints_dir", "available_models", "save", "load"]
