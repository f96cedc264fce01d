"""`python -m minivl bench clip`: training images/s of minivl's CLIP against `transformers.CLIPModel`.

Both models are the same network (the `transformers` one is built from minivl's config by
`minivl.clip.convert.hf_config_from`, and minivl's weights are ported from it, so both start from
the very same function and the first losses agree). One training step = forward on a batch of
images and real Shapes World captions, the contrastive loss, backward, and an AdamW update. The
two are timed in interleaved rounds by `minivl.bench.time_many`, in fp32 and then with bf16
autocast (each side in the same precision), on the same machine in the same run.

`--preset vit-b-32` races OpenAI's full-size ViT-B/32 instead (224 px, ViT 768 x 12, text 512 x 12,
OpenAI's 49,408-token BPE and 77-token context; random init, nothing downloaded): the same step on
Shapes World captions tokenized by OpenAI's tokenizer, fp32 and bf16.

The one idea to take away: the arithmetic is identical, so any speed difference is overhead -
Python per layer, mask building, kernels picked - which is what a small model on a CPU feels most,
and what a full-size model, dominated by its matrix products, feels least.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

import minivl
from minivl.bench import time_many
from minivl.clip import CLIPConfig
from minivl.clip.convert import from_transformers, hf_config_from

BATCH = {"cpu": 128, "cuda": 256, "mps": 128}  # the training batch of the preset it benches
VIT_B_32_BATCH = {"cpu": 8, "cuda": 256, "mps": 32}  # full size: a CPU step of 8 already takes seconds
PRESETS = ("vit-b-32",)  # `--preset`; without one, the course's own cpu / gpu preset


def _inputs(config: CLIPConfig, batch_size: int, device: torch.device) -> dict:
    from minivl.data import CaptionDataset, collate, world_tokenizer
    from minivl.world import World
    tokenizer = world_tokenizer()
    ds = CaptionDataset(World(image_size=config.vision.image_size), "train", batch_size)
    batch = collate([ds[i] for i in range(batch_size)], tokenizer=tokenizer)
    return {"image": batch["image"].to(device), "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device), "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id}


def build_pair(config: CLIPConfig, eos_id: int, pad_id: int, device: torch.device):
    """(minivl CLIP, transformers CLIPModel) with identical weights, in train mode on `device`."""
    import transformers
    torch.manual_seed(0)
    hf = transformers.CLIPModel(hf_config_from(config, eos_token_id=eos_id, pad_token_id=pad_id,
                                               attn_implementation="sdpa"))
    ours = from_transformers(hf, pad_id=pad_id)
    return ours.to(device).train(), hf.to(device).train()


def train_steps(ours, hf, x: dict, precision: str, device: torch.device) -> dict:
    """One no-argument training-step callable per model: loss, backward, AdamW, then the logit-scale
    clamp after the update, as OpenAI's and open_clip's training loops do (minivl: `after_step`;
    `transformers` has no training loop, so we clamp its scale the same way), so both do the same work."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    log_max = math.log(ours.config.logit_scale_max)  # open_clip: clamp_(0, math.log(100))
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in (("minivl", ours), ("transformers", hf))}

    def step_ours():
        with autocast:
            loss, _ = ours.loss(x)
        opts["minivl"].zero_grad(set_to_none=True)
        loss.backward()
        opts["minivl"].step()
        ours.after_step()
        return loss

    def step_hf():
        with autocast:
            loss = hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"], pixel_values=x["image"],
                      return_loss=True).loss
        opts["transformers"].zero_grad(set_to_none=True)
        loss.backward()
        opts["transformers"].step()
        with torch.no_grad():
            hf.logit_scale.clamp_(0.0, log_max)
        return loss

    return {"minivl": step_ours, "transformers": step_hf}


