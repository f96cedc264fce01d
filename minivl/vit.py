"""Vision Transformer, shaped like CLIP's image tower.

Follows "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021) in the variant OpenAI's CLIP
uses (Radford et al., 2021): a bias-free convolutional patch embedding, a learned class token,
learned position embeddings, a LayerNorm *before* the transformer (`ln_pre`), pre-norm blocks,
and a LayerNorm after it (`ln_post`). Keeping CLIP's exact shape is what lets the converter in
`minivl.clip.convert` load `transformers` CLIP weights into this module unchanged.

The one idea to take away: an image becomes a sentence. Cut it into P x P patches, project each
patch to a vector (a strided convolution does exactly that), add where it came from, and a
plain transformer does the rest; the class token is the one "word" whose job is to summarise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minivl import validate
from minivl.checkpoint import Checkpointable
from minivl.transformer import Transformer, init_weights

PRESETS = {
    "tiny": dict(image_size=32, patch_size=8, width=32, depth=2, heads=2),
    # narrow and shallow: on a 2-core CPU the budget is images seen, and this one learns the
    # 30-class task as fast per step as width 128 x depth 4 at a quarter of the cost
    "cpu": dict(image_size=64, patch_size=8, width=64, depth=2, heads=4),
    "gpu": dict(image_size=128, patch_size=8, width=384, depth=8, heads=6),
}


@dataclass
class ViTConfig:
    image_size: int = 64  # input height = width, in pixels
    patch_size: int = 8  # each token is a patch_size x patch_size x 3 square
    width: int = 128  # token width D
    depth: int = 4  # number of transformer blocks
    heads: int = 4  # attention heads; width must divide evenly
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    activation: str = "gelu"  # "quick_gelu" for OpenAI CLIP weights
    norm_eps: float = 1e-5  # LayerNorm epsilon (CLIP: 1e-5)
    dropout: float = 0.0  # attention/MLP dropout (CLIP: none)
    num_classes: int = 0  # size of the ViTClassifier head; unused by the bare encoder
    # per-channel statistics of the input (already in [-1, 1]) that `embed` standardises with, as
    # CLIP does with its dataset's mean/std; identity by default (what ported CLIP weights expect)
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    patch_bias: bool = False  # a bias in the patch embedding (BLIP's ViT has one, CLIP's does not)
    ln_pre: bool = True  # LayerNorm before the blocks (CLIP's ln_pre; BLIP's ViT has none)

    def __post_init__(self) -> None:  # a bad field fails here, not as a shape error in the first forward
        validate.config_fields(self, ints=dict(image_size=1, patch_size=1, width=1, depth=0, heads=1, num_classes=0),
                               reals=dict(mlp_ratio=(0, None, True), norm_eps=(0, None, True),
                                          dropout=(0, 1, False, True)), strings=("activation",))
        if not isinstance(self.image_mean, (tuple, list)) or not isinstance(self.image_std, (tuple, list)):
            raise TypeError(f"image_mean/image_std must be 3-tuples, got {self.image_mean!r}, {self.image_std!r}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        self.image_mean = tuple(validate.real("image_mean", v) for v in self.image_mean)
        self.image_std = tuple(validate.real("image_std", v) for v in self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean/image_std need 3 values each, std > 0; got {self.image_mean}, {self.image_std}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @classmethod
    def preset(cls, name: str, **overrides) -> "ViTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown ViT preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


@dataclass
class ViTOutput:
    tokens: torch.Tensor  # (B, 1 + N, D) after ln_post; index 0 is the class token
    pooled: torch.Tensor  # (B, D) the class token
    hidden_states: list[torch.Tensor] | None = field(default=None)  # depth + 1 entries, before ln_post
    attentions: list[torch.Tensor] | None = field(default=None)  # depth entries of (B, H, 1 + N, 1 + N)


MAX_PIXEL = 10.0  # the largest |value| an input pixel may have (see check_images)


def check_images(images, image_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """-> images as a float (B, 3, image_size, image_size) tensor of `dtype`, or a clear error.

    numpy arrays are converted; float16/float64 images are cast to `dtype` (the model's weights'),
    since a convolution refuses mixed dtypes with an error that names neither; NaN/inf pixels are
    rejected on CPU (on an accelerator a value check would be a host sync, see minivl.validate).
    """
    images = validate.tensor("images", images, shape=("B", 3, image_size, image_size), numpy=False,
                             hint="convert with torch.from_numpy(...).permute(...) or use minivl.clip.Preprocess")
    if not images.is_floating_point():
        raise TypeError(f"images must be float (use minivl.data.image_to_tensor or clip.Preprocess), got {images.dtype}")
    # Pixels come in [-1, 1] (CLIP-normalised ones within about +-3): far outside is a forgotten
    # normalisation - 0..255 floats - and gives confident garbage, not an error, unless caught here.
    # One pass over the pixels on the CPU: max |x| is NaN if any pixel is, inf if any is.
    if validate.on_cpu(images) and not images.abs().amax() <= MAX_PIXEL:
        if not torch.isfinite(images).all():
            raise ValueError("images contains NaN or inf")
        raise ValueError(f"images must lie in [-1, 1] (|x| <= {MAX_PIXEL} allowed for normalised pixels), got values "
                         f"in [{images.min().item():.4g}, {images.max().item():.4g}]: 0..255 pixels? use "
                         f"minivl.data.image_to_tensor or minivl.clip.Preprocess")
    return images if dtype is None else images.to(dtype)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine-cosine positions (MAE): an init that already says where a
    patch is, so "left"/"top" are linear read-outs from the first step instead of learned from noise."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q) / max(1, q))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = [f(c.flatten()[:, None] * omega) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    out = torch.cat(parts, 1)  # (grid*grid, 4q)
    return F.pad(out, (0, dim - out.shape[1]))


def patch_attribute_loss(logits: torch.Tensor, patch_labels: torch.Tensor, classes) -> torch.Tensor:
    """Region supervision's loss (the VQA and MLLM families): logits (B, N, sum(classes)) per patch token,
    patch_labels (B, N, K) long, the class of attribute k under each patch (-100 = ignored) -> the sum over
    the K attributes of each one's mean cross-entropy over its labelled patches. An attribute with no label
    in the batch adds 0 (a plain mean over no labels would be nan)."""
    total = logits.new_zeros((), dtype=torch.float32)
    for k, part in enumerate(logits.float().split(list(classes), -1)):
        labels = patch_labels[..., k].to(part.device).flatten().long()  # (B*N,)
        seen = (labels != -100).sum()
        summed = F.cross_entropy(part.flatten(0, 1), labels, ignore_index=-100, reduction="sum")
        total = total + summed / seen.clamp(min=1)
    return total


def neighbourhood(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens (B, N, D), N = grid * grid in row-major order -> (B, N, 9 * D): each patch's 3 x 3
    neighbourhood (itself included; zeros past the image's border), stacked channel-major (index
    d * 9 + 3 * (dy + 1) + (dx + 1)). Read from the first layer (`ln_pre(embed(x))`), it is the
    "hypercolumn" (Hariharan et al., 2015) that grounding's box head and the captioner's memory use."""
    x = rearrange(tokens, "b (h w) d -> b d h w", h=grid, w=grid)
    return rearrange(F.unfold(x, kernel_size=3, padding=1), "b k n -> b n k")  # k = D * 9


