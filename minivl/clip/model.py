"""CLIP: an image encoder and a text encoder trained so that matching pairs point the same way.

Follows "Learning Transferable Visual Models From Natural Language Supervision" (Radford et al.,
2021). The image tower is `minivl.vit.VisionTransformer`, the text tower `minivl.text.TextEncoder`;
each is followed by a bias-free linear projection into one shared embedding space, and a learnable
temperature (stored as log(1/T), as OpenAI does) turns cosine similarities into logits. The module
names match OpenAI's CLIP closely enough that `transformers` CLIP weights port unchanged
(`minivl.clip.convert`), and the user-facing functions mirror the `clip` package:

    model, preprocess = minivl.clip.load("clip-cpu")
    image = preprocess(scene.image).unsqueeze(0)
    text = minivl.clip.tokenize(["a red circle", "a blue square"])
    logits_per_image, logits_per_text = model(image, text)
    probs = logits_per_image.softmax(dim=-1)

This file holds the model and its loss; loading and tokenizing live in `minivl.clip.load`,
zero-shot classification, retrieval and the linear probe in `minivl.clip.eval`, the `transformers`
port in `minivl.clip.convert`; `minivl.clip` (the package) re-exports what a user needs.

The one idea to take away: in a batch of B pairs, every other caption is a negative for an image.
The loss is a B-way classification in both directions with the diagonal as the answer, so the
model learns what distinguishes *this* image from the others the batch happens to hold, and
anything that can be written as text becomes a classifier without training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from minivl.checkpoint import Checkpointable
from minivl.data import world_tokenizer
from minivl.tokenizer import Tokenizer
from minivl.text import TextConfig, TextEncoder, check_tokens
from minivl.vit import ViTConfig, VisionTransformer

CONTEXT_LENGTH = 40  # tokens per text for every CLIP preset (OpenAI's CLIP: 77); Shapes World captions fit
WORLD_VOCAB = 512  # the Shapes World BPE every preset reads
WORLD_PAD_ID = WORLD_VOCAB - len(Tokenizer.SPECIAL_TOKENS)  # its <|pad|>: the first special token

PRESETS = {
    # every preset reads the same 512-token Shapes World BPE (`minivl.data.world_tokenizer()`),
    # as every OpenAI CLIP reads the same BPE: `tokenize` needs no model to work
    "tiny": dict(vision=dict(image_size=32, patch_size=8, width=32, depth=2, heads=2),
                 text=dict(vocab_size=WORLD_VOCAB, context_length=CONTEXT_LENGTH, width=32, depth=2, heads=2),
                 embed_dim=32, pad_id=WORLD_PAD_ID),
    # narrow towers: on a 2-core CPU the budget is images seen, and a ViT needs ~100k of them
    # before it reads shapes (colour comes in a few hundred steps, shape much later)
    "cpu": dict(vision=dict(image_size=64, patch_size=8, width=64, depth=4, heads=4),
                text=dict(vocab_size=WORLD_VOCAB, context_length=CONTEXT_LENGTH, width=64, depth=2, heads=4),
                embed_dim=64, pad_id=WORLD_PAD_ID),
    "gpu": dict(vision=dict(image_size=128, patch_size=8, width=384, depth=8, heads=6),
                text=dict(vocab_size=WORLD_VOCAB, context_length=CONTEXT_LENGTH, width=384, depth=6, heads=6),
                embed_dim=256, pad_id=WORLD_PAD_ID),
}


@dataclass
class CLIPConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)  # the image tower
    text: TextConfig = field(default_factory=TextConfig)  # the text tower
    embed_dim: int = 128  # width of the shared image-text embedding space
    logit_scale_init: float = 1 / 0.07  # initial 1 / temperature (CLIP: 1/0.07 = 14.3)
    logit_scale_max: float = 100.0  # the scale is clamped here so training cannot blow it up
    pad_id: int | None = None  # padding token id: lets encode_text take a bare (B, T) id tensor
    #                            (the presets set the Shapes World BPE's, so `clip.tokenize` output just works)

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if not 0 < self.logit_scale_init <= self.logit_scale_max:
            raise ValueError(f"need 0 < logit_scale_init <= logit_scale_max, got "
                             f"{self.logit_scale_init} and {self.logit_scale_max}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "CLIPConfig":
        """A named preset; `vision=` / `text=` overrides are dicts merged into the preset's."""
        if name not in PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; choose from {sorted(PRESETS)}")
        p = {**PRESETS[name]}
        vision = {**p.pop("vision"), **overrides.pop("vision", {})}
        text = {**p.pop("text"), **overrides.pop("text", {})}
        return cls(vision=ViTConfig(**vision), text=TextConfig(**text), **{**p, **overrides})


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              temperature: float | torch.Tensor = 0.07, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: cross-entropy over the B x B cosine-similarity matrix, both ways.

    Row i of `logits` scores image i against every text; its target is text i (the diagonal).
    Column j scores text j against every image. The loss is the mean of the two directions.
    `temperature` may be a tensor (the model's learnable one), gradients then reach it.

    `positives` (B, B) bool, optional: True where text j also describes image i (its diagonal
    must be True). Targets then spread evenly over each row's (column's) positives, so two
    images that both are "a red circle" are not pushed apart as false negatives.
    """
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"need image and text features of the same shape (B, E), got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if not torch.is_tensor(temperature) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    image_features = F.normalize(image_features.float(), dim=-1)  # unit vectors: dot = cosine
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = image_features @ text_features.T / temperature  # (B, B), [i, j] = image i vs text j
    B = logits.shape[0]
    if positives is None:
        targets = torch.arange(B, device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    if positives.shape != (B, B) or not positives.diagonal().all():
        raise ValueError(f"positives must be a (B, B) = ({B}, {B}) bool mask with a True diagonal, "
                         f"got shape {tuple(positives.shape)}")
    pos = positives.to(logits.device, torch.float32)
    per_image = pos / pos.sum(1, keepdim=True)  # (B, B) soft targets over texts
    per_text = pos.T / pos.T.sum(1, keepdim=True)  # (B, B) soft targets over images
    return (F.cross_entropy(logits, per_image) + F.cross_entropy(logits.T, per_text)) / 2


def _pooled_last_block(blocks: nn.ModuleList, x: torch.Tensor, query_index: torch.Tensor | None,
                       key_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Run pre-norm `blocks` on x (B, S, D) and return only the pooled token's output (B, D).

    CLIP reads one token per sequence (the class token, or the end-of-text token), and in the last
    block nothing else can reach it: the other tokens' queries and MLPs there are wasted work. So
    the last block runs attention for that one query (keys and values still from every token,
    `key_mask` saying which it may see) and the MLP on that one token. Same numbers as the full
    stack, about (depth - 1) / depth of its cost; on a 2-block text tower that is half.
    `query_index` (B,) picks the token per row (None: token 0, the class token).
    """
    for block in blocks[:-1]:
        x, _ = block(x, causal=causal)  # (B, S, D)
    last = blocks[-1]
    rows = torch.arange(x.shape[0], device=x.device)
    pick = (lambda t: t[:, 0]) if query_index is None else (lambda t: t[rows, query_index])
    h = last.ln_1(x)  # (B, S, D): every token is a key and a value
    a, _ = last.attn(pick(h)[:, None], context=h, attention_mask=key_mask)  # (B, 1, D): one query
    y = pick(x)[:, None] + last.drop(a)  # (B, 1, D)
    y = y + last.mlp(last.ln_2(y))
    return y[:, 0]  # (B, D)


