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

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import minivl
from minivl.data import world_tokenizer
from minivl.lm import CausalLM, LMConfig
from minivl.recipes import (Recipe, choose, fit, folders, run_cli, run_record, step_rng, stream_indices, tokenize_batch,
                            write_metrics)
from minivl.world import World
from minivl.world_text import NUMBERS, PLURAL, REGIONS


@dataclass(frozen=True)
class LMRecipe(Recipe):
    """The causal LM's training preset (model sizes are minivl.lm.PRESETS; vocab_size comes from the tokenizer)."""

    val_scenes: int = 250  # every phrasing of the first N val scenes makes the validation set


RECIPES = {
    "tiny": LMRecipe(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, weight_decay=0.1, val_scenes=25),
    "cpu": LMRecipe(steps=600, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.1, eval_every=200),
    "gpu": LMRecipe(steps=4000, batch_size=256, lr=1e-3, warmup_steps=200, weight_decay=0.1, val_scenes=1000,
                    eval_every=1000, bf16=True, workers=8),
}
FAST_STEPS = 10  # what a notebook trains in fast mode (MINIVL_FAST=1), on the tiny preset
PROMPTS = ["", "there are", "two", "a large", "a red circle", "a blue square on the left,"]


def caption_batches(world: World, tokenizer, batch_size: int, context_length: int, seed: int = 0):
    """get_batch(step) -> {input_ids, attention_mask}: a pure function of (seed, step)."""
    def get_batch(step: int) -> dict:
        rng = step_rng(seed, step)
        texts = []
        for i in stream_indices(seed, step, batch_size):  # every step new scenes
            caps = world.captions(world.scene(i, "train"))
            texts.append(caps[rng.integers(len(caps))])
        return tokenize_batch(tokenizer, texts, context_length)
    return get_batch


def val_batches(world: World, tokenizer, n_scenes: int, context_length: int, batch_size: int = 128) -> list:
    """Every phrasing of the first n val scenes, tokenised, in fixed batches."""
    texts = [c for i in range(n_scenes) for c in world.captions(world.scene(i, "val"))]
    return [tokenize_batch(tokenizer, texts[i:i + batch_size], context_length) for i in range(0, len(texts), batch_size)]


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
        progress: bool = True, checkpoint: str | Path | None = None, resume: bool = False,
        force: bool = False, samples: int = 32) -> dict:
    """Train, evaluate, save; returns the metrics dict (also written to <run folder>/metrics.json).

    `checkpoint` defaults to data/checkpoints/lm-<preset>; `out` (the run folder) to data/runs/lm-<preset>;
    `samples` captions are sampled (top-p 0.9) to measure how many are grammatical and distinct.
    `resume` goes on from the training checkpoint in the run folder; `force` starts afresh over one that
    an unfinished or longer run left there (refused otherwise: `recipes.resume_point`).
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
    val = val_batches(world, tokenizer, recipe.val_scenes, config.context_length)
    trainer, history, timing = fit(model, caption_batches(world, tokenizer, recipe.batch_size, config.context_length,
                                                           seed), recipe, seed=seed, progress=progress, bf16=bf16,
                                   device=device, run_dir=run_dir,
                                   eval_fn=lambda m, step: {"val_ppl": perplexity(m, val)}, resume=resume, force=force)
    if not trainer.dist.main:  # under torchrun, rank 0 alone evaluates and writes the checkpoint
        return {}
    model.save(ckpt_dir, tokenizer)  # the tokenizer lands in the checkpoint folder by the same atomic save

    greedy = generate_text(model, tokenizer, PROMPTS)
    beam = generate_text(model, tokenizer, PROMPTS, num_beams=4)
    sampled = generate_text(model, tokenizer, [""] * samples, do_sample=True, top_p=0.9,
                            generator=torch.Generator(trainer.device).manual_seed(seed))
    ok = lambda texts: sum(is_caption(t, world) for t in texts) / len(texts)  # noqa: E731
    result = {**run_record(preset, recipe, trainer, history, timing, config=config, world=world,
                           checkpoint=ckpt_dir, run_dir=run_dir),
              "val_ppl": history.eval[-1]["val_ppl"], "greedy_grammatical": ok(greedy), "beam_grammatical": ok(beam),
              "sampled_grammatical": ok(sampled), "sampled_distinct": len(set(sampled)) / len(sampled),
              "greedy_samples": greedy, "beam_samples": beam, "sampled_samples": sampled[:8]}
    rates = [r["samples_per_s"] for r in history.train if "samples_per_s" in r]
    result["captions_per_s"] = float(np.mean(rates)) if rates else None
    write_metrics(run_dir, result)
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


def summary(m: dict) -> str:
    lines = [f"lm-{m['preset']}: val perplexity {m['val_ppl']:.3f} after {m['steps']} steps "
             f"in {m['train_seconds']:.0f} s on {m['device']}",
             f"grammatical: greedy {m['greedy_grammatical']:.0%}, beam {m['beam_grammatical']:.0%}, "
             f"top-p sampled {m['sampled_grammatical']:.0%} ({m['sampled_distinct']:.0%} distinct)"]
    lines += [f"  greedy | {text}" for text in m["greedy_samples"]]
    lines += [f"  top-p  | {text}" for text in m["sampled_samples"][:4]]
    return "\n".join(lines + [f"checkpoint: {m['checkpoint']}"])


def main(args) -> int:
    return run_cli(run, summary, args)