class VisionTransformer(Checkpointable, nn.Module):
    """Image (B, 3, H, W) -> tokens (B, 1 + N, D)."""

    config_class = ViTConfig

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size, bias=c.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1 + c.grid**2, c.width))
        self.ln_pre = nn.LayerNorm(c.width, eps=c.norm_eps) if c.ln_pre else nn.Identity()
        self.transformer = Transformer(c.width, c.depth, c.heads, mlp_ratio=c.mlp_ratio, activation=c.activation,
                                       norm_eps=c.norm_eps, dropout=c.dropout)
        self.ln_post = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=c.width**-0.5)
        nn.init.normal_(self.pos_embed, std=0.02)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patches + class token + positions, before ln_pre: (B, 1 + N, D)."""
        images = check_images(images, self.config.image_size, self.patch_embed.weight.dtype)
        c = self.config
        if c.image_mean != (0.0, 0.0, 0.0) or c.image_std != (1.0, 1.0, 1.0):  # skip the identity (ported weights)
            mean, std = (images.new_tensor(v).view(1, 3, 1, 1) for v in (c.image_mean, c.image_std))
            images = (images - mean) / std  # (B, 3, H, W), standardised per channel
        x = self.patch_embed(images)  # (B, D, grid, grid): one strided conv = a linear map per patch
        x = rearrange(x, "b d gh gw -> b (gh gw) d")  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], 1, -1).to(x.dtype)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + N, D)

    def forward(self, images: torch.Tensor, *, need_weights: bool = False,
                output_hidden_states: bool = False) -> ViTOutput:
        out = self.transformer(self.ln_pre(self.embed(images)), need_weights=need_weights,
                               output_hidden_states=output_hidden_states)
        tokens = self.ln_post(out.last_hidden_state)  # (B, 1 + N, D)
        return ViTOutput(tokens, tokens[:, 0], out.hidden_states, out.attentions)

    def hidden_state(self, images: torch.Tensor, layer: int = -2, first: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(images, output_hidden_states=True).hidden_states[layer]` (B, 1 + N, D), running only
        the blocks before it (-1: the last block's output, before ln_post; -2: its input, what LLaVA reads).
        `first`: hidden state 0, ln_pre(embed(images)), when the caller has computed it already."""
        depth = self.config.depth
        if isinstance(layer, bool) or not isinstance(layer, int) or not -depth - 1 <= layer <= depth:
            raise ValueError(f"layer must be an int in [-{depth + 1}, {depth}] (one of the {depth + 1} hidden "
                             f"states), got {layer!r}")
        x = self.ln_pre(self.embed(images)) if first is None else first  # (B, 1 + N, D): hidden state 0
        for block in list(self.transformer.blocks)[:layer % (depth + 1)]:
            x, _ = block(x)
        return x

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor, rollout: bool = False) -> torch.Tensor:
        """Where the class token looks, as (B, layers, grid, grid) maps (heads averaged).

        With rollout=True, attention is propagated through the residual stream layer by layer
        (Abnar & Zuidema, 2020: average heads, add the identity, renormalise, multiply), so
        layer l's map shows what the class token has gathered from the pixels up to layer l.
        """
        attn = torch.stack(self(images, need_weights=True).attentions, 1).mean(2)  # (B, L, 1+N, 1+N)
        if rollout:
            eye = torch.eye(attn.shape[-1], device=attn.device)
            a = (attn + eye) / (attn + eye).sum(-1, keepdim=True)
            joint, maps = a[:, 0], [a[:, 0]]
            for layer in range(1, attn.shape[1]):
                joint = a[:, layer] @ joint
                maps.append(joint)
            attn = torch.stack(maps, 1)  # (B, L, 1+N, 1+N)
        g = self.config.grid
        return rearrange(attn[:, :, 0, 1:], "b l (gh gw) -> b l gh gw", gh=g, gw=g)


class ViTClassifier(Checkpointable, nn.Module):
    """A ViT with a linear head on the class token; `loss` is cross-entropy on `batch["label"]`."""

    config_class = ViTConfig

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.num_classes < 1:
            raise ValueError(f"ViTClassifier needs config.num_classes >= 1, got {config.num_classes}")
        self.config = config
        self.vit = VisionTransformer(config)
        self.head = nn.Linear(config.width, config.num_classes)
        nn.init.zeros_(self.head.weight)  # start at uniform predictions: loss = log(num_classes)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(images).pooled)  # (B, num_classes)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if not isinstance(batch, dict) or "image" not in batch or "label" not in batch:
            raise TypeError(f"ViTClassifier.loss needs a dict with 'image' and 'label', got "
                            f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        logits = self(batch["image"])
        labels = validate.tensor("batch['label']", batch["label"], shape=(logits.shape[0],), kind="int",
                                 low=0, high=self.config.num_classes - 1).to(logits.device).long()
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"acc": acc}  # a tensor: .item() here would sync the device every step
