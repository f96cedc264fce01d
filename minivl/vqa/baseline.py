"""Late fusion: frozen CLIP image and question embeddings, concatenated, into an MLP head.

The baseline every VQA paper beats (Antol et al., 2015: "deeper LSTM Q + norm I"; with CLIP
features, Shen et al., 2021). Both inputs are summarised into one vector each *before* they meet,
so the head can combine "what is in the image" with "what is asked", but it cannot look again at
the part of the image the question is about.

The one idea to take away (Santoro et al., 2017, Relation Networks): an MLP over pooled
embeddings struggles with relations ("is the red circle left of the square?"): the pooled image
vector must already hold every object's place and every pair's order, whatever the question.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minivl import validate
from minivl.checkpoint import Checkpointable
from minivl.data import image_to_tensor
from minivl.vqa.model import AnswerLabels, vqa_loss


@dataclass
class LateFusionConfig(AnswerLabels):
    embed_dim: int = 64  # CLIP's embedding width E (image and text)
    hidden: int = 512  # MLP hidden width
    depth: int = 2  # hidden layers
    answers: tuple[str, ...] = ()  # the answer vocabulary

    def __post_init__(self) -> None:
        validate.config_fields(self, ints=dict(embed_dim=1, hidden=1, depth=1))
        self.answers = tuple(self.answers)
        if not self.answers:
            raise ValueError("the answer vocabulary is empty (answers=())")


class LateFusionVQA(Checkpointable, nn.Module):
    """(image embeddings (B, E), question embeddings (B, E)) -> answer logits (B, A)."""

    config_class = LateFusionConfig

    def __init__(self, config: LateFusionConfig) -> None:
        super().__init__()
        self.config = c = config
        layers, d = [], 2 * c.embed_dim
        for _ in range(c.depth):
            layers += [nn.Linear(d, c.hidden), nn.LayerNorm(c.hidden), nn.GELU()]
            d = c.hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(d, len(c.answers)))

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([image_embeds, text_embeds], -1))  # (B, A)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self(batch["image_embeds"], batch["text_embeds"])
        targets = batch["targets"]
        loss = vqa_loss(logits, targets)
        return loss, {"acc": targets.gather(1, logits.argmax(-1, keepdim=True)).mean()}


class ClipFeatures:
    """Frozen CLIP embeddings of images and (cached) question strings."""

    def __init__(self, clip_model, tokenizer=None) -> None:
        self.clip = clip_model.eval()
        self.tokenizer = tokenizer or getattr(clip_model, "tokenizer", None)
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        from minivl.clip import encode_images
        S = self.clip.config.vision.image_size
        x = image_to_tensor(np.stack(images))  # (N, 3, H, W)
        if x.shape[-1] != S:
            x = F.interpolate(x, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        return encode_images(self.clip, x)  # (N, E) normalised

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        from minivl.clip import encode_texts
        new = sorted(set(texts) - set(self._text))
        if new:
            for t, e in zip(new, encode_texts(self.clip, new, self.tokenizer)):
                self._text[t] = e
        return torch.stack([self._text[t] for t in texts])  # (N, E)

    def scenes(self, scenes: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """One row per question: (image embeddings (M, E), question embeddings (M, E))."""
        img = self.images([s["image"] for s in scenes])
        rows = torch.tensor([i for i, s in enumerate(scenes) for _ in s["questions"]])
        return img[rows], self.texts([q for s in scenes for q in s["questions"]])


def train_late_fusion(features: ClipFeatures, scenes: list[dict], answers: tuple[str, ...], steps: int = 600,
                      batch_size: int = 512, lr: float = 2e-3, hidden: int = 512, seed: int = 0) -> LateFusionVQA:
    """Fit the MLP on frozen features of `scenes` (soft-score BCE, AdamW, cosine decay)."""
    from minivl.vqa.data import soft_scores
    torch.manual_seed(seed)
    img, txt = features.scenes(scenes)
    label2id = {a: i for i, a in enumerate(answers)}
    targets = torch.stack([soft_scores(a, label2id) for s in scenes for a in s["answers"]])  # (M, A)
    model = LateFusionVQA(LateFusionConfig(embed_dim=img.shape[1], hidden=hidden, answers=tuple(answers)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(targets), (batch_size,), generator=g)
        loss, _ = model.loss({"image_embeds": img[idx], "text_embeds": txt[idx], "targets": targets[idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict_late_fusion(model: LateFusionVQA, features: ClipFeatures, scenes: list[dict]) -> list[list[str]]:
    img, txt = features.scenes(scenes)
    best = model(img, txt).argmax(-1).tolist()
    it = iter(best)
    return [[model.config.answers[next(it)] for _ in s["questions"]] for s in scenes]


__all__ = ["LateFusionConfig", "LateFusionVQA", "ClipFeatures", "train_late_fusion", "predict_late_fusion"]
