"""OWL-ViT at course scale: CLIP's towers, and two small heads on every output patch token.

Follows "Simple Open-Vocabulary Object Detection with Vision Transformers" (Minderer et al., 2022),
in the shape `transformers.OwlViTForObjectDetection` has (so `minivl.grounding.convert` ports its
weights unchanged). The image tower is minivl's CLIP ViT; its pooling is dropped and *every* output
patch token becomes a detection:

1. merge: each patch token (after ln_post) is multiplied by the class token, then LayerNorm'd -
   the class token carries the image-level context the patch alone lacks;
2. box head: a 3-layer MLP predicts 4 offsets that are *added to a box bias* - the patch's own grid
   position and a patch-sized box, written in logit space - and a sigmoid gives a normalised
   (cx, cy, w, h) box; so an untrained model already predicts one sensible box per patch;
3. class head: a linear map projects the token into CLIP's text-embedding space; after L2
   normalisation its cosine with each text-query embedding is shifted and scaled by two scalars
   the patch predicts itself: logit[n, q] = (cos(e_n, t_q) + shift_n) * (elu(scale_n) + 1).

One logit per (patch, query): the queries are just text embeddings, so any phrase - or the
embedding of an image crop - is a class.

A course-scale option, `class_positions` (on in the cpu preset, off in the paper's model that
`convert.py` ports): a learned patch-position table, starting as 2-D sin-cos, is added to the tokens
the class head reads. clip-cpu's patch tokens barely say where they are, so "the leftmost object"
(and "the object left of the square", whose referent is mostly the one object on that side) had
nothing to match; with the table it is a direction in the class embedding a query can point along. The one idea to take away: detection is classification of
patches against text, plus a box per patch; the vocabulary lives entirely in the text tower.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minivl import validate
from minivl.checkpoint import Checkpointable
from minivl.clip import CLIP, CLIPConfig
from minivl.grounding.fusion import QueryFusion
from minivl.vit import neighbourhood, sincos_2d

# the towers are CLIP's preset `clip` names (so a CLIP checkpoint loads into them); the heads are
# OWL-ViT's plain ones: the centre prior in the matching (cost_center), the dense box lessons (dense_boxes) and the
# fusion enhancer (fusion_depth) stay off - measured at 800-2,500 cpu steps none raised a figure enough for its cost
# (dense_boxes=1 lowered colour-shape COCO AP 0.48 -> 0.38 at 800 steps, 0.25 left it at 0.70 at 2,500;
# cost_center=2 0.69; fusion_depth=1 took 1.9x the time for relations 36% -> 39% at 800)
PRESETS = {
    "tiny": dict(clip="tiny"),
    # class_positions: where each patch is, for the class head (at 800 steps relational referring 36% -> 82%,
    # extreme 40% -> 81%); box_detail: the first layer's 3x3 neighbourhood for the box head (at 2,500 steps
    # colour-shape COCO AP 0.70 -> 0.92, held-out 0.64 -> 0.83; the towers frozen, a fresh head reading it gets
    # 91% of boxes to IoU >= 0.9 against 56% from the last layer alone). The gpu preset has neither measured yet.
    "cpu": dict(clip="cpu", class_positions=True, box_detail=True),
    "cpu-long": dict(clip="cpu", class_positions=True, box_detail=True),  # the same model, trained longer
    "gpu": dict(clip="gpu"),
}
BOX_ANCHORS = ("center", "corner")
NORM_EPS = 1e-6  # added to the norm before dividing, as transformers' OWL-ViT class head does


@dataclass
class OWLViTConfig:
    clip: CLIPConfig = field(default_factory=lambda: CLIPConfig.preset("tiny"))  # the two towers
    box_anchor: str = "center"  # where the box bias sits in its patch: "center", or "corner" (bottom-right,
    #                             what transformers/scenic OWL-ViT use; the port sets it)
    focal_alpha: float = 0.25  # focal loss: weight of the positive (patch, query) pairs
    focal_gamma: float = 2.0  # focal loss: how fast well-classified pairs fade from the loss
    cost_class: float = 2.0  # matching cost and loss weight of the class term (DETR's / OWL-ViT's 2, 5, 2)
    cost_l1: float = 5.0  # ... of the L1 distance of normalised cxcywh boxes
    cost_giou: float = 2.0  # ... of 1 - generalised IoU
    cost_center: float = 0.0  # matching cost only: weight of |patch centre - object centre|_1, a prior that
    #                           makes the same patch (the one holding the object's centre) win every step
    dense_boxes: float = 0.0  # weight of an extra L1 + GIoU term asking *every* patch whose centre lies in an
    #                           object for that object's box (0: only the matched patch learns a box, as OWL-ViT)
    prior_prob: float = 0.01  # the initial probability of every (patch, query) pair (RetinaNet's prior)
    logit_scale_init: float = 1.0  # the initial elu(scale) + 1 of the class head: 1 as transformers inits it;
    #                                larger lets a cosine move the logit further from the start
    fusion_depth: int = 0  # Blocks of the query-fusion enhancer (`minivl.grounding.fusion`) that referring
    #                        expressions go through before the class head; 0 = none (plain OWL-ViT, as transformers)
    fusion_mlp_ratio: float = 2.0  # the enhancer Blocks' MLP width as a multiple of the patch width
    class_positions: bool = False  # add a learned patch-position table (starting as 2-D sin-cos) to the tokens the
    #                                class head (and the fusion enhancer) read, not the box head's: CLIP's patch
    #                                tokens barely say *where* they are, which "the leftmost object" needs
    box_detail: bool = False  # the box head also reads the 3x3 neighbourhood of first-layer patch embeddings (a
    #                           "hypercolumn", Hariharan et al., 2015): the last layer's tokens have lost where an
    #                           edge falls to the pixel, the first layer's still hold it

    def __post_init__(self) -> None:
        if isinstance(self.clip, dict):
            self.clip = CLIPConfig(**self.clip)
        if not isinstance(self.clip, CLIPConfig):
            raise TypeError(f"OWLViTConfig.clip must be a CLIPConfig (or dict), got {type(self.clip).__name__}")
        if self.box_anchor not in BOX_ANCHORS:
            raise ValueError(f"box_anchor must be one of {BOX_ANCHORS}, got {self.box_anchor!r}")
        self.focal_alpha = validate.real("focal_alpha", self.focal_alpha, 0, 1)
        self.prior_prob = validate.real("prior_prob", self.prior_prob, 0, 1, low_open=True, high_open=True)
        self.logit_scale_init = validate.real("logit_scale_init", self.logit_scale_init, 0, low_open=True)
        for name in ("focal_gamma", "cost_class", "cost_l1", "cost_giou", "cost_center", "dense_boxes"):
            setattr(self, name, validate.real(name, getattr(self, name), 0))
        if isinstance(self.fusion_depth, bool) or not isinstance(self.fusion_depth, int) or self.fusion_depth < 0:
            raise ValueError(f"fusion_depth must be an int >= 0, got {self.fusion_depth!r}")
        self.fusion_mlp_ratio = validate.real("fusion_mlp_ratio", self.fusion_mlp_ratio, 0, low_open=True)
        for name in ("class_positions", "box_detail"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def grid(self) -> int:
        return self.clip.vision.grid

    @classmethod
    def preset(cls, name: str, pad_id: int | None = None, **overrides) -> "OWLViTConfig":
        """A named preset: CLIP's preset of that name for the towers (pad_id passed to it), the preset's head settings."""
        if name not in PRESETS:
            raise ValueError(f"unknown grounding preset {name!r}; choose from {sorted(PRESETS)}")
        p = dict(PRESETS[name])
        clip = CLIPConfig.preset(p.pop("clip"), **({} if pad_id is None else {"pad_id": pad_id}))
        return cls(clip=overrides.pop("clip", clip), **{**p, **overrides})


def box_bias(grid: int, anchor: str = "center") -> torch.Tensor:
    """(grid*grid, 4) logits of the box each patch predicts before training: centred on the patch
    (or at its bottom-right corner) and one patch wide. Patches are in row-major order, as the ViT's."""
    steps = torch.arange(grid, dtype=torch.float32) + (0.5 if anchor == "center" else 1.0)
    ys, xs = torch.meshgrid(steps / grid, steps / grid, indexing="ij")  # (g, g) each
    xy = torch.stack([xs, ys], -1).reshape(-1, 2).clip(0.0, 1.0)  # (N, 2)
    wh = torch.full_like(xy, 1.0 / grid)  # (N, 2)
    inv_sigmoid = lambda p: torch.log(p + 1e-4) - torch.log1p(-p + 1e-4)  # noqa: E731 (as scenic)
    return torch.cat([inv_sigmoid(xy), inv_sigmoid(wh)], -1)  # (N, 4)


