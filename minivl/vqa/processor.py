"""The VQA processor: images + questions -> the model's inputs, as `transformers.ViltProcessor` does.

    processor = ViltProcessor.from_model(model)
    encoding = processor(image, "how many circles are there?", return_tensors="pt")
    outputs = model(**encoding)
    model.config.id2label[outputs.logits.argmax(-1).item()]

Images (uint8 (H, W, 3) arrays of any size, or paths) are resized to the model's image size and
scaled to [-1, 1] (ViLT's mean 0.5 / std 0.5); questions are tokenized with bos/eos and padded to
the longest. A question longer than the text context is an error unless `truncation=True`.

The one idea to take away: the processor is part of the model. Resizing, scaling and
tokenization must be exactly the training ones, so they live in one object next to the model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minivl.data import image_to_tensor
from minivl.vqa.data import load_image


class ViltProcessor:
    """`processor(images, questions, return_tensors="pt")` -> {input_ids, attention_mask, pixel_values}."""

    def __init__(self, tokenizer, image_size: int = 64, context_length: int = 32) -> None:
        if not hasattr(tokenizer, "pad_id") or not callable(tokenizer):
            raise TypeError(f"tokenizer must be a minivl Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer, self.image_size, self.context_length = tokenizer, int(image_size), int(context_length)

    @classmethod
    def from_model(cls, model) -> "ViltProcessor":
        """The processor a trained model expects (its tokenizer, image size and text context)."""
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            from minivl.data import world_tokenizer
            tok = world_tokenizer(model.config.vocab_size)
        return cls(tok, model.config.image_size, model.config.context_length)

    def images(self, images) -> torch.Tensor:
        """One image or a list -> (B, 3, S, S) float in [-1, 1]."""
        if isinstance(images, (np.ndarray, str, Path)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        if isinstance(images, torch.Tensor):
            raise ValueError("pass images as uint8 (H, W, 3) numpy arrays or paths, not tensors")
        images = list(images)
        if not images:
            raise ValueError("empty batch: no images")
        out = []
        for i, img in enumerate(images):
            if isinstance(img, np.ndarray) and img.dtype != np.uint8:
                raise ValueError(f"image {i} must be uint8 (H, W, 3), got dtype {img.dtype}")
            if isinstance(img, np.ndarray) and (img.ndim != 3 or img.shape[-1] != 3):
                raise ValueError(f"image {i} must have 3 channels (H, W, 3), got shape {img.shape}")
            t = image_to_tensor(load_image(img))[None]  # (1, 3, H, W)
            if t.shape[-2:] != (self.image_size, self.image_size):
                t = F.interpolate(t, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                                  align_corners=False).clamp_(-1, 1)
            out.append(t)
        return torch.cat(out)  # (B, 3, S, S)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool | str = True,
                 truncation: bool = False, **unused) -> dict:
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if unused:
            raise TypeError(f"unexpected arguments {sorted(unused)}")
        if images is None or text is None:
            raise ValueError("ViltProcessor needs both images and text (questions)")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("empty batch: no questions")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("questions must be strings")
        pixel_values = self.images(images)
        if len(texts) != pixel_values.shape[0]:
            raise ValueError(f"{len(texts)} questions but {pixel_values.shape[0]} images: one image per question")
        if not truncation:
            for t in texts:
                n = len(self.tokenizer.encode(t)) + 2
                if n > self.context_length:
                    raise ValueError(f"question of {n} tokens is longer than the text context ({self.context_length}): "
                                     f"{t!r:.80}; pass truncation=True to cut it")
        enc = self.tokenizer(texts, context_length=self.context_length, truncate=bool(truncation), padding="longest")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixel_values}


__all__ = ["ViltProcessor"]