class CLIP(Checkpointable, nn.Module):
    """Images (B, 3, H, W) and texts (B, T) -> embeddings (B, E) and image-text logits."""

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = c = config
        self.visual = VisionTransformer(c.vision)  # `clip.visual`, as in OpenAI's code
        self.text = TextEncoder(c.text)
        self.visual_projection = nn.Linear(c.vision.width, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text.width, c.embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=c.vision.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=c.text.width**-0.5)
        # log(1/T): a multiplicative quantity learns better in log space, and exp keeps it positive
        self.logit_scale = nn.Parameter(torch.tensor(math.log(c.logit_scale_init)))
        self.tokenizer = None  # set by `load` to the tokenizer saved with the checkpoint

    # ------------------------------------------------------------------ towers
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> unnormalised image embeddings (B, E).

        Equals `visual_projection(visual(image).pooled)`, computed with `_pooled_last_block`.
        """
        v = self.visual
        x = v.ln_pre(v.embed(image))  # (B, 1 + N, D)
        pooled = _pooled_last_block(v.transformer.blocks, x, query_index=None, key_mask=None, causal=False)
        return self.visual_projection(v.ln_post(pooled))  # (B, E)

    def _text_inputs(self, text) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(text, dict):
            if "input_ids" not in text:
                raise ValueError(f"a text dict needs 'input_ids' (and 'attention_mask'), got keys {sorted(text)}")
            return text["input_ids"], text.get("attention_mask")
        if isinstance(text, torch.Tensor):
            if self.config.pad_id is None:
                raise ValueError("a bare (B, T) id tensor needs config.pad_id to find the padding; "
                                 "pass dict(input_ids=..., attention_mask=...) instead")
            return text, (text != self.config.pad_id).long()
        raise TypeError(f"text must be a (B, T) LongTensor or a dict with input_ids/attention_mask, "
                        f"got {type(text).__name__}")

    def encode_text(self, text) -> torch.Tensor:
        """Token ids (B, T) - a tensor from `tokenize` or a tokenizer's dict - -> embeddings (B, E)."""
        input_ids, mask = self._text_inputs(text)
        check_tokens(input_ids, self.config.text.vocab_size, self.config.text.context_length)
        if mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
            if (mask[:, 1:] > mask[:, :-1]).any():
                raise ValueError("texts must be right-padded (attention_mask like 1 1 1 0 0)")
            last = mask.long().sum(1) - 1
            if (last < 0).any():
                raise ValueError("every text needs at least one real token (a row of attention_mask is all zeros)")
        # Right padding under a causal mask: real tokens never see the pads, so the padding mask
        # changes nothing we read. Leaving it out lets attention use the fused causal kernel.
        t = self.text
        x = t.token_embedding(input_ids) + t.pos_embed[:input_ids.shape[1]]  # (B, T, D)
        keys = torch.arange(input_ids.shape[1], device=input_ids.device)[None] <= last[:, None]  # (B, T)
        pooled = _pooled_last_block(t.transformer.blocks, x, query_index=last, key_mask=keys, causal=True)
        return self.text_projection(t.ln_final(pooled))  # (B, E), = text(ids).tokens at eos, projected

    # ------------------------------------------------------------------ logits and loss
    def scale(self) -> torch.Tensor:
        """exp(logit_scale) = 1 / temperature, clamped at `config.logit_scale_max`."""
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def clamp_logit_scale_(self) -> None:
        """Clamp the stored log scale in place, as OpenAI does after each optimizer step."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.config.logit_scale_max))

    def forward(self, image: torch.Tensor, text) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)), like OpenAI's CLIP."""
        image_features = F.normalize(self.encode_image(image).float(), dim=-1)
        text_features = F.normalize(self.encode_text(text).float(), dim=-1)
        logits_per_image = self.scale() * image_features @ text_features.T  # (B_img, B_txt)
        return logits_per_image, logits_per_image.T

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Contrastive loss on batch{image, input_ids, attention_mask}: the pairs on the diagonal, plus
        batch["positives"] (B, B) when given (text j also describes image i; see `clip_loss`)."""
        for key in ("image", "input_ids"):
            if key not in batch:
                raise ValueError(f"CLIP.loss needs batch[{key!r}], got keys {sorted(batch)}")
        self.clamp_logit_scale_()  # the previous step may have pushed it past the maximum
        image_features = self.encode_image(batch["image"])
        text_features = self.encode_text({"input_ids": batch["input_ids"],
                                          "attention_mask": batch.get("attention_mask")})
        scale = self.scale()
        loss = clip_loss(image_features, text_features, temperature=1 / scale, positives=batch.get("positives"))
        with torch.no_grad():  # in-batch retrieval accuracy: a cheap sign of learning
            sims = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
            pos = batch.get("positives")
            pos = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device) if pos is None else pos.bool()
            rows = torch.arange(sims.shape[0], device=sims.device)
            i2t = pos[rows, sims.argmax(1)].float().mean().item()  # the best text is a valid caption
            t2i = pos[sims.argmax(0), rows].float().mean().item()
        return loss, {"i2t_acc": i2t, "t2i_acc": t2i, "logit_scale": scale.item()}

    def tokenize(self, texts: str | list[str], truncate: bool = False) -> torch.Tensor:
        """`minivl.clip.tokenize` with this model's tokenizer and context length, on its device."""
        tokenizer = self.tokenizer if self.tokenizer is not None else world_tokenizer()
        ids = tokenizer(texts, context_length=self.config.text.context_length, truncate=truncate)["input_ids"]
        return ids.to(self.logit_scale.device)  # (B, context_length)


__all__ = ["CLIP", "CLIPConfig", "PRESETS", "CONTEXT_LENGTH", "clip_loss"]