class BoxHead(nn.Module):
    """Token (.., D) -> 4 box offsets in logit space: Linear-GELU-Linear-GELU-Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense0, self.dense1, self.dense2 = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.gelu(self.dense1(F.gelu(self.dense0(x)))))


class ClassHead(nn.Module):
    """Tokens (B, N, D) and queries (B, Q, E) -> logits (B, N, Q) and class embeddings (B, N, E)."""

    def __init__(self, width: int, embed_dim: int, prior_prob: float = 0.01, scale_init: float = 1.0) -> None:
        super().__init__()
        self.dense0 = nn.Linear(width, embed_dim)  # into the text-embedding space
        self.logit_shift = nn.Linear(width, 1)  # per patch: how likely *any* object is here
        self.logit_scale = nn.Linear(width, 1)  # per patch: how sharp its similarities are
        # elu(b) + 1 = scale_init: b = scale_init - 1 above 1, log(scale_init) below (elu(x) = e^x - 1 there)
        nn.init.constant_(self.logit_scale.bias, scale_init - 1 if scale_init >= 1 else math.log(scale_init))
        # start every (patch, query) at p = prior_prob (1%): most pairs are negatives, and a start at
        # p = 0.5 would spend the first hundreds of steps only pushing them all down (RetinaNet's prior)
        nn.init.constant_(self.logit_shift.bias, math.log(prior_prob / (1 - prior_prob)) / scale_init)

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        class_embeds = self.dense0(x)  # (B, N, E)
        if queries is None:
            return None, class_embeds
        e = class_embeds / (class_embeds.norm(dim=-1, keepdim=True) + NORM_EPS)
        q = queries / (queries.norm(dim=-1, keepdim=True) + NORM_EPS)
        cos = torch.einsum("bne,bqe->bnq", e, q)  # (B, N, Q)
        return (cos + self.logit_shift(x)) * (F.elu(self.logit_scale(x)) + 1), class_embeds


@dataclass
class OWLViTOutput:
    logits: torch.Tensor | None  # (B, N, Q) one logit per (patch, query); None without queries
    pred_boxes: torch.Tensor  # (B, N, 4) normalised (cx, cy, w, h) in [0, 1], one box per patch
    class_embeds: torch.Tensor  # (B, N, E) the patches in text-embedding space (unnormalised)
    image_embeds: torch.Tensor  # (B, g, g, D) the merged patch tokens as a feature map
    text_embeds: torch.Tensor | None  # (B, Q, E) the (normalised) query embeddings used


class OWLViT(Checkpointable, nn.Module):
    """Images (B, 3, H, W) in [-1, 1] and text queries -> per-patch logits (B, N, Q) and boxes (B, N, 4)."""

    config_class = OWLViTConfig

    def __init__(self, config: OWLViTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.clip = CLIP(c.clip)
        D, E = c.clip.vision.width, c.clip.embed_dim
        self.layer_norm = nn.LayerNorm(D, eps=c.clip.vision.norm_eps)  # after the patch x class-token merge
        # box_detail: the first-layer neighbourhood (9 D) projected to D, beside the merged token (D) -> 2 D wide
        self.box_detail = nn.Linear(9 * D, D) if c.box_detail else None
        self.box_head = BoxHead(2 * D if c.box_detail else D)
        self.class_head = ClassHead(D, E, c.prior_prob, c.logit_scale_init)
        self.register_buffer("box_bias", box_bias(c.grid, c.box_anchor), persistent=False)  # (N, 4)
        self.fusion = QueryFusion(D, c.clip.text.width, E, c.fusion_depth, c.clip.vision.heads, c.fusion_mlp_ratio,
                                  c.clip.vision.norm_eps) if c.fusion_depth else None
        # (N, D) where each patch is, for the class head only; sin-cos amplitude ~ the LayerNorm'd tokens'
        self.class_pos = nn.Parameter(sincos_2d(c.grid, D)) if c.class_positions else None
        self.tokenizer = None  # set by `load` (the CLIP tokenizer saved with the checkpoint)

    @classmethod
    def from_clip(cls, clip: CLIP, **overrides) -> "OWLViT":
        """An OWL-ViT whose towers start as a copy of a trained `clip`, heads fresh."""
        model = cls(OWLViTConfig(clip=clip.config, **overrides))
        model.clip.load_state_dict(clip.state_dict())
        model.tokenizer = getattr(clip, "tokenizer", None)
        return model

    # ------------------------------------------------------------------ the two towers
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> merged patch tokens (B, N, D): patch * class token, then LayerNorm."""
        return self.encode_image(images)[0]

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> (merged patch tokens (B, N, D) as `image_features`, the first-layer neighbourhoods
        (B, N, 9 D) the box head reads when config.box_detail is on, else None). One pass of the tower."""
        out = self.clip.visual(images, output_hidden_states=self.box_detail is not None)
        tokens = out.tokens  # (B, 1 + N, D), after ln_post
        # hidden state 0 (B, 1 + N, D) is what the blocks read: ln_pre(embed(images))
        detail = None if self.box_detail is None else neighbourhood(out.hidden_states[0][:, 1:], self.config.grid)
        return self.layer_norm(tokens[:, 1:] * tokens[:, :1]), detail  # (B, N, D), (B, N, 9 D) or None

    def embed_text(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Token ids (Q, T) (with their mask) -> L2-normalised query embeddings (Q, E)."""
        text = input_ids if isinstance(input_ids, dict) else {"input_ids": input_ids, "attention_mask": attention_mask}
        t = self.clip.encode_text(text)  # (Q, E)
        return t / t.norm(dim=-1, keepdim=True)

    def embed_text_tokens(self, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids (Q, T) -> (L2-normalised query embeddings (Q, E) as `embed_text`, the text tower's
        token features (Q, T, Dt), the attention mask (Q, T) bool): what the fusion enhancer reads."""
        text = input_ids if isinstance(input_ids, dict) else {"input_ids": input_ids, "attention_mask": attention_mask}
        ids, mask = self.clip._text_inputs(text)
        out = self.clip.text(ids, mask)
        t = self.clip.text_projection(out.pooled)  # (Q, E)
        return t / t.norm(dim=-1, keepdim=True), out.tokens, mask.bool()

    def fused_logits(self, features: torch.Tensor, queries: torch.Tensor, tokens: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D), queries (B, F, E), their text tokens (B, F, T, Dt) and mask (B, F, T) ->
        logits (B, N, F) of the query-conditioned patches (the fusion enhancer, then the class head)."""
        B, F_ = queries.shape[:2]
        fused = rearrange(self.fusion(features, queries, tokens, mask), "b f n d -> (b f) n d")
        logits, _ = self.class_head(fused, rearrange(queries, "b f e -> (b f) 1 e"))  # (B*F, N, 1)
        return rearrange(logits, "(b f) n 1 -> b n f", b=B, f=F_)

    def class_features(self, features: torch.Tensor) -> torch.Tensor:
        """Merged tokens (B, N, D) -> what the class head reads: the same, plus the patch positions when
        class_positions is on (the box head already knows where its patch is: the box bias)."""
        return features if self.class_pos is None else features + self.class_pos.to(features.dtype)

    def boxes(self, features: torch.Tensor, detail: torch.Tensor | None = None) -> torch.Tensor:
        """Merged tokens (B, N, D) (and, with config.box_detail, the first-layer neighbourhoods (B, N, 9 D) from
        `encode_image`) -> boxes (B, N, 4), normalised cxcywh: sigmoid(offsets + grid bias)."""
        if self.box_detail is not None:
            if detail is None:
                raise ValueError("this model's box head also reads first-layer patch details (config.box_detail): "
                                 "pass boxes(*model.encode_image(images))")
            features = torch.cat([features, F.gelu(self.box_detail(detail))], -1)  # (B, N, 2 D)
        return torch.sigmoid(self.box_head(features) + self.box_bias.to(features.dtype))

    def tokenize(self, texts: list[str]) -> dict:
        """Phrases -> {input_ids, attention_mask} (Q, T) padded to the longest, on the model's device.
        Each phrase is read as `targets.query_text` writes it ("circle" -> "a circle"), as in training."""
        from minivl.data import world_tokenizer
        from minivl.grounding.targets import query_text
        tokenizer = self.tokenizer if self.tokenizer is not None else world_tokenizer()
        out = tokenizer([query_text(t) for t in texts], context_length=self.config.clip.text.context_length, truncate=True,
                        padding="longest")
        device = self.box_bias.device
        return {k: v.to(device) for k, v in out.items()}

    # ------------------------------------------------------------------ detection
    def forward(self, images: torch.Tensor, input_ids=None, attention_mask=None, *,
                query_embeds: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                fuse: bool = False) -> OWLViTOutput:
        """Detect the text queries in the images.

        Queries: token ids (Q, T) shared by every image or (B, Q, T) one set per image (with their
        attention_mask), or ready embeddings `query_embeds` (Q, E) / (B, Q, E) - text or image crops.
        query_mask (B, Q) bool: False marks padding queries, whose logits become the dtype's minimum.
        fuse=True: the queries are referring expressions; a model with a fusion enhancer (fusion_depth > 0)
        scores them on query-conditioned patches (needs token ids; plain OWL-ViT ignores the flag).
        Returns OWLViTOutput: logits (B, N, Q) and pred_boxes (B, N, 4) normalised cxcywh.
        """
        features, detail = self.encode_image(images)  # (B, N, D), (B, N, 9 D) or None
        B = features.shape[0]
        if input_ids is not None and query_embeds is not None:
            raise ValueError("pass text queries (input_ids) or query_embeds, not both")
        fuse = bool(fuse) and self.fusion is not None
        if fuse and input_ids is None:
            raise ValueError("fuse=True needs text queries (input_ids): the fusion enhancer reads their tokens")
        tokens = token_mask = None
        if input_ids is not None:
            ids = validate.tensor("input_ids", input_ids, kind="int")
            if ids.dim() not in (2, 3):
                raise ValueError(f"input_ids must be (Q, T) or (B, Q, T), got shape {tuple(ids.shape)}")
            mask = attention_mask
            if ids.dim() == 3:  # (B, Q, T): one query set per image
                if ids.shape[0] != B:
                    raise ValueError(f"input_ids (B, Q, T) has B={ids.shape[0]}, the images B={B}")
                mask = None if mask is None else rearrange(mask, "b q t -> (b q) t")
                flat = rearrange(ids, "b q t -> (b q) t")
                if fuse:
                    query_embeds, tokens, token_mask = self.embed_text_tokens(flat, mask)
                    tokens = rearrange(tokens, "(b q) t d -> b q t d", b=B)  # (B, Q, T, Dt)
                    token_mask = rearrange(token_mask, "(b q) t -> b q t", b=B)  # (B, Q, T)
                else:
                    query_embeds = self.embed_text(flat, mask)
                query_embeds = rearrange(query_embeds, "(b q) e -> b q e", b=B)  # (B, Q, E)
            elif fuse:
                query_embeds, tokens, token_mask = self.embed_text_tokens(ids, mask)  # (Q, E), (Q, T, Dt), (Q, T)
                tokens, token_mask = tokens.expand(B, -1, -1, -1), token_mask.expand(B, -1, -1)
            else:
                query_embeds = self.embed_text(ids, mask)  # (Q, E)
        if query_embeds is not None:
            query_embeds = validate.tensor("query_embeds", query_embeds, kind="float")
            if query_embeds.dim() == 2:
                query_embeds = query_embeds.expand(B, -1, -1)  # (B, Q, E): the same queries for every image
            if query_embeds.dim() != 3 or query_embeds.shape[0] != B or \
                    query_embeds.shape[-1] != self.config.clip.embed_dim:
                raise ValueError(f"query_embeds must be (Q, {self.config.clip.embed_dim}) or (B={B}, Q, "
                                 f"{self.config.clip.embed_dim}), got {tuple(query_embeds.shape)}")
        where = self.class_features(features)  # (B, N, D)
        logits, class_embeds = self.class_head(where, None if fuse else query_embeds)
        if fuse:
            logits = self.fused_logits(where, query_embeds, tokens, token_mask)  # (B, N, Q)
        if logits is not None and query_mask is not None:
            query_mask = validate.tensor("query_mask", query_mask, shape=(B, logits.shape[-1]))
            logits = logits.masked_fill(~query_mask.bool()[:, None, :], torch.finfo(logits.dtype).min)
        g = self.config.grid
        return OWLViTOutput(logits, self.boxes(features, detail), class_embeds,
                            rearrange(features, "b (h w) d -> b h w d", h=g, w=g), query_embeds)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Set loss on batch{image, input_ids (U, T), attention_mask, query_index (B, Q), target_boxes
        (B, G, 4) normalised cxcywh, target_mask (B, G), target_labels (B, G, Q), optional query_fused (Q,)
        bool: the referring columns, scored through the fusion enhancer}: see `minivl.grounding.loss`."""
        from minivl.grounding.loss import set_loss
        for key in ("image", "input_ids", "query_index", "target_boxes", "target_mask", "target_labels"):
            if key not in batch:
                raise ValueError(f"OWLViT.loss needs batch[{key!r}], got keys {sorted(batch)}")
        features, detail = self.encode_image(batch["image"])  # (B, N, D), (B, N, 9 D) or None
        fused = batch.get("query_fused")  # (Q,) bool: the referring columns, read by the fusion enhancer
        fuse = self.fusion is not None and fused is not None and bool(fused.any())
        if fuse:  # the enhancer reads the text tokens too
            texts, tokens, token_mask = self.embed_text_tokens(batch["input_ids"], batch.get("attention_mask"))
        else:
            texts = self.embed_text(batch["input_ids"], batch.get("attention_mask"))  # (U, E): each phrase once
        index = batch["query_index"]  # (B, Q), -1 = padding
        queries = texts[index.clamp_min(0)]  # (B, Q, E)
        where = self.class_features(features)  # (B, N, D)
        logits, _ = self.class_head(where, queries)  # (B, N, Q)
        if fuse:
            cols = fused.nonzero()[:, 0].to(logits.device)  # (F,)
            sub = index[:, cols].clamp_min(0)  # (B, F)
            fused_logits = self.fused_logits(where, queries[:, cols], tokens[sub], token_mask[sub])  # (B, N, F)
            logits = logits.index_copy(2, cols, fused_logits)
        return set_loss(logits, self.boxes(features, detail), index >= 0, batch["target_boxes"], batch["target_mask"],
                        batch["target_labels"], self.config)


__all__ = ["OWLViT", "OWLViTConfig", "OWLViTOutput", "PRESETS", "box_bias"]
