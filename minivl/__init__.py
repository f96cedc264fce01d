"""minivl: a from-scratch vision-language course.

The package builds, one floor on top of the other, the systems behind modern multimodal AI:
Shapes World (an embedded, procedurally generated dataset) -> a BPE tokenizer and one
transformer implementation -> a ViT, a text encoder and a causal LM -> CLIP -> task models
(captioning, VQA, grounding, a LLaVA-style multimodal LLM). Every model trains on CPU in
minutes and on one GPU with bf16.

This module holds the three helpers every notebook starts with: `device()`,
`seed_everything(seed)` and `fast_mode()`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__version__ = "0.1.0"


def device(name: str | None = None) -> torch.device:
    """The best available device: cuda > mps > cpu (or `name` when given, checked)."""
    if name is not None:
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError):  # torch's message for "nonsense" names no choices
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r} requested but MPS is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated exactly."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_dir() -> Path:
    """Where checkpoints, run folders and the dataset card live: `<repo>/data`, or $MINIVL_DATA."""
    env = os.environ.get("MINIVL_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


def fast_mode() -> bool:
    """True when MINIVL_FAST=1: notebooks shrink data and steps so they run in seconds."""
    return os.environ.get("MINIVL_FAST", "0").strip().lower() in {"1", "true", "yes", "on"}


__all__ = ["device", "seed_everything", "fast_mode", "data_dir", "__version__"]
