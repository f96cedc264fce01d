"""The captioner's processor and loader: images in, pixel tensors out; token ids in, captions out.

Mirrors `transformers`' `BlipProcessor` (`processor(images=..., text=...)`, `processor.decode(ids,
skip_special_tokens=True)`, `batch_decode`) and minivl's `clip.load`: a checkpoint folder carries its
tokenizer, and `load` hands back the model with the processor that matches it.

The one idea to take away: the model never sees a file or a string. What turns them into the
tensors it was trained on - resizing, [-1, 1] scaling, the BPE - travels with the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

import minivl
from minivl.captioner.model import Captioner, decode
from minivl.checkpoint import checkpoints_dir
from minivl.clip.load import Preprocess


class Processor:
    """images -> {"pixel_values": (B, 3, S, S)}; text -> {"input_ids", "attention_mask"}; ids -> captions.

    Images may be PIL images, uint8 arrays (H, W, 3) of any size (resized), or float tensors
    (3, H, W) in [0, 1], as `minivl.clip.Preprocess` takes them.
    """

    def __init__(self, image_size: int, tokenizer=None, context_length: int = 40) -> None:
        if tokenizer is None:
            from minivl.data import world_tokenizer
            tokenizer = world_tokenizer()
        self.image_processor, self.tokenizer, self.context_length = Preprocess(image_size), tokenizer, context_length

    def __call__(self, images=None, text=None) -> dict:
        if images is None and text is None:
            raise ValueError("pass images, text or both")
        out = {}
        if images is not None:
            if not isinstance(images, (list, tuple)):
                images = [images]
            if not images:
                raise ValueError("images is an empty list: pass at least one image")
            out["pixel_values"] = torch.stack([self.image_processor(im) for im in images])  # (B, 3, S, S)
        if text is not None:
            out.update(self.tokenizer(text if isinstance(text, list) else [text], context_length=self.context_length,
                                      padding="longest"))
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = torch.as_tensor(ids)
        if ids.dim() != 1:
            raise ValueError(f"decode takes one row of ids (T,), got shape {tuple(ids.shape)}; use batch_decode")
        return self.batch_decode(ids[None], skip_special_tokens)[0]

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        if not skip_special_tokens:
            return [self.tokenizer.decode([i for i in row if i < self.tokenizer.vocab_size], skip_special_tokens=False)
                    for row in torch.as_tensor(ids).tolist()]
        return decode(self.tokenizer, ids)


def load(name_or_path, device=None) -> tuple[Captioner, Processor]:
    """-> (captioner in eval mode, its Processor); a name is a folder under data/checkpoints."""
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        path = checkpoints_dir() / str(name_or_path)
        if not (path / "config.json").is_file():
            raise ValueError(f"no captioner checkpoint {str(name_or_path)!r} (looked in {checkpoints_dir()}); "
                             "train one: python -m minivl train captioner")
    model = Captioner.load(path, map_location=minivl.device(None if device is None else str(device))).eval()
    return model, Processor(model.config.vision.image_size, model._tokenizer(), model.config.text.context_length)


__all__ = ["Processor", "load"]
