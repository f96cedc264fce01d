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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minivl import distributed, validate
from minivl.checkpoint import Checkpointable
from minivl.data import world_tokenizer
from minivl.tokenizer import Tokenizer
from minivl.text import TextConfig, TextEncoder, check_tokens, last_token_index
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
        if not isinstance(self.vision, ViTConfig) or not isinstance(self.text, TextConfig):
            raise TypeError(f"CLIPConfig.vision/text must be a ViTConfig/TextConfig (or dict), got "
                            f"{type(self.vision).__name__}, {type(self.text).__name__}")
        validate.positive_int("CLIPConfig.embed_dim", self.embed_dim)
        self.logit_scale_init = validate.real("CLIPConfig.logit_scale_init", self.logit_scale_init, 0, low_open=True)
        self.logit_scale_max = validate.real("CLIPConfig.logit_scale_max", self.logit_scale_max, 0, low_open=True)
        validate.vocab_id("CLIPConfig.pad_id", self.pad_id, self.text.vocab_size)
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
    image_features = validate.tensor("image_features", image_features, shape=("B", "E"), kind="float", finite=True)
    text_features = validate.tensor("text_features", text_features, shape=("B", "E"), kind="float", finite=True)
    if image_features.shape != text_features.shape:
        raise ValueError(f"need image and text features of the same shape (B, E), got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if torch.is_tensor(temperature):  # the model's learnable one: keep the graph, check the value on CPU
        temperature = validate.tensor("temperature", temperature, kind="float")
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        if validate.on_cpu(temperature) and not (torch.isfinite(temperature) & (temperature > 0)).all():
            raise ValueError(f"temperature must be positive and finite, got {temperature.item()}")
    else:  # NaN would pass `temperature <= 0` and turn the loss into NaN
        temperature = validate.real("temperature", temperature, 0, low_open=True)
    image_features = F.normalize(image_features.float(), dim=-1)  # unit vectors: dot = cosine
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = image_features @ text_features.T / temperature  # (B, B), [i, j] = image i vs text j
    B = logits.shape[0]
    if positives is None:
        targets = torch.arange(B, device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    positives = validate.tensor("positives", positives)
    if positives.dtype != torch.bool:  # a float mask of 0.5s would weight targets silently
        raise TypeError(f"positives must be a bool tensor (B, B), got {positives.dtype}")
    if positives.shape != (B, B) or not positives.diagonal().all():
        raise ValueError(f"positives must be a (B, B) = ({B}, {B}) bool mask with a True diagonal, "
                         f"got shape {tuple(positives.shape)}")
    pos = positives.to(logits.device, torch.float32)
    per_image = pos / pos.sum(1, keepdim=True)  # (B, B) soft targets over texts
    per_text = pos.T / pos.T.sum(1, keepdim=True)  # (B, B) soft targets over images
    return (F.cross_entropy(logits, per_image) + F.cross_entropy(logits.T, per_text)) / 2


def _across_ranks(batch: dict, image_features: torch.Tensor, text_features: torch.Tensor):
    """DDP's global batch, as open_clip's `gather_with_grad`: (every process's image and text
    features, (W*b, E) each in rank order, and the positives among them (W*b, W*b) or None).

    Why the update is one process's on the whole batch: every rank computes the same global loss L
    from the same gathered rows. The all_gather backward hands rank r the sum over the W ranks of
    dL/d(its rows), W * dL/d(its rows); DDP averages the W ranks' gradients, so the towers get
    dL/dtheta; logit_scale is read locally, the same on every rank, and gets dL/ds. The trainer's
    weight on each rank's loss (its row share b/B times W, undoing DDP's average) is 1 here.
    """
    positives = batch.get("positives")
    if "global_rows" not in batch:  # a share the loader cut (StepSampler), not split_batch(ranks=True)
        if positives is not None:
            raise ValueError("under DDP CLIP needs the whole batch's positives mask (which captions of other "
                             "processes' rows are positives), but this share was loaded alone: pass the "
                             "Trainer a get_batch(step) callable or an unsharded iterable, or drop positives")
        sizes = distributed.all_gather_rows(torch.tensor([image_features.shape[0]], device=image_features.device))
        if len(set(sizes.tolist())) > 1:
            raise ValueError(f"under DDP CLIP gathers every process's features, so the shares must be equal; "
                             f"got {sizes.tolist()} rows: use a batch size divisible by the number of processes")
    image = distributed.all_gather_rows(image_features, grad=True)  # (W*b, E)
    text = distributed.all_gather_rows(text_features, grad=True)  # (W*b, E)
    if positives is not None:
        rows = distributed.all_gather_rows(batch["global_rows"])  # (W*b,): places in the whole batch
        positives = distributed.all_gather_rows(batch["global_positives"])[:, rows]  # (W*b, W*b)
    return image, text, positives


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

        Equals `visual_projection(visual(image).pooled)`; the stack's `pool_index=0` computes the
        last block for the class token alone, the only token CLIP reads.
        """
        v = self.visual
        pooled = v.transformer(v.ln_pre(v.embed(image)), pool_index=0).last_hidden_state  # (B, D)
        return self.visual_projection(v.ln_post(pooled))  # (B, E)

    def _text_inputs(self, text) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> checked (input_ids, attention_mask). Without a mask it comes from config.pad_id: reading the
        last slot of a padded row would pool a padding token (a silently wrong embedding)."""
        if isinstance(text, dict):
            if "input_ids" not in text:
                raise ValueError(f"a text dict needs 'input_ids' (and 'attention_mask'), got keys {sorted(text)}")
            ids, mask = text["input_ids"], text.get("attention_mask")
        elif isinstance(text, (torch.Tensor, np.ndarray)):
            ids, mask = text, None
        else:
            raise TypeError(f"text must be a (B, T) LongTensor or a dict with input_ids/attention_mask, "
                            f"got {type(text).__name__}")
        c = self.config.text
        ids, mask = check_tokens(ids, c.vocab_size, c.context_length, mask, right_padded=True)
        if mask is None:
            if self.config.pad_id is None:
                raise ValueError("text without an attention_mask needs config.pad_id to find the padding; "
                                 "pass dict(input_ids=..., attention_mask=...) instead")
            mask = (ids != self.config.pad_id).long()  # (B, T)
            # re-check the derived mask: a pad in the middle or a row of pads only would pool wrongly
            mask = validate.attention_mask("attention_mask (from config.pad_id)", mask, tuple(ids.shape),
                                           right_padded=True)
        return ids, mask

    def encode_text(self, text) -> torch.Tensor:
        """Token ids (B, T) - a tensor from `tokenize` or a tokenizer's dict - -> embeddings (B, E).

        Equals `text_projection(text(ids, mask).pooled)`, read at the end-of-text token.
        """
        input_ids, mask = self._text_inputs(text)  # checked: right padding (on CPU, see check_tokens)
        t = self.text
        x = t._embed(input_ids)  # (B, T, D)
        last = last_token_index(mask, input_ids)  # (B,)
        # Right padding under a causal mask: real tokens never see the pads, so the padding mask
        # changes nothing we read. Leaving it out lets the blocks use the fused causal kernel; the
        # pooled query at `last` sees the keys up to itself.
        pooled = t.transformer(x, causal=True, pool_index=last).last_hidden_state  # (B, D)
        return self.text_projection(t.ln_final(pooled))  # (B, E)

    # ------------------------------------------------------------------ logits and loss
    def scale(self) -> torch.Tensor:
        """exp(logit_scale) = 1 / temperature, clamped at `config.logit_scale_max`."""
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def clamp_logit_scale_(self) -> None:
        """Clamp the stored log scale in place to [0, ln(logit_scale_max)], as OpenAI does after each
        optimizer step: past the maximum, the clamp in `scale()` would pass it no gradient, and it
        could never come back down."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.config.logit_scale_max))

    def after_step(self) -> None:
        """Called by `minivl.train.Trainer` after every optimizer update (call it yourself in a hand-written
        loop): the loss only reads the parameters, the update is where they may leave their range."""
        self.clamp_logit_scale_()

    def forward(self, image: torch.Tensor, text) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)), like OpenAI's CLIP."""
        image_features = F.normalize(self.encode_image(image).float(), dim=-1)
        text_features = F.normalize(self.encode_text(text).float(), dim=-1)
        logits_per_image = self.scale() * image_features @ text_features.T  # (B_img, B_txt)
        return logits_per_image, logits_per_image.T

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Contrastive loss on batch{image, input_ids, attention_mask}: the pairs on the diagonal, plus
        batch["positives"] (B, B) when given (text j also describes image i; see `clip_loss`).

        Training under DDP (torch.distributed initialised with world_size > 1, train mode, grad
        enabled), every process's features are gathered first, so each row's negatives are the whole
        global batch and every rank computes the same global loss (`_across_ranks`). In eval mode or
        under no_grad the loss is over this process's rows (an eval_fn on every rank sees one batch)."""
        if not isinstance(batch, dict):
            raise TypeError(f"CLIP.loss needs a dict batch, got {type(batch).__name__}")
        for key in ("image", "input_ids"):
            if key not in batch:
                raise ValueError(f"CLIP.loss needs batch[{key!r}], got keys {sorted(batch)}")
        image_features = self.encode_image(batch["image"])
        text_features = self.encode_text({"input_ids": batch["input_ids"],
                                          "attention_mask": batch.get("attention_mask")})
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(f"CLIP.loss needs one caption per image: batch['image'] has {image_features.shape[0]} "
                             f"rows, batch['input_ids'] {text_features.shape[0]}")
        positives = batch.get("positives")
        if self.training and torch.is_grad_enabled() and distributed.world_size() > 1:
            image_features, text_features, positives = _across_ranks(batch, image_features, text_features)
        scale = self.scale()
        loss = clip_loss(image_features, text_features, temperature=1 / scale, positives=positives)
        with torch.no_grad():  # in-batch retrieval accuracy: a cheap sign of learning
            sims = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
            pos = positives
            pos = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device) if pos is None else pos.bool()
            rows = torch.arange(sims.shape[0], device=sims.device)
            i2t = pos[rows, sims.argmax(1)].float().mean()  # the best text is a valid caption
            t2i = pos[sims.argmax(0), rows].float().mean()
        # tensors, not floats: .item() would make the host wait for the device every step
        return loss, {"i2t_acc": i2t, "t2i_acc": t2i, "logit_scale": scale.detach()}

    def split_batch(self, batch: dict, n: int, *, ranks: bool = False) -> list[dict]:
        """`batch` cut into n row chunks for `minivl.train.Trainer`: accumulation micro-batches, or,
        with ranks=True, one share per DDP process.

        Per-row fields are cut as by `minivl.distributed.split_batch`; `positives` (B, B) is pairwise,
        so chunk k gets its square block positives[rows_k][:, rows_k]. Without DDP a micro-batch is
        then its own contrastive batch: a row's negatives are the other rows of its micro-batch, so
        accumulation_steps=A trains on A batches of B/A pairs, not on one of B - fewer negatives, a
        different loss (open_clip's accum_freq caches the other micro-batches' features to keep them
        all; minivl does not).

        ranks=True also gives each share `global_rows` (b,), its rows' places in the whole batch, and,
        with positives, `global_positives` (b, B), its rows of the whole mask: `loss` gathers both to
        rebuild the mask among every process's rows. The shares must be equal (all_gather needs one
        shape). Under DDP with accumulation, micro-batch i of every rank is gathered into one
        contrastive batch of B/A rows (rank r's i-th slice of its share): as many rows as one
        process's micro-batch, but other ones, so the update is exactly one process's with
        accumulation_steps=A on the batch reordered that way - not on the batch as given.
        """
        if not isinstance(batch, dict):
            raise TypeError(f"CLIP.split_batch needs a dict batch, got {type(batch).__name__}")
        rows = distributed.batch_rows(batch)
        if rows is None or not isinstance(n, int) or n < 1:
            return distributed.split_batch(batch, n)  # raises its ValueError for either
        if ranks and rows % n:
            raise ValueError(f"under DDP CLIP gathers every process's features, so the shares must be equal: "
                             f"a batch of {rows} rows cannot make {n} of them; use a multiple of {n}")
        positives = batch.get("positives")
        rest = {k: v for k, v in batch.items() if k != "positives"}
        if positives is not None and tuple(positives.shape) != (rows, rows):
            raise ValueError(f"positives must be ({rows}, {rows}) for a batch of {rows} rows, got "
                             f"{tuple(positives.shape)}")
        if ranks and "global_rows" not in batch:
            device = next(v.device for v in batch.values() if isinstance(v, torch.Tensor))
            rest["global_rows"] = torch.arange(rows, device=device)
            if positives is not None:
                rest["global_positives"] = positives  # (B, B) -> each share's (b, B) rows
        chunks = distributed.split_batch(rest, n)
        if positives is not None:
            for i, chunk in enumerate(chunks):
                part = distributed.share(rows, n, i)
                chunk["positives"] = positives[part, part]  # (b, b): the pairs inside the chunk
        return chunks

    def tokenize(self, texts: str | list[str], truncate: bool = False) -> torch.Tensor:
        """`minivl.clip.tokenize` with this model's tokenizer and context length, on its device."""
        tokenizer = self.tokenizer if self.tokenizer is not None else world_tokenizer()
        ids = tokenizer(texts, context_length=self.config.text.context_length, truncate=truncate)["input_ids"]
        return ids.to(self.logit_scale.device)  # (B, context_length)


__all__ = ["CLIP", "CLIPConfig", "PRESETS", "CONTEXT_LENGTH", "clip_loss"]
