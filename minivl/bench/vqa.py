"""`python -m minivl bench vqa`: training questions/s of minivl's ViLT against `transformers.ViltForQuestionAnswering`.

Both are the same network: the `transformers` model is built from minivl's config
(`minivl.vqa.convert.hf_config_from`: linear patch stem, full attention, every patch kept) and
minivl's weights are ported from it, so both start from the same function and the first losses
agree. One training step = forward on a batch of (Shapes World image, question) pairs, the
soft-score BCE x answers (the loss both implement), backward, AdamW. Timed in interleaved rounds
by `minivl.bench.time_many`, in fp32 and then with bf16 autocast, in the same run.

A second line times what the recipe actually trains: the same batch *packed* (each image once,
all its questions in one sequence), as questions/s, against transformers on the unpacked batch.

The one idea to take away: with the same arithmetic, speed is overhead (mask building, patch
sampling, Python per layer); with packing, the arithmetic itself shrinks.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

import minivl
from minivl.bench import time_many
from minivl.vqa import Packer, ViltConfig, world_scenes
from minivl.vqa.convert import from_transformers, hf_config_from

SCENES = {"cpu": 8, "cuda": 64, "mps": 16}  # scenes per batch; all their questions (~17 each) are the rows


def _inputs(config: ViltConfig, scenes: int, device):
    from minivl.data import image_to_tensor, world_tokenizer
    from minivl.world import World
    tok = world_tokenizer()
    world = World(image_size=config.image_size)
    sc = world_scenes(world, "train", scenes)
    images = image_to_tensor(np.stack([s["image"] for s in sc]))
    packer = Packer(tok, config.label2id, config.context_length)
    packed = {k: v.to(device) for k, v in packer(images, [s["questions"] for s in sc], [s["answers"] for s in sc]).items()}
    rows = [i for i, s in enumerate(sc) for _ in s["questions"]]
    enc = tok([q for s in sc for q in s["questions"]], padding="longest")
    keep = packed["question_mask"]
    flat = {"pixel_values": images[rows].to(device), "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device), "targets": packed["targets"][keep]}
    return flat, packed, len(rows), tok.pad_id


def main(args) -> int:
    try:
        import transformers
    except ImportError:
        print("bench vqa compares against transformers.ViltForQuestionAnswering: pip install transformers")
        return 1
    device = minivl.device(getattr(args, "device", None))
    preset = "gpu" if device.type == "cuda" else "cpu"
    from minivl.world import World
    answers = tuple(World().answers)
    config = ViltConfig.preset(preset, answers=answers, stem="linear", vision=None, image_attends_text=True,
                               position_every_layer=False)  # transformers' ViLT adds the positions once
    flat, packed, Q, pad = _inputs(config, SCENES.get(device.type, 8), device)
    packed_config = ViltConfig.preset(preset, answers=answers, stem="linear", vision=None, image_attends_text=False, pad_id=pad)
    iters = getattr(args, "steps", None) or 10
    print(f"ViLT VQA training step, preset {preset!r} ({config.image_size}px, {config.width}x{config.depth}, "
          f"{len(answers)} answers), {Q} questions on {SCENES.get(device.type, 8)} images, {iters} timed steps, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"load {os.getloadavg()[0]:.1f}")
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        hf = transformers.ViltForQuestionAnswering(hf_config_from(config)).to(device).train()
        ours = from_transformers(hf).to(device).train()
        packer_model = type(ours)(packed_config).to(device).train()
        packer_model.load_state_dict(ours.state_dict())
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in
                (("minivl", ours), ("packed", packer_model), ("transformers", hf))}

        def step(name, fn):
            def run():
                with autocast:
                    loss = fn()
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                opts[name].step()
            return run

        hf_loss = lambda: hf(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"],  # noqa: E731
                             pixel_values=flat["pixel_values"], labels=flat["targets"]).loss
        fns = {"minivl": step("minivl", lambda: ours.loss(flat)[0]),
               "packed": step("packed", lambda: packer_model.loss(packed)[0]),
               "transformers": step("transformers", hf_loss)}
        with torch.no_grad():
            first = (ours.loss(flat)[0].item(), hf_loss().item())
        res = time_many(fns, items=Q, warmup=2, iters=iters, device=device)
        r = {k: v["items_per_s"] for k, v in res.items()}
        print(f"  {precision}: minivl {r['minivl']:7.1f} q/s | transformers {r['transformers']:7.1f} q/s | ratio "
              f"{r['minivl'] / r['transformers']:.2f}x (first losses {first[0]:.4f} / {first[1]:.4f}); packed "
              f"(one image per scene) {r['packed']:7.1f} q/s = {r['packed'] / r['transformers']:.2f}x")
    print("  target: minivl >= 1.0x in fp32 and bf16 (same computation)")
    return 0
