"""Train a ViT classifier on single-object Shapes World images, evaluate it, write checkpoint and run folder.

    python -m minivl train vit [--preset tiny|cpu|gpu] [--steps N] [--device ...] [--out DIR] [--seed S] [--bf16]

What it builds: a stream of fresh single-object training scenes (the label is one of the
colour x shape classes of `world.classes`; the training split never contains a held-out pair),
the `minivl.train.Trainer` loop (AdamW, warmup + cosine), and the evaluation of a supervised
ViT (Dosovitskiy et al., 2021): top-1/top-5 on single-object test scenes over the seen classes,
how often the colour and the shape alone are right, and the same colour/shape split on scenes of
held-out pairs (compositional generalisation: the right answer is not a class the model has,
but are its two halves recognised?). The checkpoint lands in data/checkpoints/vit-<preset>
(`ViTClassifier.load`), the run folder in data/runs/vit-<preset>: metrics.json, history.json,
loss curve, confusion matrix and class-token attention maps.

The one idea to take away: with enough images, a transformer with no built-in notion of
locality learns to read shapes from patches; it is the data (and the recipe) that teaches it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import minivl
from minivl.data import ClassificationDataset, collate, image_to_tensor
from minivl.metrics import confusion_matrix, topk_accuracy
from minivl.recipes import (Recipe, choose, color_shape_accuracy, fit, folders, run_cli, run_record, single_object_set,
                            stream_indices, timing_text, write_metrics)
from minivl.vit import ViTClassifier, ViTConfig
from minivl.world import World


@dataclass(frozen=True)
class ViTRecipe(Recipe):
    """A ViT classifier's training preset (the model sizes are minivl.vit.PRESETS)."""

    # standardise the pixels with the training images' per-channel mean/std (`pixel_stats`). Shapes
    # World is a dark background (about -0.7 in [-1, 1]) with a small bright object: unnormalised,
    # every patch token shares one large component and the ViT needs about twice the steps to start
    # telling shapes apart
    normalize: bool = True
    eval_images: int = 2000  # single-object test scenes for the final top-1 (seen classes)
    heldout_images: int = 1000  # single-object scenes of held-out colour-shape pairs


RECIPES = {
    "tiny": ViTRecipe(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, weight_decay=0.05,
                      eval_images=200, heldout_images=100),
    "cpu": ViTRecipe(steps=1200, batch_size=128, lr=3e-3, warmup_steps=100, weight_decay=0.05, eval_every=300),
    "gpu": ViTRecipe(steps=3000, batch_size=256, lr=1e-3, warmup_steps=200, weight_decay=0.05, eval_every=500,
                     eval_images=5000, heldout_images=2000, bf16=True, workers=8),
}
FAST_STEPS = 30  # what a notebook trains in fast mode (MINIVL_FAST=1), on the tiny preset


def pixel_stats(world: World, n: int = 1000) -> tuple[tuple, tuple]:
    """Per-channel mean and std of image_to_tensor(image) over n single-object training scenes."""
    images = image_to_tensor(np.stack([world.scene(i, "train", n_objects=1).image for i in range(n)]))  # (n, 3, H, W)
    mean, std = images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def model_config(preset: str, world: World | None = None) -> ViTConfig:
    """The ViTConfig the recipe trains: the model preset, one class per colour x shape, and (with
    `normalize`) the training images' pixel statistics."""
    if preset not in RECIPES:
        raise ValueError(f"unknown ViT preset {preset!r}; choose from {sorted(RECIPES)}")
    recipe = RECIPES[preset]
    config = ViTConfig.preset(preset)
    world = world or World(image_size=config.image_size)
    if world.config.image_size != config.image_size:
        raise ValueError(f"world images are {world.config.image_size} px, the {preset} ViT expects {config.image_size}")
    stats = dict(zip(("image_mean", "image_std"), pixel_stats(world))) if recipe.normalize else {}
    return ViTConfig.preset(preset, **stats, num_classes=len(world.classes))


def make_batches(world: World, batch_size: int, seed: int = 0):
    """get_batch(step) -> {image (B, 3, H, W), label (B,)}: a pure function of (seed, step).

    Every step draws fresh scenes (index = step * batch + row), so no image is seen twice.
    """
    data = ClassificationDataset(world, "train", length=2**62)  # scenes are made on demand

    def get_batch(step: int) -> dict:
        batch = collate([data[i] for i in stream_indices(seed, step, batch_size)])
        return {"image": batch["image"], "label": batch["label"]}  # the trainer moves tensors only
    return get_batch


