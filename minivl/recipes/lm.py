"""Train the causal LM on Shapes World captions; report validation perplexity and samples.

    python -m minivl train lm [--preset tiny|cpu|gpu] [--device ...] [--steps N] [--out DIR]

What it builds: a stream of captions (fresh train scenes every step, one of each scene's
phrasings drawn at random), the `minivl.train.Trainer` loop around `CausalLM.loss`, the
validation perplexity over every phrasing of the first val scenes, and samples from greedy and
sampled decoding, each checked against the caption grammar of Shapes World (`is_caption`).
The checkpoint goes to data/checkpoints/lm-<preset> (with tokenizer.json), the run folder to
data/runs/lm-<preset> (metrics.json, history.json, samples.txt, loss.png).

The one idea to take away: a language model is only next-token prediction. Perplexity
exp(mean NLL) is "how many tokens the model hesitates between"; on a small grammar it falls
towards the true ambiguity of the captions (which object comes next), far below vocab_size.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import minivl
from minivl.data import world_tokenizer
from minivl.lm import CausalLM, LMConfig
from minivl.recipes import choose, folders, timed_fit, train_config
from minivl.train import Trainer
from minivl.world import World
from minivl.world_text import NUMBERS, PLURAL, REGIONS

# Recipe settings per preset (model sizes are minivl.lm.PRESETS; vocab_size comes from the tokenizer).
RECIPES = {
    "tiny": dict(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, weight_decay=0.1, val_scenes=25,
                 eval_every=0, bf16=False),
    "cpu": dict(steps=600, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.1, val_scenes=250,
                eval_every=200, bf16=False),
    "gpu": dict(steps=4000, batch_size=256, lr=1e-3, warmup_steps=200, weight_decay=0.1, val_scenes=1000,
                eval_every=1000, bf16=True),
}
PROMPTS = ["", "there are", "two", "a large", "a red circle", "a blue square on the left,"]


def caption_batches(world: World, tokenizer, batch_size: int, context_length: int, seed: int = 0):
    """get_batch(step) -> {input_ids, attention_mask}: a pure function of (seed, step)."""
    def get_batch(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        first = seed * 2**40 + step * batch_size  # every step new scenes
        texts = []
        for j in range(batch_size):
            caps = world.captions(world.scene(first + j, "train"))
            texts.append(caps[rng.integers(len(caps))])
        return tokenize(tokenizer, texts, context_length)
    return get_batch


def tokenize(tokenizer, texts: list[str], context_length: int) -> dict:
    """bos + text + eos, padded to the longest (not to context_length: less compute); the rare
    overflow is truncated with eos kept last."""
    enc = tokenizer(texts)
    if enc["input_ids"].shape[1] > context_length:
        enc = tokenizer(texts, context_length=context_length, truncate=True)
    return enc


def val_batches(world: World, tokenizer, n_scenes: int, context_length: int, batch_size: int = 128) -> list:
    """Every phrasing of the first n val scenes, tokenised, in fixed batches."""
    texts = [c for i in range(n_scenes) for c in world.captions(world.scene(i, "val"))]
    return [tokenize(tokenizer, texts[i:i + batch_size], context_length) for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def perplexity(model: CausalLM, batches: list) -> float:
    """exp(mean next-token NLL over every real target token) - token-weighted, unlike a mean of batch losses."""
    dev = next(model.parameters()).device
    nll, n = 0.0, 0
    for b in batches:
        ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        logits = model(ids, mask)[:, :-1].float()  # (B, T-1, V)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
        n += int((targets != -100).sum())
    return float(np.exp(nll / n))


_GRAMMARS: dict = {}


def caption_grammar(world: World) -> re.Pattern:
    """A regular expression for the four caption phrasings of Shapes World (minivl.world_text)."""
    cfg = world.config
    if repr(cfg) in _GRAMMARS:
        return _GRAMMARS[repr(cfg)]
    color, shape = "(?:%s)" % "|".join(cfg.colors), "(?:%s)" % "|".join(cfg.shapes)
    plural = "(?:%s)" % "|".join(PLURAL[s] for s in cfg.shapes)
    art = "(?:a (?=[^aeiou])|an (?=[aeiou]))"
    region = "(?:%s)" % "|".join(r for row in REGIONS for r in row)
    number = "(?:%s)" % "|".join(NUMBERS[2:cfg.max_objects + 1])

    def listed(item):
        return rf"{item}(?:(?:, {item})* and {item})?"
    forms = [listed(rf"{art}(?:small|large) {color} {shape}"),
             rf"there (?:is one object: {art}{color} {shape}|are {number} objects: {listed(rf'{art}{color} {shape}')})",
             listed(rf"(?:{art}{color} {shape}|{number} {color} {plural})"),
             listed(rf"{art}{color} {shape} {region}")]
    _GRAMMARS[repr(cfg)] = re.compile("|".join(f"(?:{f})" for f in forms))
    return _GRAMMARS[repr(cfg)]


def is_caption(text: str, world: World) -> bool:
    """True when `text` is a well-formed caption (grammar, article, object counts agree)."""
    if caption_grammar(world).fullmatch(text) is None:
        return False
    m = re.fullmatch(r"there are (\w+) objects: (.*)", text)
    if m:  # "there are three objects:" must list three
        return NUMBERS.index(m.group(1)) == 1 + m.group(2).count(", ") + m.group(2).count(" and ")
    return True


def generate_text(model: CausalLM, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Complete each prompt (bos + prompt, no eos); returns prompt + continuation as text."""
    dev = next(model.parameters()).device
    enc = tokenizer(prompts, add_special_tokens=False) if any(prompts) else None
    rows = [[tokenizer.bos_id] + (enc["input_ids"][i][enc["attention_mask"][i] == 1].tolist() if enc else [])
            for i in range(len(prompts))]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows], device=dev)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=dev)
    kwargs.setdefault("max_new_tokens", model.config.context_length - width)
    new = model.generate(ids, mask, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, **kwargs)
    return [tokenizer.decode(r + n.tolist()).strip() for r, n in zip(rows, new)]


