"""ViLT: one transformer reads the question and the image together (single-stream fusion).

Follows ViLT (Kim et al., 2021, "ViLT: Vision-and-Language Transformer Without Convolution or
Region Supervision"): the question is embedded like BERT (word + position embeddings, LayerNorm),
the image like ViT (a linear projection of patches, a class token, position embeddings that are
interpolated when the image grid differs from training), a *modality-type embedding* is added to
every token to say which stream it came from, and the concatenation goes through one pre-norm
transformer (the one in `minivl/transformer.py`). The first token's output, through a pooler
(linear + tanh), feeds the VQA head (Linear to 2x width, LayerNorm, GELU, Linear to the answers),
trained with soft VQA scores and binary cross-entropy scaled by the number of answers, as ViLT
(after BAN, Kim et al. 2018) trains. An optional image-text matching (ITM) head is ViLT's
pretraining objective.

Course-scale levers live here as options (all off = the paper's model, which `convert.py`
ports from `transformers`):
- `image_attends_text=False`: image tokens attend only to image tokens. Question tokens still read
  the image at every layer with the same weights (still one stream), but now the image encoding
  does not depend on the question, so *many questions can share one image* in a single packed
  sequence with a block mask (`forward_packed`): one image encoding serves ~17 questions.
- `stem="conv"`: a small convolutional stem before patchifying (Xiao et al., 2021, "Early
  convolutions help transformers see better"): shapes are finer than a patch.
- `fan_in_init=True`: the fusion transformer starts from N(0, 1/fan_in) weights instead of GPT-2's
  N(0, 0.02), which at width 128 is ~4x too small: attention starts flat and learns to pick patches late.
- `stem="vit"`: the image tokens are a (CLIP) ViT's patch tokens at `vision_layer`, projected to the
  fusion width (optionally frozen, optionally `image_pool`-ed k x k): CLIP initialisation, the way
  ViLT itself starts from a pretrained ViT.
- `patch_classes` (+ `patch_loss`): *region supervision*, which ViLT's title says it avoids. A linear
  head on every output image token predicts colour, shape and size of the object under its patch
  (labels from the scene's boxes, `minivl.vqa.patch_labels`). A linear probe shows why it helps here:
  frozen clip-cpu patch tokens tell an object patch's colour ~90% of the time but its shape only ~35%
  (a patch sees a corner, not a circle), and most questions name objects by shape.
- `position_scale` (0.1) and `position_every_layer`: how strong the 2-D sin-cos start of the patch
  positions is, and whether they are added to the image tokens again before every block. At 0.1 next
  to CLIP features of norm ~11, "is the circle on the left or right?" stayed at chance for a whole
  cpu run, though a linear probe reads left/right from the tokens (99%): too faint a signal for the
  answer gradient to find. At 0.5, added before every block, it is learnt.

The one idea to take away: fusion happens inside attention. A question word can attend to the
one patch it is about, at every layer, which a late-fusion model (pooled image vector + pooled
question vector) can never do: it must squeeze "where" into a vector before it knows the question.
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
from minivl.transformer import Transformer, init_weights
from minivl.vit import VisionTransformer, ViTConfig, check_images, patch_attribute_loss, sincos_2d

WORLD_VOCAB, WORLD_PAD_ID = 512, 504  # the Shapes World BPE (`minivl.data.world_tokenizer()`)

CLIP_CPU_VISION = dict(image_size=64, patch_size=8, width=64, depth=4, heads=4)  # clip-cpu's image tower
PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, context_length=24, image_attends_text=False),
    # positions x0.5 re-added before every block: "left or right?" went from chance (49%) to 75% (2,000-step probes)
    "cpu": dict(image_size=64, patch_size=8, width=128, depth=4, heads=4, stem="vit", vision=CLIP_CPU_VISION,
                image_attends_text=False, fan_in_init=True, position_scale=0.5, position_every_layer=True),
    "cpu-long": dict(image_size=64, patch_size=8, width=128, depth=4, heads=4, stem="vit", vision=CLIP_CPU_VISION,
                     image_attends_text=False, fan_in_init=True, position_scale=0.5, position_every_layer=True),
    "gpu": dict(image_size=128, patch_size=8, width=384, depth=8, heads=6, stem="conv", image_attends_text=False),
}


class AnswerLabels:
    """`id2label` / `label2id` of a config with an `answers` tuple, as `transformers` configs name them."""

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.answers))

    @property
    def label2id(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.answers)}


@dataclass
class ViltConfig(AnswerLabels):
    vocab_size: int = WORLD_VOCAB  # token ids are 0 .. vocab_size - 1
    context_length: int = 32  # longest question (bos/eos included): the text position table
    pad_id: int = WORLD_PAD_ID  # id of the padding token (its rows of the mask are 0)
    image_size: int = 64  # training image side; other sizes interpolate the position grid
    patch_size: int = 8  # pixels per patch side
    width: int = 128  # token width D
    depth: int = 4  # transformer blocks (shared by both modalities: single stream)
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    norm_eps: float = 1e-5  # LayerNorm epsilon (ViLT's weights use 1e-12)
    dropout: float = 0.0  # attention/MLP/embedding dropout
    stem: str = "linear"  # "linear" (ViLT: one strided conv = a linear map per patch), "conv", or "vit"
    vision: ViTConfig | None = None  # stem="vit": a (CLIP) ViT whose patch tokens are the image tokens
    vision_layer: int = -2  # which of its hidden states (-2: the input of its last block, as LLaVA reads)
    freeze_vision: bool = True  # keep that ViT fixed (its features are what CLIP learned)
    image_pool: int = 1  # stem="vit": average k x k patch tokens into one (k^2 fewer image tokens)
    fan_in_init: bool = False  # fusion transformer weights N(0, 1/fan_in) (residual outputs / sqrt(2 depth))
    #                            instead of GPT-2's N(0, 0.02): at width 128 that is ~4x larger, so q.k starts
    #                            ~16x less flat and attention can start to pick patches sooner
    image_attends_text: bool = True  # ViLT: every token sees every token; False enables packing
    answers: tuple[str, ...] = ()  # the answer vocabulary: id2label[i] = answers[i]
    itm: bool = False  # add the image-text matching head (ViLT's pretraining objective)
    patch_classes: tuple[int, ...] = ()  # region supervision (off when empty): a dense head on every output image
    #                                      token predicts, per attribute, the class of the object under its patch
    #                                      (Shapes World: colour, shape, size, each with a last class "none")
    patch_loss: float = 1.0  # weight of that dense cross-entropy (summed over the attributes) in the loss
    position_scale: float = 0.1  # the image positions start as this x 2-D sin-cos: at 0.1 (next to CLIP features of
    #                              norm ~11) "is it on the left?" stayed at chance for 3,000 steps; at 0.5-1.0 it is learnt
    position_every_layer: bool = False  # add the image position embedding to the image tokens again before every
    #                                     block, not only at the input (where region supervision and the blocks
    #                                     wash it out: "is it on the left?" needs *where* in the late tokens)

    def __post_init__(self) -> None:
        validate.config_fields(self, ints=dict(vocab_size=1, context_length=1, pad_id=0, image_size=1, patch_size=1,
                                               width=1, depth=0, heads=1),
                               reals=dict(mlp_ratio=(0, None, True), norm_eps=(0, None, True), position_scale=(0, None),
                                          dropout=(0, 1, False, True)), strings=("stem",))
        if self.stem not in ("linear", "conv", "vit"):
            raise ValueError(f"stem must be 'linear', 'conv' or 'vit', got {self.stem!r}")
        if (self.stem == "vit") != (self.vision is not None):
            raise ValueError("stem='vit' needs a vision=ViTConfig (and only it does)")
        if self.vision is not None:
            if isinstance(self.vision, dict):
                self.vision = ViTConfig(**self.vision)
            if (self.vision.image_size, self.vision.patch_size) != (self.image_size, self.patch_size):
                raise ValueError(f"the ViT stem reads {self.vision.image_size}px images in {self.vision.patch_size}px "
                                 f"patches; the config says {self.image_size} and {self.patch_size}")
            if self.grid % self.image_pool:
                raise ValueError(f"image_pool {self.image_pool} must divide the {self.grid}-patch grid")
            if not -self.vision.depth - 1 <= self.vision_layer < 0:
                raise ValueError(f"vision_layer must be in [-{self.vision.depth + 1}, -1], got {self.vision_layer}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.stem == "conv" and self.patch_size % 4:
            raise ValueError(f"the conv stem halves the image twice: patch_size must be a multiple of 4, "
                             f"got {self.patch_size}")
        if not isinstance(self.answers, (list, tuple)) or not all(isinstance(a, str) for a in self.answers):
            raise TypeError(f"answers must be a tuple of strings, got {self.answers!r:.80}")
        self.answers = tuple(self.answers)
        for name in ("fan_in_init", "position_every_layer"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.image_pool != 1 and self.stem != "vit":
            raise ValueError("image_pool is an option of the ViT stem (stem='vit')")
        self.patch_classes = tuple(self.patch_classes)
        if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in self.patch_classes):
            raise ValueError(f"patch_classes must be ints >= 2 (classes per attribute, 'none' included), "
                             f"got {self.patch_classes!r}")
        if not (isinstance(self.patch_loss, (int, float)) and self.patch_loss >= 0):
            raise ValueError(f"patch_loss must be a weight >= 0, got {self.patch_loss!r}")
        if len(self.answers) == 0:
            raise ValueError("the answer vocabulary is empty (answers=()): VQA classifies over answers; "
                             "build it with minivl.vqa.answer_vocabulary(...)")
        if len(set(self.answers)) != len(self.answers):
            raise ValueError("answers must be distinct")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_labels(self) -> int:
        return len(self.answers)


    @classmethod
    def preset(cls, name: str, **overrides) -> "ViltConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown ViLT preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


@dataclass
class VQAOutput:
    logits: torch.Tensor  # (B, A) answer scores (sigmoid = predicted VQA score)
    pooled: torch.Tensor  # (B, D) pooler output (linear + tanh of the first token)
    tokens: torch.Tensor  # (B, T + 1 + N, D) after the final LayerNorm: text, then image class token + patches
    attentions: list[torch.Tensor] | None = field(default=None)  # depth entries of (B, H, S, S)


class ConvStem(nn.Module):
    """Two stride-2 3x3 convolutions, then a (patch/4)-strided projection: one token per patch."""

    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        c = max(8, width // 4)
        self.conv1 = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(2 * c, width, patch_size // 4, stride=patch_size // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.conv2(F.gelu(self.conv1(x)))))  # (B, D, H/patch, W/patch)


class ViltForQuestionAnswering(Checkpointable, nn.Module):
    """(input_ids (B, T), attention_mask (B, T), pixel_values (B, 3, H, W)) -> VQAOutput(logits (B, A), ...)."""

    config_class = ViltConfig
    checkpoint_name = "VQAViLT"

    def __init__(self, config: ViltConfig) -> None:
        super().__init__()
        self.config = c = config
        self.word_embed = nn.Embedding(c.vocab_size, c.width)
        self.text_pos = nn.Parameter(torch.zeros(c.context_length, c.width))
        self.text_norm = nn.LayerNorm(c.width, eps=c.norm_eps)  # BERT's embedding LayerNorm
        self.visual = VisionTransformer(c.vision) if c.stem == "vit" else None
        self.patch_embed = {"linear": lambda: nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size),
                            "conv": lambda: ConvStem(c.width, c.patch_size),
                            "vit": lambda: nn.Sequential(nn.LayerNorm(c.vision.width if c.vision else 1),
                                                         nn.Linear(c.vision.width if c.vision else 1, c.width))}[c.stem]()
        self.image_cls = nn.Parameter(torch.zeros(c.width))
        self.image_pos = nn.Parameter(torch.zeros(1 + (c.grid // c.image_pool)**2, c.width))
        self.modality = nn.Embedding(2, c.width)  # 0 = text, 1 = image
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.width, c.depth, c.heads, mlp_ratio=c.mlp_ratio, norm_eps=c.norm_eps,
                                       dropout=c.dropout)
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.pooler = nn.Linear(c.width, c.width)
        # the head's LayerNorm keeps PyTorch's eps even in ViLT's 1e-12 weights (as transformers builds it)
        self.head = nn.Sequential(nn.Linear(c.width, 2 * c.width), nn.LayerNorm(2 * c.width),
                                  nn.GELU(), nn.Linear(2 * c.width, c.num_labels))
        self.itm_head = nn.Linear(c.width, 2) if c.itm else None
        self.apply(init_weights)
        if self.visual is not None:
            self.visual.requires_grad_(not c.freeze_vision)
        for m in self.patch_embed.modules():  # fan-in init: N(0, 0.02) would make patches ~10x fainter than words
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                nn.init.normal_(m.weight, std=(2 / fan_in) ** 0.5 if m is not getattr(self.patch_embed, "proj", m)
                                and c.stem == "conv" else fan_in ** -0.5)
        # prior init (Lin et al., 2017): each sigmoid starts at 1/A, the share of a random answer, so BCE
        # does not spend its first hundred steps pushing every logit down from 0.5
        nn.init.constant_(self.head[3].bias, -math.log(max(1, c.num_labels - 1)))
        nn.init.normal_(self.text_pos, std=0.02)
        nn.init.normal_(self.image_cls, std=0.02)
        with torch.no_grad():  # sin-cos positions (scaled to the token scale) as the start of learned ones
            self.image_pos[1:] = c.position_scale * sincos_2d(c.grid // c.image_pool, c.width)
        if c.fan_in_init:
            self._fan_in_init()
        # built last, so that with the option off every other weight starts exactly as before
        self.patch_head = nn.Linear(c.width, sum(c.patch_classes)) if c.patch_classes else None

    def _fan_in_init(self) -> None:
        """N(0, 1/fan_in) for the fusion transformer's (and the ViT stem projection's) linear maps, the
        residual-branch outputs (attention out_proj, MLP fc2) further / sqrt(2 depth) as GPT-2 scales them."""
        modules = list(self.transformer.named_modules())
        if self.config.stem == "vit":
            modules += [(f"patch_embed.{n}", m) for n, m in self.patch_embed.named_modules()]
        for name, m in modules:
            if isinstance(m, nn.Linear):
                std = m.in_features ** -0.5
                if name.endswith(("out_proj", "fc2")):
                    std /= (2 * self.config.depth) ** 0.5
                nn.init.normal_(m.weight, std=std)

    # ---------------------------------------------------------------- embeddings
    def embed_text(self, input_ids: torch.Tensor, attention_mask=None,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked ids (B, T) -> (token embeddings (B, T, D), mask (B, T)); position_ids (B, T) restart
        the positions at every question of a packed row (default 0 .. T-1)."""
        c = self.config
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] > c.context_length \
                and position_ids is None:
            raise ValueError(f"the question is {input_ids.shape[1]} tokens, longer than the model's text context "
                             f"({c.context_length}); pass truncation=True to the processor to cut it")
        ids = validate.token_ids("input_ids", input_ids, c.vocab_size, None if position_ids is not None
                                 else c.context_length)
        if ids.shape[0] == 0:
            raise ValueError("empty batch: input_ids has 0 rows")
        mask = (torch.ones_like(ids) if attention_mask is None else
                validate.attention_mask("attention_mask", attention_mask, tuple(ids.shape)))
        pos = self.text_pos[:ids.shape[1]] if position_ids is None else self.text_pos[position_ids]  # (T|B,T, D)
        x = self.text_norm(self.word_embed(ids) + pos)  # (B, T, D)
        return x + self.modality.weight[0], mask.to(ids.device)

    def embed_image(self, pixel_values) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] (any H, W multiple of the patch) -> class token + patches (B, 1 + N, D)."""
        c = self.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be a (B, 3, H, W) tensor, got "
                             f"{type(pixel_values).__name__} {tuple(getattr(pixel_values, 'shape', ()))}")
        if pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have 3 channels (RGB), got {pixel_values.shape[1]}")
        if pixel_values.shape[0] == 0:
            raise ValueError("empty batch: pixel_values has 0 images")
        H, W = pixel_values.shape[-2:]
        if H % c.patch_size or W % c.patch_size:
            raise ValueError(f"image sides must be multiples of patch_size {c.patch_size}, got {H}x{W}")
        dtype = next(self.patch_embed.parameters()).dtype
        if H == W:  # float, finite, in [-1, 1]: the ViT's checks
            pixel_values = check_images(pixel_values, H, dtype)
        elif not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be float in [-1, 1] (use minivl.vqa.ViltProcessor), got {pixel_values.dtype}")
        if self.visual is not None:
            return self._embed_vit(pixel_values)
        x = self.patch_embed(pixel_values.to(dtype))  # (B, D, gh, gw)
        gh, gw = x.shape[-2:]
        x = rearrange(x, "b d gh gw -> b (gh gw) d")  # (B, N, D)
        pos = self.image_positions(gh, gw)  # (1 + N, D)
        cls = self.image_cls.expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + pos  # (B, 1 + N, D)
        return self.drop(x) + self.modality.weight[1]

    def token_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """(gh, gw): the grid of image tokens for these (checked) pixels."""
        c = self.config
        k = c.patch_size * c.image_pool
        return pixel_values.shape[-2] // k, pixel_values.shape[-1] // k

    def image_positions(self, gh: int, gw: int) -> torch.Tensor:
        """(1 + gh*gw, D): the class token's position, then the patch grid's; another grid than training's
        stretches the learned one bilinearly (as ViLT)."""
        c = self.config
        g = c.grid // c.image_pool
        pos = self.image_pos[1:]
        if (gh, gw) != (g, g):
            grid = rearrange(pos, "(gh gw) d -> 1 d gh gw", gh=g)
            grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=True)
            pos = rearrange(grid, "1 d gh gw -> (gh gw) d")  # (N, D)
        return torch.cat([self.image_pos[:1], pos], 0)

    def _embed_vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """stem="vit": the ViT's tokens at `vision_layer` (class token + patches), projected to D."""
        v, c = self.visual, self.config
        if pixel_values.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(f"the ViT stem reads {c.image_size}x{c.image_size} images, got "
                             f"{tuple(pixel_values.shape[-2:])}: resize with the processor")
        frozen = not any(p.requires_grad for p in v.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # a frozen tower needs no graph
            x = v.hidden_state(pixel_values, c.vision_layer)  # (B, 1 + N, Dv)
            if c.image_pool > 1:  # k x k patches -> one token: fewer keys for every word to search
                g = rearrange(x[:, 1:], "b (gh gw) d -> b d gh gw", gh=c.grid)
                g = F.avg_pool2d(g, c.image_pool)  # (B, Dv, grid/k, grid/k)
                x = torch.cat([x[:, :1], rearrange(g, "b d gh gw -> b (gh gw) d")], 1)  # (B, 1 + N/k^2, Dv)
        x = self.patch_embed(x) + self.image_pos  # (B, 1 + N, D)
        return self.drop(x) + self.modality.weight[1]

    # ---------------------------------------------------------------- the single stream
    def _encode(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, *,
                grid: tuple[int, int], need_weights: bool = False, text_groups: torch.Tensor | None = None):
        """text (B, T, D) + image (B, 1 + N, D) through the one transformer -> (tokens, attentions).

        grid (gh, gw) is the image's token grid (N = gh * gw, `token_grid`), for position_every_layer.

        text_groups (B, T) puts each text token in a question (packing): a token then sees only its own
        question's tokens and the image. Image tokens see the image only unless image_attends_text."""
        x = torch.cat([text, image], dim=1)  # (B, S, D), S = T + 1 + N
        B, T, S = text.shape[0], text.shape[1], x.shape[1]
        keys = torch.cat([text_mask.bool(), text_mask.new_ones(B, S - T).bool()], 1)  # (B, S)
        reinject = self.config.position_every_layer
        if self.config.image_attends_text and text_groups is None and not reinject:
            out = self.transformer(x, attention_mask=keys.long(), need_weights=need_weights)
            return self.norm(out.last_hidden_state), out.attentions
        if text_groups is not None and self.config.image_attends_text:
            raise ValueError("packing needs image_attends_text=False (the image may not read other questions)")
        if self.config.image_attends_text:  # full attention: every token reads every real token
            mask = rearrange(keys, "b s -> b 1 1 s")
        else:
            groups = text_groups if text_groups is not None else text_mask.new_zeros(B, T)
            is_image = torch.arange(S, device=x.device) >= T  # (S,)
            g = torch.cat([groups, groups.new_full((B, S - T), -1)], 1)  # (B, S): -1 = image
            same = (g[:, :, None] == g[:, None, :]) & keys[:, None, :]  # (B, S, S): own question, real tokens
            mask = same | is_image[None, None, :]  # every token reads the image...
            mask = mask & ~(is_image[None, :, None] & ~is_image[None, None, :])  # ...and the image reads only itself
            mask = rearrange(mask, "b t s -> b 1 t s")
        if reinject:
            pos = F.pad(self.image_positions(*grid), (0, 0, T, 0))  # (S, D): zeros on the text rows
        attentions = [] if need_weights else None
        for i, block in enumerate(self.transformer.blocks):
            if reinject and i > 0:  # the input already carries them once (embed_image)
                x = x + pos
            x, w = block(x, mask=mask, need_weights=need_weights)
            if need_weights:
                attentions.append(w)
        return self.norm(x), attentions

    def _head(self, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.tanh(self.pooler(first))  # (..., D)
        return self.head(pooled), pooled

    def forward(self, input_ids, pixel_values, attention_mask=None, pixel_mask=None, *,
                need_weights: bool = False, **unused) -> VQAOutput:
        """The seed's call: `model(**processor(image, question, return_tensors="pt")).logits`.

        pixel_mask (from a `transformers` processor) is accepted when it keeps every pixel: this
        model resizes instead of padding, so a partial mask would be silently ignored otherwise."""
        if unused:
            raise TypeError(f"unexpected inputs {sorted(unused)}; expected input_ids, attention_mask, pixel_values")
        if pixel_mask is not None and not bool(torch.as_tensor(pixel_mask).bool().all()):
            raise ValueError("pixel_mask with padded pixels is not supported: resize images with the processor")
        text, mask = self.embed_text(input_ids, attention_mask)
        image = self.embed_image(pixel_values)
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"{text.shape[0]} questions but {image.shape[0]} images: one image per question")
        tokens, attentions = self._encode(self.drop(text), mask, image, need_weights=need_weights,
                                          grid=self.token_grid(pixel_values))
        logits, pooled = self._head(tokens[:, 0])  # (B, A), (B, D)
        return VQAOutput(logits, pooled, tokens, attentions)

    def forward_packed(self, pixel_values, input_ids, attention_mask, question_index, position_ids,
                       question_starts) -> torch.Tensor:
        """Every question of a scene in one row: the questions' tokens concatenated (B, T), one image
        per row -> logits (B, Q, A). question_index (B, T) says which question a token belongs to,
        position_ids (B, T) its place in that question, question_starts (B, Q) where each one begins
        (its first token is its class token); `Packer` makes all of them.

        The same numbers as Q separate forward calls (with image_attends_text=False), for one image
        encoding instead of Q and no padding between questions: the block mask keeps each question
        to itself and the image."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"packed input_ids must be (B, T), got {tuple(getattr(input_ids, 'shape', ()))}")
        if int(position_ids.max()) >= self.config.context_length:
            raise ValueError(f"a packed question is longer than the text context ({self.config.context_length})")
        return self._packed(pixel_values, input_ids, attention_mask, question_index, position_ids,
                            question_starts)[0]

    def _packed(self, pixel_values, input_ids, attention_mask, question_index, position_ids, question_starts):
        """forward_packed's logits (B, Q, A) and the output tokens (B, T + 1 + N, D)."""
        text, mask = self.embed_text(input_ids, attention_mask, position_ids)  # (B, T, D)
        image = self.embed_image(pixel_values)
        tokens, _ = self._encode(self.drop(text), mask, image, text_groups=question_index,
                                 grid=self.token_grid(pixel_values))
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
        return self._head(tokens[rows, question_starts])[0], tokens  # (B, Q, A), (B, S, D)

    # ---------------------------------------------------------------- objectives
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """VQA loss: BCE against soft scores x the number of answers (ViLT); optional ITM term.

        batch: pixel_values, input_ids/attention_mask (B, T) with targets (B, A), or a packed batch
        (`Packer`: question_index, position_ids, question_starts, question_mask (B, Q), targets
        (B, Q, A)); itm_* keys add image-text matching."""
        if not isinstance(batch, dict) or not {"pixel_values", "input_ids", "targets"} <= set(batch):
            raise TypeError(f"VQA loss needs a dict with pixel_values, input_ids, attention_mask, targets; got "
                            f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        ids = batch["input_ids"]
        if "question_index" in batch:
            logits, tokens = self._packed(batch["pixel_values"], ids, batch["attention_mask"], batch["question_index"],
                                          batch["position_ids"], batch["question_starts"])  # (B, Q, A)
            keep = batch["question_mask"].bool()  # (B, Q)
            logits, targets = logits[keep], batch["targets"][keep].to(logits.dtype)  # (M, A)
        else:
            out = self(ids, batch["pixel_values"], batch.get("attention_mask"))
            logits, tokens, targets = out.logits, out.tokens, batch["targets"].to(out.logits.dtype)
        loss = vqa_loss(logits, targets)
        hit = targets.gather(1, logits.argmax(-1, keepdim=True)).mean()  # the VQA score of the top answer
        logs = {"vqa_loss": loss.detach(), "acc": hit}
        if self.patch_head is not None and "patch_labels" in batch and self.config.patch_loss > 0:
            region = self.region_loss(tokens, batch["patch_labels"])
            logs["patch_loss"] = region.detach()
            loss = loss + self.config.patch_loss * region
        if self.itm_head is not None and "itm_input_ids" in batch:
            itm = self.itm_loss(batch["itm_pixel_values"], batch["itm_input_ids"], batch["itm_attention_mask"],
                                batch["itm_labels"])
            logs["itm_loss"] = itm.detach()
            loss = loss + itm
        return loss, logs

    def region_loss(self, tokens: torch.Tensor, patch_labels: torch.Tensor) -> torch.Tensor:
        """Region supervision (not ViLT's: ViLT's point was to need none): the output image tokens
        (B, T + 1 + N, D) -> the summed cross-entropy of each attribute of `patch_labels` (B, N, K) long,
        the class of the object under each patch (-100: ignore, e.g. a patch an object only grazes)."""
        c = self.config
        N, K = (c.grid // c.image_pool) ** 2, len(c.patch_classes)
        if not isinstance(patch_labels, torch.Tensor) or tuple(patch_labels.shape) != (tokens.shape[0], N, K):
            raise ValueError(f"patch_labels must be ({tokens.shape[0]}, {N}, {K}): per image, patch and attribute, "
                             f"got {tuple(getattr(patch_labels, 'shape', ()))}")
        return patch_attribute_loss(self.patch_head(tokens[:, -N:]), patch_labels, c.patch_classes)

    def itm_loss(self, pixel_values, input_ids, attention_mask, labels) -> torch.Tensor:
        """Image-text matching: does the text describe the image? Cross-entropy on the pooled first token."""
        text, mask = self.embed_text(input_ids, attention_mask)
        tokens, _ = self._encode(text, mask, self.embed_image(pixel_values), grid=self.token_grid(pixel_values))
        pooled = torch.tanh(self.pooler(tokens[:, 0]))
        return F.cross_entropy(self.itm_head(pooled).float(), labels.long())

    @torch.no_grad()
    def word_to_patch_attention(self, input_ids, pixel_values, attention_mask=None) -> torch.Tensor:
        """How much each question token attends to each patch: (B, layers, T, gh, gw), heads averaged."""
        out = self(input_ids, pixel_values, attention_mask, need_weights=True)
        T = input_ids.shape[1]
        attn = torch.stack(out.attentions, 1).mean(2)  # (B, L, S, S)
        g = int(math.isqrt(attn.shape[-1] - T - 1))
        return rearrange(attn[:, :, :T, T + 1:], "b l t (gh gw) -> b l t gh gw", gh=g)


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE with soft targets, summed over the answers (mean x A, as ViLT): each answer is its own yes/no."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[-1]


__all__ = ["ViltConfig", "ViltForQuestionAnswering", "VQAOutput", "PRESETS", "vqa_loss", "sincos_2d"]