def _race(build, x: dict, B: int, iters: int, device: torch.device, warmup: int) -> dict:
    """fp32 then bf16: a fresh identical pair from `build()` each time, first losses compared, then timed."""
    ratios = {}
    for precision in ("fp32", "bf16"):
        ours, hf = build()
        fns = train_steps(ours, hf, x, precision, device)
        with torch.no_grad():  # same weights, same batch: the same loss (a check that we race the same model)
            first = {"minivl": ours.loss(x)[0].item(),
                     "transformers": hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                                        pixel_values=x["image"], return_loss=True).loss.item()}
        res = time_many(fns, items=B, warmup=warmup, iters=iters, device=device)  # warm: allocator, kernel choice
        ratio = res["minivl"]["items_per_s"] / res["transformers"]["items_per_s"]
        ratios[precision] = ratio
        print(f"  {precision}: minivl {res['minivl']['items_per_s']:8.1f} img/s | transformers "
              f"{res['transformers']['items_per_s']:8.1f} img/s | ratio {ratio:.2f}x "
              f"(first losses {first['minivl']:.4f} / {first['transformers']:.4f})")
        del ours, hf, fns
    return ratios


def _vit_b_32(args, device: torch.device) -> int:
    """OpenAI's ViT-B/32 at full size, random init, against transformers' CLIPModel of the same config."""
    import transformers
    from minivl.clip.openai_bpe import openai_tokenizer
    from minivl.data import CaptionDataset
    from minivl.world import World
    tokenizer = openai_tokenizer()
    config = transformers.CLIPConfig()  # transformers' defaults are OpenAI's ViT-B/32
    size = config.vision_config.image_size
    B = getattr(args, "batch", None) or VIT_B_32_BATCH.get(device.type, 8)
    iters = getattr(args, "steps", None) or 5
    ds = CaptionDataset(World(image_size=size), "train", B)
    items = [ds[i] for i in range(B)]
    texts = tokenizer([it["text"] for it in items])  # Shapes World captions, OpenAI BPE
    x = {"image": torch.stack([it["image"] for it in items]).to(device),
         "input_ids": texts["input_ids"].to(device), "attention_mask": texts["attention_mask"].to(device)}

    def build():
        torch.manual_seed(0)
        hf = transformers.CLIPModel(transformers.CLIPConfig(attn_implementation="sdpa"))
        return from_transformers(hf).to(device).train(), hf.to(device).train()

    print(f"CLIP training step, OpenAI ViT-B/32 at full size ({size}px images, ViT {config.vision_config.hidden_size}x"
          f"{config.vision_config.num_hidden_layers}, text {config.text_config.hidden_size}x"
          f"{config.text_config.num_hidden_layers}, vocab {config.text_config.vocab_size}, 77-token texts, random init),"
          f" batch {B}, {iters} timed steps, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, load {os.getloadavg()[0]:.1f}")
    _race(build, x, B, iters, device, warmup=2)
    return 0


def main(args) -> int:
    try:
        import transformers
    except ImportError:
        print("bench clip compares against transformers.CLIPModel: pip install transformers")
        return 1
    device = minivl.device(getattr(args, "device", None))
    preset = getattr(args, "preset", None)  # the CLI has checked it against PRESETS
    if preset == "vit-b-32":
        return _vit_b_32(args, device)
    preset = "gpu" if device.type == "cuda" else "cpu"
    config = CLIPConfig.preset(preset)
    B = BATCH.get(device.type, 64)
    iters = getattr(args, "steps", None) or 20  # medians of 20 interleaved rounds: 10 swung 1.19x-1.33x here
    x = _inputs(config, B, device)
    config.pad_id = x["pad_id"]
    print(f"CLIP training step, preset {preset!r} ({config.vision.image_size}px images, ViT {config.vision.width}x"
          f"{config.vision.depth}, text {config.text.width}x{config.text.depth}), batch {B}, {iters} timed steps, "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, load {os.getloadavg()[0]:.1f}")
    ratios = _race(lambda: build_pair(config, x["eos_id"], x["pad_id"], device), x, B, iters, device, warmup=5)
    print("  target: minivl >= 1.3x in fp32: " + ("met" if ratios["fp32"] >= 1.3 else "NOT met"))
    return 0
