"""`python -m minivl bench vit`: training images/s of minivl's ViT next to `transformers.ViTModel`.

Both models have the same size (width, depth, heads, MLP width, patch and image size), the same
kind of linear head on the class token, the same loss and the same AdamW step; `transformers`
uses its "sdpa" attention, as minivl's fast path does. One training step (forward, backward,
optimizer step) is timed, in fp32 and under bf16 autocast, with `minivl.bench.time_many`
(interleaved rounds, median). Without `transformers` installed, only minivl is measured.

The one idea to take away: a from-scratch model need not be a slow model. Both sides spend
their time in the same matmuls and the same fused attention kernel; what is left to lose is
glue (extra copies, reshapes, masks built every step), which is what this bench would expose.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import minivl
from minivl.bench import time_many
from minivl.vit import ViTClassifier, ViTConfig


class HFViTClassifier(nn.Module):
    """`transformers.ViTModel` (no pooler) with a linear head on the class token, like ViTClassifier."""

    def __init__(self, c: ViTConfig) -> None:
        super().__init__()
        from transformers import ViTConfig as HFViTConfig
        from transformers import ViTModel

        hf = HFViTConfig(hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.heads,
                         intermediate_size=int(c.width * c.mlp_ratio), hidden_act=c.activation,
                         image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=c.norm_eps,
                         hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout)
        hf._attn_implementation = "sdpa"
        self.vit = ViTModel(hf, add_pooling_layer=False)
        self.head = nn.Linear(c.width, c.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(pixel_values=images).last_hidden_state[:, 0])  # (B, num_classes)


def _train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()
    return step


def bench(preset: str = "cpu", batch_size: int = 64, iters: int = 10, warmup: int = 3,
          device: str | None = None, bf16: bool = False, reference: bool = True,
          num_classes: int = 32) -> dict[str, float]:
    """Training images/s for minivl's ViT (and transformers', when installed and `reference`)."""
    dev = minivl.device(device)
    config = ViTConfig.preset(preset, num_classes=num_classes)
    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, config.image_size, config.image_size, device=dev)  # (B, 3, H, W)
    labels = torch.randint(0, num_classes, (batch_size,), device=dev)
    models = {"minivl": ViTClassifier(config)}
    if reference:
        try:
            models["transformers"] = HFViTClassifier(config)
        except ImportError:
            pass
    steps = {name: _train_step(m.to(dev).train(), images, labels, bf16) for name, m in models.items()}
    timed = time_many(steps, items=batch_size, warmup=warmup, iters=iters, device=dev)
    return {name: t["items_per_s"] for name, t in timed.items()}


def main(args) -> int:
    iters = getattr(args, "steps", None) or 10
    device = getattr(args, "device", None)
    c = ViTConfig.preset("cpu")
    print(f"ViT training step (forward + backward + AdamW), preset cpu: {c.image_size}px, patch {c.patch_size}, "
          f"width {c.width}, depth {c.depth}, heads {c.heads}; batch 64; median of {iters} steps; "
          f"device {minivl.device(device)}, {torch.get_num_threads()} threads")
    for bf16 in (False, True):
        result = bench("cpu", iters=iters, device=device, bf16=bf16)
        label = "bf16 autocast" if bf16 else "fp32"
        line = "  ".join(f"{name} {ips:8.1f} img/s" for name, ips in result.items())
        if "transformers" in result:
            line += f"  ratio minivl/transformers {result['minivl'] / result['transformers']:.2f}"
        else:
            line += "  (transformers not installed: no reference)"
        print(f"{label:>14}: {line}")
    return 0