def run(preset: str = "cpu", steps: int | None = None, device=None, out=None, seed: int = 0, bf16: bool = False,
        progress: bool = True, checkpoint: str | Path | None = None, samples: int = 32) -> dict:
    """Train, evaluate, save; returns the metrics dict (also written to <run folder>/metrics.json).

    `checkpoint` defaults to data/checkpoints/lm-<preset>; `out` (the run folder) to data/runs/lm-<preset>;
    `samples` captions are sampled (top-p 0.9) to measure how many are grammatical and distinct.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    recipe = choose(RECIPES, "LM", preset, steps)
    tokenizer = world_tokenizer()
    config = LMConfig.preset(preset, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                             bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    world = World()
    run_dir, ckpt_dir = folders(f"lm-{preset}", out, checkpoint)

    minivl.seed_everything(seed)
    model = CausalLM(config)
    val = val_batches(world, tokenizer, recipe["val_scenes"], config.context_length)
    train_cfg = train_config(recipe, seed, progress, bf16)
    trainer = Trainer(model, caption_batches(world, tokenizer, recipe["batch_size"], config.context_length, seed),
                      train_cfg, eval_fn=lambda m, step: {"val_ppl": perplexity(m, val)}, out_dir=run_dir,
                      device=device)
    history, timing = timed_fit(trainer)
    model.eval()
    model.save(ckpt_dir)
    tokenizer.save(ckpt_dir / "tokenizer.json")

    greedy = generate_text(model, tokenizer, PROMPTS)
    beam = generate_text(model, tokenizer, PROMPTS, num_beams=4)
    sampled = generate_text(model, tokenizer, [""] * samples, do_sample=True, top_p=0.9,
                            generator=torch.Generator(trainer.device).manual_seed(seed))
    ok = lambda texts: sum(is_caption(t, world) for t in texts) / len(texts)  # noqa: E731
    result = {"preset": preset, "val_ppl": history.eval[-1]["val_ppl"], "final_loss": history.train[-1]["loss"],
              "greedy_grammatical": ok(greedy), "beam_grammatical": ok(beam), "sampled_grammatical": ok(sampled),
              "sampled_distinct": len(set(sampled)) / len(sampled), "greedy_samples": greedy,
              "beam_samples": beam, "sampled_samples": sampled[:8], **timing,
              "steps": recipe["steps"], "device": str(trainer.device), "bf16": trainer.bf16,
              "checkpoint": str(ckpt_dir), "recipe": recipe, "config": asdict(config), "world_version": world.version}
    rates = [r["samples_per_s"] for r in history.train if "samples_per_s" in r]
    result["captions_per_s"] = float(np.mean(rates)) if rates else None
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    (run_dir / "samples.txt").write_text("\n".join(
        [f"greedy  | {t}" for t in greedy] + [f"beam-4  | {t}" for t in beam] + [f"top-p   | {t}" for t in sampled]))
    from minivl import viz
    viz.savefig(plot_history(history), run_dir / "loss.png", close=True)
    return result


def plot_history(history):
    """Train loss and validation loss (log perplexity) against step; returns the figure."""
    from minivl import viz
    curve = {"step": [r["step"] for r in history.train], "loss": [r["loss"] for r in history.train],
             "val_step": [r["step"] for r in history.eval],
             "val_loss": [float(np.log(r["val_ppl"])) for r in history.eval]}
    return viz.plot_loss_curve(curve, title="causal LM on Shapes World captions")


def main(args) -> int:
    result = run(args.preset, steps=args.steps, device=args.device, out=args.out, seed=args.seed, bf16=args.bf16)
    print(f"lm-{args.preset}: val perplexity {result['val_ppl']:.3f} after {result['steps']} steps "
          f"in {result['train_seconds']:.0f} s on {result['device']}")
    print(f"grammatical: greedy {result['greedy_grammatical']:.0%}, beam {result['beam_grammatical']:.0%}, "
          f"top-p sampled {result['sampled_grammatical']:.0%} ({result['sampled_distinct']:.0%} distinct)")
    for text in result["greedy_samples"]:
        print(f"  greedy | {text}")
    for text in result["sampled_samples"][:4]:
        print(f"  top-p  | {text}")
    print(f"checkpoint: {result['checkpoint']}")
    return 0
