"""A LLaVA-style multimodal LLM: CLIP's patch tokens, projected, become words of a causal LM.

Follows LLaVA-1.5 ("Improved Baselines with Visual Instruction Tuning", Liu et al., 2023): the
CLIP vision tower, frozen, read at its penultimate layer (the last layer is shaped by the
contrastive objective's class token; the one before keeps more local detail; `vision_layer`: the
course's cpu recipe reads its 4-block tower at the middle, hidden state 2), patch tokens only
(no class token); a projector of two linear layers with a GELU between them, into the LM's
width; a causal LM that reads the projected patches exactly where the prompt's `<image>` stood.
nanoVLM's pixel shuffle is an option of the projector: each 2 x 2 block of patches is folded
into one token of 4x the width, so the LM reads 4x fewer image tokens for the same pixels.

Names and call shapes follow transformers' `LlavaForConditionalGeneration`: `forward(input_ids,
attention_mask, pixel_values)`, `get_image_features(pixel_values)`, `generate(**inputs,
max_new_tokens=...)` (through `minivl.generation`, the one decoding engine, on its
`inputs_embeds` path), and `minivl.mllm.convert` ports such a model's weights into this one.

The one idea to take away: an image enters an LLM as a run of ordinary input vectors. The LM
does not know which positions were words and which were patches; the projector's only job is to
make patch features look like embeddings the LM can read, which is why stage 1 trains it alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minivl import generation, validate
from minivl.checkpoint import Checkpointable
from minivl.lm import CausalLM, LMConfig
from minivl.vit import ViTConfig, VisionTransformer, patch_attribute_loss, sincos_2d

WORLD_VOCAB = 512  # the Shapes World BPE every preset reads (minivl.data.world_tokenizer())
_SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|image|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_IDS = {t: WORLD_VOCAB - len(_SPECIALS) + i for i, t in enumerate(_SPECIALS)}  # pad 504 ... end 511
_TOKENS = dict(vocab_size=WORLD_VOCAB, pad_id=_IDS["<|pad|>"], bos_id=_IDS["<|bos|>"], eos_id=_IDS["<|end|>"])

PRESETS = {
    "tiny": dict(vision=dict(image_size=32, patch_size=8, width=32, depth=2, heads=2),
                 lm=dict(context_length=192, width=32, depth=2, heads=2, **_TOKENS), pixel_shuffle=1),
    # the CLIP (clip-cpu) and LM (lm-cpu) checkpoints' sizes; 192 positions hold 16 image tokens
    # and a whole Shapes World conversation (the LM was trained on 48)
    "cpu": dict(vision=dict(image_size=64, patch_size=8, width=64, depth=4, heads=4),
                lm=dict(context_length=192, width=128, depth=4, heads=4, **_TOKENS), pixel_shuffle=2),
    "gpu": dict(vision=dict(image_size=128, patch_size=8, width=384, depth=8, heads=6),
                lm=dict(context_length=384, width=384, depth=8, heads=6, **_TOKENS), pixel_shuffle=2),
}
PRESETS["cpu-long"] = PRESETS["cpu"]


@dataclass
class MLLMConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)  # the CLIP image tower (CLIP's `visual`)
    lm: LMConfig = field(default_factory=LMConfig)  # the causal LM; eos_id = <|end|>, the end of a turn
    vision_layer: int = -2  # which hidden state of the tower to read (-2 = penultimate, as LLaVA-1.5)
    pixel_shuffle: int = 1  # fold r x r patches into one token (nanoVLM): r**2 x fewer image tokens
    projector_hidden: int | None = None  # hidden width of the projector; None = the LM width (LLaVA)
    projector_depth: int = 2  # linear layers in the projector, GELU between (LLaVA-1.5's "mlp2x_gelu")
    # a LayerNorm on the (pixel-shuffled) patch features before the first linear layer, as Qwen2-VL's patch
    # merger: the frozen tower's residual stream is not normalised; False = LLaVA-1.5 (no norm)
    projector_norm: bool = False
    image_token_id: int = _IDS["<|image|>"]  # the id the processor writes once per image token
    freeze_vision: bool = True  # LLaVA never trains CLIP: features run without gradients
    # > 0: a learned position table for the image tokens, starting as this x 2-D sin-cos, added to the projector's
    # output (the LM's own positions, norm ~0.3, are faint next to image tokens of norm ~10); 0 = LLaVA (none).
    # Screened short (150 + 250 cpu steps, 150 test scenes): 40.3% answers at 1.0, 39.6% at 0.5, 44.0% without;
    # position answers stayed at 50%. The whole cpu recipe at 1.0: 49.7% answers (48.9% without), position 49.8%:
    # here the LM does not learn to read where in 1,100 steps, strong positions or not
    # Again with packing + region supervision + vision_layer=2 (the cpu recipe; 300 test scenes, 1 thread, 2026-12-04),
    # against 64.7% / 62.5% without (seeds 0 / 1): at 1.0, 65.9% (position 63.9%) / 62.3% (position 49.3%); at 2.0,
    # 65.7% (position 61.6%); at 1.0 with projector_norm 65.3% (position 47.6%, relation 59.9%). Within seed noise: off
    # At 1.0 and added again before every LM block, as VQA's position_every_layer (a screen, 2026-12-07, seed 0): 67.1%,
    # but position 52.0%, relation 54.2%, closest 40.7%: what VQA learnt in 3,000 steps of ~135 questions, the LM does
    # not in 720 steps of 128; off
    image_positions: float = 0.0
    # region supervision (off when empty), as minivl.vqa's: a linear head on the LM's last hidden state at every
    # image token predicts what lies under it (per attribute its classes + "none": Shapes World's colour, shape,
    # size), so that the image positions are made to carry what is where; patch_loss weighs it (LlavaModel.loss)
    patch_classes: tuple[int, ...] = ()
    patch_loss: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.lm, dict):
            self.lm = LMConfig(**self.lm)
        if not isinstance(self.vision, ViTConfig) or not isinstance(self.lm, LMConfig):
            raise TypeError(f"MLLMConfig.vision/lm must be a ViTConfig/LMConfig (or dict), got "
                            f"{type(self.vision).__name__}, {type(self.lm).__name__}")
        validate.integer("MLLMConfig.vision_layer", self.vision_layer, -(self.vision.depth + 1), self.vision.depth)
        validate.positive_int("MLLMConfig.pixel_shuffle", self.pixel_shuffle)
        validate.positive_int("MLLMConfig.projector_depth", self.projector_depth)
        if self.projector_hidden is not None:
            validate.positive_int("MLLMConfig.projector_hidden", self.projector_hidden)
        validate.vocab_id("MLLMConfig.image_token_id", self.image_token_id, self.lm.vocab_size, optional=False)
        validate.boolean("MLLMConfig.freeze_vision", self.freeze_vision)
        validate.boolean("MLLMConfig.projector_norm", self.projector_norm)
        self.image_positions = validate.real("MLLMConfig.image_positions", self.image_positions, 0.0)
        self.patch_classes = tuple(self.patch_classes)
        if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in self.patch_classes):
            raise ValueError(f"MLLMConfig.patch_classes must be ints >= 2 (classes per attribute, 'none' included), "
                             f"got {self.patch_classes!r}")
        self.patch_loss = validate.real("MLLMConfig.patch_loss", self.patch_loss, 0.0)
        if self.vision.grid % self.pixel_shuffle:
            raise ValueError(f"pixel_shuffle={self.pixel_shuffle} must divide the patch grid {self.vision.grid}")

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image becomes in the LM: (grid / pixel_shuffle) ** 2."""
        return (self.vision.grid // self.pixel_shuffle) ** 2

    @classmethod
    def preset(cls, name: str, **overrides) -> "MLLMConfig":
        """A named preset; `vision=` / `lm=` overrides are dicts merged into the preset's."""
        if name not in PRESETS:
            raise ValueError(f"unknown MLLM preset {name!r}; choose from {sorted(PRESETS)}")
        p = {**PRESETS[name]}
        vision = {**p.pop("vision"), **overrides.pop("vision", {})}
        lm = {**p.pop("lm"), **overrides.pop("lm", {})}
        return cls(vision=ViTConfig(**vision), lm=LMConfig(**lm), **{**p, **overrides})


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, N, D) patch tokens on a g x g grid -> (B, N / r**2, D * r**2): each r x r block of
    neighbours becomes one token (nanoVLM's space-to-depth). Nothing is lost, only regrouped."""
    if r == 1:
        return x
    g = int(round(x.shape[1] ** 0.5))
    if g * g != x.shape[1] or g % r:
        raise ValueError(f"pixel_shuffle needs a square grid divisible by {r}, got {x.shape[1]} tokens")
    return rearrange(x, "b (h r1 w r2) d -> b (h w) (r1 r2 d)", h=g // r, w=g // r, r1=r, r2=r)  # (B, N/r², r²D)


class Projector(nn.Module):
    """Patch features (B, N, Dv) -> LM input vectors (B, N, D): [LayerNorm,] Linear, then (GELU, Linear) x (depth - 1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, depth: int = 2, norm: bool = False) -> None:
        super().__init__()
        hidden = hidden or out_dim
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        self.norm = nn.LayerNorm(in_dim) if norm else None
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(F.gelu(x) if i else x)
        return x


class LlavaModel(Checkpointable, nn.Module):
    """input_ids (B, T) with image tokens + pixel_values (n_images, 3, H, W) -> logits (B, T, V)."""

    config_class = MLLMConfig

    def __init__(self, config: MLLMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.vision = VisionTransformer(c.vision)
        self.projector = Projector(c.vision.width * c.pixel_shuffle**2, c.lm.width, c.projector_hidden,
                                   c.projector_depth, c.projector_norm)
        self.lm = CausalLM(c.lm)
        g = c.vision.grid // c.pixel_shuffle
        self.image_pos = nn.Parameter(c.image_positions * sincos_2d(g, c.lm.width)) if c.image_positions else None
        if c.freeze_vision:
            self.vision.requires_grad_(False)
        self.patch_head = nn.Linear(c.lm.width, sum(c.patch_classes)) if c.patch_classes else None  # built last
        self.tokenizer = None  # set by load() to the tokenizer saved with the checkpoint

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_vision:
            self.vision.eval()  # a frozen tower stays in eval mode (dropout off), as LLaVA's
        return self

    # ------------------------------------------------------------------ the bridge
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> (n, num_image_tokens, D): what replaces the image tokens."""
        c = self.config
        with torch.set_grad_enabled(torch.is_grad_enabled() and not c.freeze_vision):
            hidden = self.vision.hidden_state(pixel_values, c.vision_layer)  # (n, 1 + N, Dv)
        patches = hidden[:, 1:]  # (n, N, Dv): the class token is CLIP's summary, not a place in the image
        tokens = self.projector(pixel_shuffle(patches, c.pixel_shuffle))  # (n, N / r², D)
        return tokens if self.image_pos is None else tokens + self.image_pos.to(tokens.dtype)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with every image token's row replaced by an image feature,
        images taken in reading order (row by row, left to right), as transformers' LLaVA does."""
        c = self.config
        ids = validate.token_ids("input_ids", input_ids, c.lm.vocab_size)
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(ids.shape)}")
        is_image = ids == c.image_token_id  # (B, T)
        n_tokens, n_images = int(is_image.sum()), 0 if pixel_values is None else len(pixel_values)
        if n_tokens != n_images * c.num_image_tokens:
            raise ValueError(f"input_ids hold {n_tokens} image tokens, but {n_images} image(s) x "
                             f"{c.num_image_tokens} tokens each = {n_images * c.num_image_tokens} were expected: "
                             "one <image> in the prompt per image, expanded by the processor")
        x = self.lm.embed(ids)  # (B, T, D)
        if n_images:
            feats = self.get_image_features(pixel_values).to(x.dtype)  # (n, N, D)
            x = x.masked_scatter(is_image[..., None], feats.reshape(-1, x.shape[-1]))  # (B, T, D)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, hidden_only: bool = False) -> torch.Tensor:
        """Next-token logits (B, T, V). attention_mask (B, T): 1 = real, 0 = pad (either side).
        segment_ids / position_ids (B, T): a packed batch (`minivl.mllm.data.pack_chats`).
        hidden_only=True: the LM's final hidden states (B, T, D) instead (`CausalLM.forward`)."""
        T, L = input_ids.shape[-1], self.config.lm.context_length
        if T > L:
            raise ValueError(f"the prompt is {T} tokens after image expansion, more than the context length {L}")
        return self.lm(inputs_embeds=self.embed_inputs(input_ids, pixel_values), attention_mask=attention_mask,
                       position_ids=position_ids, segment_ids=segment_ids, hidden_only=hidden_only)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean cross-entropy on the assistant's tokens: batch = input_ids, attention_mask,
        pixel_values, labels (B, T) aligned with input_ids, -100 where there is no loss; a packed
        batch adds segment_ids and position_ids (`minivl.mllm.data.pack_chats`)."""
        if not isinstance(batch, dict) or not {"input_ids", "labels"} <= set(batch):
            raise TypeError(f"LlavaModel.loss needs a dict with input_ids, labels (and attention_mask, "
                            f"pixel_values), got {sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        ids = batch["input_ids"]
        region = self.patch_head is not None and "patch_labels" in batch and self.config.patch_loss > 0
        hidden = self(ids, batch.get("attention_mask"), batch.get("pixel_values"), position_ids=batch.get("position_ids"),
                      segment_ids=batch.get("segment_ids"), hidden_only=True)  # (B, T, D)
        labels = validate.tensor("batch['labels']", batch["labels"], shape=tuple(hidden.shape[:2]), kind="int")
        targets = labels[:, 1:].to(hidden.device).long()  # (B, T-1): token t+1 is predicted at t
        scored = targets != -100  # (B, T-1)
        if validate.on_cpu(targets) and not scored.any():
            raise ValueError("LlavaModel.loss: no assistant token to score (every label is -100)")
        # the LM head only where an answer token is predicted (about a tenth of a chat's positions): the same
        # mean cross-entropy as over all logits with ignore_index, without (B, T, V) logits nobody reads
        logits = self.lm.lm_head(hidden[:, :-1][scored]).float()  # (M, V)
        loss = F.cross_entropy(logits, targets[scored])
        acc = (logits.argmax(-1) == targets[scored]).float().mean()
        logs = {"token_acc": acc.detach()}
        if region:
            tokens = hidden[ids.to(hidden.device) == self.config.image_token_id]  # (n * N, D), images in order
            part = self.region_loss(tokens.reshape(-1, self.config.num_image_tokens, tokens.shape[-1]),
                                    batch["patch_labels"])
            logs["patch_loss"] = part.detach()
            loss = loss + self.config.patch_loss * part
        return loss, logs

    def region_loss(self, tokens: torch.Tensor, patch_labels: torch.Tensor) -> torch.Tensor:
        """The LM's last hidden states at the image tokens (n, N, D) -> the summed cross-entropy of each
        attribute of `patch_labels` (n, N, K) long (the class under each token's patch block, -100 = ignore)."""
        c = self.config
        N, K = c.num_image_tokens, len(c.patch_classes)
        if not isinstance(patch_labels, torch.Tensor) or tuple(patch_labels.shape) != (tokens.shape[0], N, K):
            raise ValueError(f"patch_labels must be ({tokens.shape[0]}, {N}, {K}): per image, image token and "
                             f"attribute, got {tuple(getattr(patch_labels, 'shape', ()))}")
        return patch_attribute_loss(self.patch_head(tokens), patch_labels, c.patch_classes)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, *, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """New tokens (B, T_new) after each prompt, by `minivl.generation.generate` (greedy by default;
        do_sample, top_k, top_p, num_beams, ... as there). Stops at <|end|> (lm.config.eos_id).
        Unlike transformers, only the new tokens are returned (decode them with the processor)."""
        max_new_tokens = validate.positive_int("max_new_tokens", max_new_tokens)
        L = self.config.lm.context_length
        T = input_ids.shape[-1]
        if T + max_new_tokens > L:
            raise ValueError(f"no room left to generate: the prompt is {T} tokens after image expansion and "
                             f"max_new_tokens={max_new_tokens}, but the context length is {L}; shorten the "
                             f"prompt or ask for at most {max(L - T, 0)} new tokens")
        was = self.training
        if was:  # (module.train walks every submodule: skipped when already in eval mode)
            self.eval()
        try:
            x = self.embed_inputs(input_ids, pixel_values)  # (B, T, D)
        finally:
            if was:
                self.train()
        return generation.generate(self.lm, inputs_embeds=x, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens, **kwargs)


def load_parts(model: LlavaModel, clip=None, lm: CausalLM | None = None) -> LlavaModel:
    """Fill the vision tower from a CLIP (its `visual`) and the LM from a trained CausalLM, in place.
    The LM's positions grow to the model's context (`CausalLM.resize_position_embeddings`)."""
    if clip is not None:
        model.vision.load_state_dict(clip.visual.state_dict())
    if lm is not None:
        if lm.config.width != model.config.lm.width or lm.config.vocab_size != model.config.lm.vocab_size:
            raise ValueError(f"the LM has width {lm.config.width}, vocab {lm.config.vocab_size}; this model "
                             f"needs {model.config.lm.width}, {model.config.lm.vocab_size}")
        lm.resize_position_embeddings(model.config.lm.context_length)
        model.lm.load_state_dict(lm.state_dict())
    return model


__all__ = ["MLLMConfig", "PRESETS", "LlavaModel", "Projector", "pixel_shuffle", "load_parts"]