def eval_set(world: World, split: str = "test", n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n single-object scenes of `split`: images (n, 3, H, W) and class labels (n,)."""
    return single_object_set(world, split, n)


@torch.no_grad()
def predict(model: ViTClassifier, images: torch.Tensor, world: World, batch_size: int = 250) -> torch.Tensor:
    """Logits (n, num_classes) with the held-out classes masked out: the model was never shown
    them, so they are not answers it can give (their outputs were only ever pushed down)."""
    dev = next(model.parameters()).device
    logits = torch.cat([model(images[i:i + batch_size].to(dev)).float().cpu()
                        for i in range(0, len(images), batch_size)])  # (n, C)
    unseen = torch.tensor([combo in world.heldout for combo in world.combos])
    return logits.masked_fill(unseen, -1e9)  # finite: metrics reject inf


def evaluate(model: ViTClassifier, world: World, sets: dict) -> dict:
    """Top-1/top-5 and colour/shape accuracy on `sets["test"]`; colour/shape on `sets["heldout"]`."""
    model.eval()
    out = {}
    images, labels = sets["test"]
    logits = predict(model, images, world)
    out.update({f"test_{k}": v for k, v in topk_accuracy(logits, labels, ks=(1, 5)).items()})
    parts = color_shape_accuracy(world, labels, logits.argmax(-1))
    out["test_color_acc"], out["test_shape_acc"] = parts["color"], parts["shape"]
    if "heldout" in sets:
        images, labels = sets["heldout"]
        parts = color_shape_accuracy(world, labels, predict(model, images, world).argmax(-1))
        out["heldout_color_acc"], out["heldout_shape_acc"] = parts["color"], parts["shape"]
    return out


def seen_confusion(model: ViTClassifier, world: World, images: torch.Tensor, labels: torch.Tensor):
    """Confusion matrix (K, K) over the K seen classes, and their names."""
    guess = predict(model, images, world).argmax(-1)
    seen = [i for i, combo in enumerate(world.combos) if combo not in world.heldout]
    cm = confusion_matrix(guess, labels, num_classes=len(world.classes))[seen][:, seen]
    return cm, [world.classes[i] for i in seen]


def _plots(run_dir: Path, history, model: ViTClassifier, world: World, sets: dict) -> None:
    import matplotlib.pyplot as plt

    from minivl import viz
    curve = {"step": [r["step"] for r in history.train], "loss": [r["loss"] for r in history.train]}
    viz.savefig(viz.plot_loss_curve(curve, title="ViT classifier: cross-entropy"), run_dir / "loss.png", close=True)
    cm, names = seen_confusion(model, world, *sets["test"])
    fig = viz.plot_confusion_matrix(cm, names, title="ViT, single-object test scenes (seen classes)")
    viz.savefig(fig, run_dir / "confusion.png", close=True)
    image = sets["test"][0][:1].to(next(model.parameters()).device)
    maps = model.vit.attention_maps(image, rollout=True)[0]  # (L, grid, grid)
    fig = viz.plot_attention_maps(image[0].cpu(), maps.flatten(1).cpu(),
                                  titles=[f"rollout to layer {i + 1}" for i in range(len(maps))])
    viz.savefig(fig, run_dir / "attention.png", close=True)
    plt.close("all")


def run(preset: str = "cpu", steps: int | None = None, device=None, out=None, seed: int = 0, bf16: bool = False,
        progress: bool = True, checkpoint: str | Path | None = None, resume: bool = False,
        force: bool = False) -> dict:
    """Train, evaluate, save; returns the metrics dict (also written to <run folder>/metrics.json).

    `checkpoint` defaults to data/checkpoints/vit-<preset>; `out` (the run folder) to data/runs/vit-<preset>.
    `resume` goes on from the training checkpoint in the run folder; `force` starts afresh over one that
    an unfinished or longer run left there (refused otherwise: `recipes.resume_point`).
    """
    recipe = choose(RECIPES, "ViT", preset, steps)
    world = World(image_size=ViTConfig.preset(preset).image_size)
    config = model_config(preset, world)  # one output per colour x shape; held-out ones never get a positive
    run_dir, ckpt_dir = folders(f"vit-{preset}", out, checkpoint)

    minivl.seed_everything(seed)
    model = ViTClassifier(config)
    sets = {"test": eval_set(world, "test", recipe.eval_images),
            "heldout": eval_set(world, "heldout", recipe.heldout_images)}
    small = {"test": (sets["test"][0][:500], sets["test"][1][:500])}  # periodic evals stay cheap
    trainer, history, timing = fit(model, make_batches(world, recipe.batch_size, seed), recipe, seed=seed,
                                   progress=progress, bf16=bf16, device=device, run_dir=run_dir,
                                   eval_fn=lambda m, step: evaluate(m, world, small),
                                   resume=resume, force=force)
    if not trainer.dist.main:  # under torchrun, rank 0 alone evaluates and writes the checkpoint
        return {}
    with torch.no_grad(), trainer.autocast():
        metrics = evaluate(model, world, sets)
    model.save(ckpt_dir)

    result = {**run_record(preset, recipe, trainer, history, timing, config=config, world=world,
                           checkpoint=ckpt_dir, run_dir=run_dir), **metrics, "seen_classes": len(world.train_combos)}
    write_metrics(run_dir, result)
    _plots(run_dir, history, model, world, sets)
    return result


def summary(m: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    return "\n".join([
        f"ViT {m['preset']} (width {m['config']['width']}, depth {m['config']['depth']}, patch {m['config']['patch_size']}): "
        f"{m['steps']} steps x {m['recipe']['batch_size']} images in {m['train_seconds'] / 60:.1f} min "
        + timing_text(m),
        f"  test top-1 over {m['seen_classes']} seen colour x shape classes: {pct(m['test_top1'])} "
        f"(top-5 {pct(m['test_top5'])}; colour {pct(m['test_color_acc'])}, shape {pct(m['test_shape_acc'])})",
        f"  held-out pairs (never seen): colour {pct(m['heldout_color_acc'])}, shape {pct(m['heldout_shape_acc'])}",
        f"  checkpoint: {m['checkpoint']}  ->  ViTClassifier.load(...);  run folder: {m['run_dir']}",
    ])


def main(args) -> int:
    return run_cli(run, summary, args)
