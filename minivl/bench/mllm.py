"""`python -m minivl bench mllm`: minivl's LLaVA against transformers' LlavaForConditionalGeneration.

Both are the same network (a CLIP vision tower + GPT-2 text model built from minivl's cpu config by
`minivl.mllm.convert.hf_config_from`, weights ported, so the first losses agree). transformers has
no pixel shuffle, so both read all 64 patches of an image as tokens here. Timed in one run,
interleaved (`minivl.bench.time_many`):
- a training step (stage 2: projector + LM train, the tower frozen): loss on the assistant tokens
  of real Shapes World chats, backward, AdamW;
- generation tokens/s at batch 1 and batch 16: greedy, a chat prompt with one image, exactly
  `new` tokens each (min_new_tokens = max_new_tokens), KV cache on both sides.

The one idea to take away: the arithmetic is the same; what differs is the work around it (mask
building, cache bookkeeping, logits processors), which dominates small models decoding one token.
"""
from __future__ import annotations

import os

import torch

import minivl
from minivl.bench import time_many

NEW_TOKENS = 24


def build_pair(device):
    """(minivl LlavaModel, transformers LlavaForConditionalGeneration) with identical weights."""
    import transformers

    from minivl import mllm
    from minivl.mllm import convert
    torch.manual_seed(0)
    preset = "gpu" if device.type == "cuda" else "cpu"
    config = mllm.MLLMConfig.preset(preset, pixel_shuffle=1)
    hf = transformers.LlavaForConditionalGeneration(convert.hf_config_from(config, attn_implementation="sdpa"))
    ours = convert.from_transformers(hf)
    ours.config.lm.eos_id, ours.config.lm.pad_id = config.lm.eos_id, config.lm.pad_id
    for p in hf.model.vision_tower.parameters():  # LLaVA trains the projector + LM, never CLIP
        p.requires_grad_(False)
    return ours.to(device), hf.to(device)


def _train_batch(ours, device, batch_size: int = 32) -> dict:
    from minivl.mllm import LlavaProcessor
    from minivl.mllm.data import world_batches
    from minivl.world import World
    processor = LlavaProcessor.from_model(ours)
    batch = world_batches(World(image_size=ours.config.vision.image_size), processor, batch_size, 2)(0)
    return {k: v.to(device) for k, v in batch.items()}


def train_steps(ours, hf, batch):
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for n, m in (("minivl", ours), ("transformers", hf))}
    labels = batch["labels"]

    def step_ours():
        loss, _ = ours.loss(batch)
        opts["minivl"].zero_grad(set_to_none=True)
        loss.backward()
        opts["minivl"].step()

    def step_hf():
        loss = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], labels=labels).loss
        opts["transformers"].zero_grad(set_to_none=True)
        loss.backward()
        opts["transformers"].step()
    return {"minivl": step_ours, "transformers": step_hf}


def generate_fns(ours, hf, batch_size: int, device):
    from minivl.mllm import LlavaProcessor
    from minivl.world import World
    processor = LlavaProcessor.from_model(ours)
    world = World(image_size=ours.config.vision.image_size)
    prompts = [f"USER: <image>\nWhat is in this image?{' Be brief.' * (i % 3)}\nASSISTANT:" for i in range(batch_size)]
    x = processor(text=prompts, images=[world.scene(i, "test").image for i in range(batch_size)])
    x = {k: v.to(device) for k, v in x.items()}
    pad, eos = ours.config.lm.pad_id, ours.config.lm.eos_id

    def gen_ours():
        return ours.generate(**x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    def gen_hf():
        return hf.generate(**x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=pad, eos_token_id=eos)
    return {"minivl": gen_ours, "transformers": gen_hf}


def main(args) -> int:
    try:
        import transformers
    except ImportError:
        print("bench mllm compares against transformers.LlavaForConditionalGeneration: pip install transformers")
        return 1
    device = minivl.device(getattr(args, "device", None))
    iters = getattr(args, "steps", None) or 10
    ours, hf = build_pair(device)
    c = ours.config
    print(f"LLaVA, cpu preset sizes (ViT {c.vision.width}x{c.vision.depth} -> {c.num_image_tokens} image tokens, LM "
          f"{c.lm.width}x{c.lm.depth}), {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, load {os.getloadavg()[0]:.1f}")
    batch = _train_batch(ours, device)
    ours.train(), hf.train()
    with torch.no_grad():
        first = (ours.loss(batch)[0].item(), hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                               pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.item())
    B = batch["input_ids"].shape[0]
    res = time_many(train_steps(ours, hf, batch), items=B, warmup=2, iters=iters, device=device)
    ratio = res["minivl"]["items_per_s"] / res["transformers"]["items_per_s"]
    print(f"  training step, batch {B} x {batch['input_ids'].shape[1]} tokens: minivl {res['minivl']['items_per_s']:.1f}"
          f" chats/s | transformers {res['transformers']['items_per_s']:.1f} chats/s | ratio {ratio:.2f}x "
          f"(first losses {first[0]:.4f} / {first[1]:.4f})")
    ours.eval(), hf.eval()
    ratios = {}
    for bs in (1, 16):
        fns = generate_fns(ours, hf, bs, device)
        with torch.no_grad():
            same = torch.equal(fns["minivl"]().cpu(), fns["transformers"]()[:, -NEW_TOKENS:].cpu())
        res = time_many(fns, items=bs * NEW_TOKENS, warmup=1, iters=max(3, iters // 2), device=device)
        ratios[bs] = res["minivl"]["items_per_s"] / res["transformers"]["items_per_s"]
        print(f"  generation, batch {bs:2d}, {NEW_TOKENS} new tokens: minivl {res['minivl']['items_per_s']:7.1f} tok/s "
              f"| transformers {res['transformers']['items_per_s']:7.1f} tok/s | ratio {ratios[bs]:.2f}x "
              f"(same tokens: {same})")
    print("  target: generation >= 1.5x at both batch sizes: " + ("met" if min(ratios.values()) >= 1.5 else "NOT met"))
    return 0
