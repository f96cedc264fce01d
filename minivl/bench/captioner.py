"""`python -m minivl bench captioner`: minivl's BLIP against `transformers.BlipForConditionalGeneration`.

Both models are the same network: a transformers BLIP is built from the captioner's cpu (or gpu)
preset - vision tower, BERT text decoder, LM head - at random init, and its weights are ported into
minivl's Captioner (`minivl.captioner.convert`), so both compute the same function (the first
losses are printed side by side, and the beam captions are compared token for token).

Measured in interleaved rounds by `minivl.bench.time_many`, in the same run:
- a training step: the captioning (LM) loss with label smoothing 0.1 on a batch of Shapes World
  images and captions behind the "a picture of" prompt, backward, AdamW (transformers' BLIP
  captioner has only this loss, so minivl runs `objectives=("lm",)`);
- batched captioning throughput: beam search with 3 beams on a batch of images, captions/s.

The one idea to take away: the arithmetic is identical, so the ratio measures overhead - how the
cache, the masks and the beam bookkeeping are done - which small models on a CPU feel most.
"""
from __future__ import annotations

import torch

import minivl
from minivl.bench import time_many
from minivl.captioner import CaptionerConfig

BATCH = {"cpu": 48, "cuda": 256, "mps": 64}
GEN_BATCH = {"cpu": 32, "cuda": 256, "mps": 64}
MAX_NEW = 20  # tokens per caption; random weights rarely stop early, so both sides decode all of them


def hf_config_from(config: CaptionerConfig):
    """A transformers BlipConfig with the architecture of a captioner config (BLIP's ViT: patch bias, no ln_pre)."""
    import transformers
    v, t = config.vision, config.text
    return transformers.BlipConfig(
        vision_config=dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.depth,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                           layer_norm_eps=v.norm_eps, hidden_act="gelu",
                           initializer_range=0.02),  # BLIP's vision default, 1e-10, makes every image look alike
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                         num_hidden_layers=t.depth, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                         layer_norm_eps=t.norm_eps, bos_token_id=config.dec_id, pad_token_id=config.pad_id,
                         sep_token_id=config.eos_id, eos_token_id=config.eos_id, label_smoothing=config.label_smoothing),
        image_text_hidden_size=config.embed_dim)


def build_pair(preset: str, device: torch.device):
    """(minivl Captioner with objectives=("lm",), transformers BlipForConditionalGeneration), same weights."""
    import transformers

    from minivl.captioner.convert import from_transformers
    from minivl.data import world_tokenizer
    base = CaptionerConfig.preset(preset, objectives=("lm",))
    torch.manual_seed(0)
    hf = transformers.BlipForConditionalGeneration(hf_config_from(base))
    ours = from_transformers(hf, prompt=base.prompt, objectives=("lm",), bos_id=base.bos_id, enc_id=base.enc_id)
    ours.tokenizer = world_tokenizer()
    return ours.to(device), hf.to(device)


def _batch(ours, B: int, device: torch.device) -> dict:
    from minivl.data import image_to_tensor
    from minivl.world import World
    world, tok = World(image_size=ours.config.vision.image_size), ours.tokenizer
    scenes = [world.scene(i, "train") for i in range(B)]
    enc = tok([world.captions(s)[0] for s in scenes], context_length=32, padding="longest")
    x = {"image": image_to_tensor(torch.stack([torch.from_numpy(s.image) for s in scenes]).numpy()), **enc}
    x = {k: v.to(device) for k, v in x.items()}
    x["lm"] = ours.lm_inputs(x["input_ids"], x["attention_mask"])  # the same [DEC] prompt caption for both
    return x


def main(args) -> int:
    device = minivl.device(getattr(args, "device", None))
    preset = "gpu" if device.type == "cuda" else "cpu"
    ours, hf = build_pair(preset, device)
    B, G = BATCH.get(device.type, 48), GEN_BATCH.get(device.type, 32)
    x = _batch(ours, B, device)
    ids, mask, labels = x["lm"]
    print(f"captioner bench, {preset} preset on {device} ({torch.get_num_threads()} threads): "
          f"vision {ours.config.vision.width}x{ours.config.vision.depth}, text {ours.config.text.width}x{ours.config.text.depth}")
    with torch.no_grad():
        first = (ours.train().loss(x)[0].item(),
                 hf.train()(pixel_values=x["image"], input_ids=ids, attention_mask=mask, labels=labels).loss.item())
    opts = {"minivl": torch.optim.AdamW(ours.parameters(), lr=1e-4), "transformers": torch.optim.AdamW(hf.parameters(), lr=1e-4)}

    def step_ours():
        loss, _ = ours.loss(x)
        opts["minivl"].zero_grad(set_to_none=True)
        loss.backward()
        opts["minivl"].step()

    def step_hf():
        loss = hf(pixel_values=x["image"], input_ids=ids, attention_mask=mask, labels=labels).loss
        opts["transformers"].zero_grad(set_to_none=True)
        loss.backward()
        opts["transformers"].step()

    res = time_many({"minivl": step_ours, "transformers": step_hf}, items=B, warmup=2, iters=args_iters(args, 8),
                    device=device)
    train_ratio = res["minivl"]["items_per_s"] / res["transformers"]["items_per_s"]
    print(f"  training step (LM loss, batch {B}): minivl {res['minivl']['items_per_s']:.1f} img/s | transformers "
          f"{res['transformers']['items_per_s']:.1f} img/s | ratio {train_ratio:.2f}x (first losses {first[0]:.4f} / {first[1]:.4f})")

    ours.eval(), hf.eval()
    px = x["image"][:G] if G <= B else x["image"].repeat(G // B + 1, 1, 1, 1)[:G]
    prompt = torch.tensor([[ours.config.dec_id, *ours.prompt_ids(), ours.config.eos_id]], device=device).expand(len(px), -1)
    kw = dict(num_beams=3, max_new_tokens=MAX_NEW)
    with torch.no_grad():
        a = ours.generate(px, **kw)
        b = hf.generate(pixel_values=px, input_ids=prompt.clone(), **kw)[:, prompt.shape[1] - 1:]
    same = sum(torch.equal(r, s[:len(r)]) for r, s in zip(a, b))
    gen = time_many({"minivl": lambda: ours.generate(px, **kw),
                     "transformers": lambda: hf.generate(pixel_values=px, input_ids=prompt.clone(), **kw)},
                    items=len(px), warmup=1, iters=args_iters(args, 3), device=device)
    gen_ratio = gen["minivl"]["items_per_s"] / gen["transformers"]["items_per_s"]
    print(f"  beam-3 captioning (batch {len(px)}, {MAX_NEW} new tokens): minivl {gen['minivl']['items_per_s']:.1f} "
          f"captions/s | transformers {gen['transformers']['items_per_s']:.1f} captions/s | ratio {gen_ratio:.2f}x "
          f"({same}/{len(px)} captions identical)")
    print(f"targets: training >= 1.0x ({'met' if train_ratio >= 1 else 'NOT met'}), "
          f"beam-3 captions/s >= 1.5x ({'met' if gen_ratio >= 1.5 else 'NOT met'})")
    return 0


def args_iters(args, default: int) -> int:
    return getattr(args, "steps", None) or default  # `--steps N`: timed rounds
