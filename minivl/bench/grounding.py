"""`python -m minivl bench grounding`: images/s of `predict` and of a training step, minivl's OWL-ViT
against `transformers.OwlViTForObjectDetection` at the same config, with the same weights.

The `transformers` model is built at random init from minivl's cpu (or gpu) preset by
`minivl.grounding.convert.hf_config_from` and ported into minivl, so both compute the same function
(the first losses agree, printed as a check).
- predict: tokenise the caption's phrases, one forward pass over a batch of Shapes World images,
  then keep the patches whose best score clears the threshold - minivl's `predict` against the
  `transformers` forward plus `OwlViTImageProcessor.post_process_object_detection`.
- training step: a real Shapes World batch (`minivl.grounding.make_batch`: the batch's detection
  phrases plus each image's referring expressions), forward, the same set loss
  (`minivl.grounding.set_loss` on either model's logits and boxes), backward, AdamW. transformers
  takes text queries per image ((B * Q, T) ids), so it encodes every image's queries; minivl
  encodes the batch's distinct phrases once and gathers them - part of what is measured.

The one idea to take away: with identical arithmetic per query, how queries are batched decides
the speed - most of a detector's text work is the same phrases again and again.
"""
from __future__ import annotations

import os

import numpy as np
import torch

import minivl
from minivl.bench import time_many

BATCH = {"cpu": 32, "cuda": 128, "mps": 32}
CAPTION = "circle . square . triangle . diamond . cross . red circle . blue square"


def build_pair(preset: str, device: torch.device):
    """(minivl OWLViT, transformers OwlViTForObjectDetection, tokenizer) with identical weights."""
    import transformers

    from minivl.data import world_tokenizer
    from minivl.grounding import OWLViTConfig
    from minivl.grounding.convert import from_transformers, hf_config_from
    tokenizer = world_tokenizer()
    # the preset's towers and heads without minivl's additions (transformers has none): the same network on both sides
    from minivl.grounding.convert import PLAIN
    config = OWLViTConfig.preset(preset, pad_id=tokenizer.pad_id, **PLAIN)
    torch.manual_seed(0)
    hf = transformers.OwlViTForObjectDetection(hf_config_from(config, eos_token_id=tokenizer.eos_id,
                                                              pad_token_id=tokenizer.pad_id,
                                                              attn_implementation="sdpa"))
    ours = from_transformers(hf, pad_id=tokenizer.pad_id)
    ours.tokenizer = tokenizer
    return ours.to(device), hf.to(device), tokenizer


def predict_fns(ours, hf, tokenizer, images: np.ndarray, device):
    import transformers

    from minivl.data import image_to_tensor
    from minivl.grounding import predict, split_caption
    processor = transformers.OwlViTImageProcessor()
    phrases = split_caption(CAPTION)
    S = images.shape[1]

    def ours_fn():
        return predict(ours, list(images), CAPTION, box_threshold=0.35)

    @torch.no_grad()
    def hf_fn():
        tok = tokenizer(phrases, context_length=ours.config.clip.text.context_length, padding="longest")
        pixels = image_to_tensor(images).to(device)
        B = len(pixels)
        ids = tok["input_ids"].to(device).repeat(B, 1)  # (B * Q, T): transformers takes queries per image
        out = hf(input_ids=ids, pixel_values=pixels, attention_mask=tok["attention_mask"].to(device).repeat(B, 1))
        return processor.post_process_object_detection(out, threshold=0.35, target_sizes=[(S, S)] * B)
    return {"minivl": ours_fn, "transformers": hf_fn}


def train_fns(ours, hf, batch: dict):
    from minivl.grounding import set_loss
    opts = {"minivl": torch.optim.AdamW(ours.parameters(), lr=1e-4),
            "transformers": torch.optim.AdamW(hf.parameters(), lr=1e-4)}
    index = batch["query_index"]  # (B, Q), -1 = padding
    B, Q = index.shape
    ids = batch["input_ids"][index.clamp_min(0)]  # (B, Q, T)
    ids = torch.where((index >= 0)[..., None], ids, torch.zeros_like(ids))  # transformers: first id 0 = padding
    mask = batch["attention_mask"][index.clamp_min(0)]

    def hf_loss():
        out = hf(input_ids=ids.reshape(B * Q, -1), pixel_values=batch["image"], attention_mask=mask.reshape(B * Q, -1))
        return set_loss(out.logits, out.pred_boxes, index >= 0, batch["target_boxes"], batch["target_mask"],
                        batch["target_labels"], ours.config)[0]

    def step(name, loss_fn):
        def fn():
            loss = loss_fn()
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            return loss
        return fn
    return {"minivl": step("minivl", lambda: ours.loss(batch)[0]), "transformers": step("transformers", hf_loss)}, hf_loss


def main(args) -> int:
    try:
        import transformers
    except ImportError:
        print("bench grounding compares against transformers.OwlViTForObjectDetection: pip install transformers")
        return 1
    from minivl.distributed import to_device
    from minivl.grounding import make_batch
    from minivl.world import World
    device = minivl.device(getattr(args, "device", None))
    preset = "gpu" if device.type == "cuda" else "cpu"
    B = BATCH.get(device.type, 32)
    iters = getattr(args, "steps", None) or 20
    ours, hf, tokenizer = build_pair(preset, device)
    c = ours.config.clip
    world = World(image_size=c.vision.image_size)
    scenes = [world.scene(i, "train") for i in range(B)]
    print(f"grounding, preset {preset!r} ({c.vision.image_size}px, ViT {c.vision.width}x{c.vision.depth}, text "
          f"{c.text.width}x{c.text.depth}), batch {B}, {iters} timed rounds, {device}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, transformers {transformers.__version__}, load {os.getloadavg()[0]:.1f}")
    ours.eval(), hf.eval()
    res = time_many(predict_fns(ours, hf, tokenizer, np.stack([s.image for s in scenes]), device), items=B,
                    warmup=3, iters=iters, device=device)
    ratio_predict = res["minivl"]["items_per_s"] / res["transformers"]["items_per_s"]
    print(f"  predict:       minivl {res['minivl']['items_per_s']:8.1f} img/s | transformers "
          f"{res['transformers']['items_per_s']:8.1f} img/s | ratio {ratio_predict:.2f}x")
    batch = to_device(make_batch(world, scenes, tokenizer, c.text.context_length, np.random.default_rng(0)), device)
    ours.train(), hf.train()
    fns, hf_loss = train_fns(ours, hf, batch)
    with torch.no_grad():
        first = (ours.loss(batch)[0].item(), hf_loss().item())
    res = time_many(fns, items=B, warmup=3, iters=iters, device=device)
    ratio_train = res["minivl"]["items_per_s"] / res["transformers"]["items_per_s"]
    print(f"  training step: minivl {res['minivl']['items_per_s']:8.1f} img/s | transformers "
          f"{res['transformers']['items_per_s']:8.1f} img/s | ratio {ratio_train:.2f}x "
          f"(first losses {first[0]:.4f} / {first[1]:.4f})")
    met = ratio_predict >= 1.0 and ratio_train >= 1.0
    print("  target: minivl >= 1.0x on both: " + ("met" if met else "NOT met"))
    return 0
