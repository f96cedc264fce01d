"""The main job: train CLIP on Shapes World, evaluate it, and write a checkpoint and a run folder.

    python -m minivl train clip [--preset tiny|cpu|gpu] [--device ...] [--steps N] [--out DIR]

What it builds: a stream of image-caption pairs (fresh scenes every step, a share of them
single-object, one caption phrasing drawn per scene), the `minivl.train.Trainer` loop, and the
evaluation of CLIP (Radford et al., 2021): zero-shot top-1 over all colour x shape classes on
single-object test scenes (seen combinations) and on held-out combinations, image<->text
retrieval R@1/5/10 on 1,000 test scenes (a hit is any valid caption of the image), and a linear
probe on frozen image features. The checkpoint lands in data/checkpoints/clip-<preset> (so
`minivl.clip.load("clip-cpu")` finds it), the run folder in data/runs/clip-<preset>: metrics.json,
history.json and plots (loss curve, similarity matrix, zero-shot confusion matrix).

The one idea to take away: nothing here is specific to classification or retrieval. One
contrastive objective on captions, and both tasks come out of it for free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import minivl
from minivl import clip as clip_lib
from minivl.clip import CLIP, CLIPConfig
from minivl.data import CaptionDataset, collate, world_tokenizer
from minivl.recipes import (Recipe, choose, color_shape_accuracy, fit, folders, run_cli, run_record, single_object_set, step_rng,
                            stream_indices, timing_text, tokenize_batch, write_metrics)
from minivl.world import World


@dataclass(frozen=True)
class CLIPRecipe(Recipe):
    """CLIP's training preset (the model sizes are minivl.clip.PRESETS)."""

    # share of one-object scenes, moved linearly from the first to the second value over the run:
    # shapes are learned on single objects first, composition on crowded scenes later
    single_object: tuple[float, float] = (0.9, 0.3)
    positives: bool = True  # tell the loss which captions in the batch also describe an image (no false negatives)
    eval_images: int = 1000  # single-object test scenes for zero-shot top-1 (seen pairs); quick evals use 200
    heldout_images: int = 500  # single-object scenes of held-out colour-shape pairs
    retrieval_scenes: int = 1000  # test scenes for image<->text recall@K
    probe_images: int = 2000  # training images of the linear probe


RECIPES = {
    "tiny": CLIPRecipe(steps=60, batch_size=32, lr=2e-3, warmup_steps=10, weight_decay=0.1, eval_images=70,
                       heldout_images=50, retrieval_scenes=100, probe_images=200),
    "cpu": CLIPRecipe(steps=1600, batch_size=128, lr=2e-3, warmup_steps=100, weight_decay=0.1, eval_every=400),
    "gpu": CLIPRecipe(steps=6000, batch_size=512, lr=1e-3, warmup_steps=300, weight_decay=0.1, eval_every=1000,
                      eval_images=2000, heldout_images=1000, probe_images=5000, bf16=True, workers=8),
}
FAST_STEPS = 15  # what a notebook trains in fast mode (MINIVL_FAST=1), on the tiny preset


class SingleObjectCaptions(CaptionDataset):
    """Caption pairs of one-object scenes: the zero-shot classifier's prompts look like them."""
    n_objects = 1


def make_batches(world: World, tokenizer, batch_size: int, single_object, context_length: int,
                 seed: int = 0, positives: bool = True, steps: int | None = None):
    """get_batch(step) -> {image, input_ids, attention_mask[, positives]}: a pure function of (seed, step).

    Every step draws fresh scenes (index = step * batch + row), so the model never sees a pair twice.
    `single_object` is the share of one-object scenes, or a (start, end) pair moved linearly over
    `steps`: a curriculum that teaches shapes on single objects first, then composition on crowded
    scenes. With `positives`, the batch says which captions also describe which images (see clip_loss).
    """
    start, end = (single_object, single_object) if isinstance(single_object, (int, float)) else single_object
    if not (0 <= start <= 1 and 0 <= end <= 1):
        raise ValueError(f"single_object must be a share in [0, 1] or a (start, end) pair, got {single_object!r}")
    length = 2**62  # scenes are made on demand: the "dataset" is as long as we like
    multi, single = CaptionDataset(world, "train", length), SingleObjectCaptions(world, "train", length)

    def get_batch(step: int) -> dict:
        share = start + (end - start) * min(1.0, step / max(1, (steps or 1) - 1))
        rng = step_rng(seed, step)
        items = [(single if rng.random() < share else multi)[i] for i in stream_indices(seed, step, batch_size)]
        batch = collate([{"image": it["image"], "text": it["text"]} for it in items])
        out = {"image": batch["image"], **tokenize_batch(tokenizer, batch["text"], context_length)}  # text strings stay out: the trainer moves tensors
        if positives:  # text j is a valid caption of image i: not a negative for it
            refs = [set(it["references"]) for it in items]
            out["positives"] = torch.tensor([[t in r for t in batch["text"]] for r in refs])  # (B, B)
        return out
    return get_batch


def eval_sets(world: World, eval_images: int, heldout_images: int, retrieval_scenes: int,
              probe_images: int = 0) -> dict:
    """Frozen test data: single-object test scenes (seen pairs) and held-out pairs with class labels;
    retrieval scenes with one caption each and the (scene, caption) validity mask; probe training images."""
    sets = {"seen": single_object_set(world, "test", eval_images),
            "heldout": single_object_set(world, "heldout", heldout_images)}
    if probe_images:  # offset: not the training stream's scenes
        sets["probe_train"] = single_object_set(world, "train", probe_images, offset=10**9)
    ds = CaptionDataset(world, "test", retrieval_scenes)
    items = [ds[i] for i in range(retrieval_scenes)]
    texts = [it["text"] for it in items]
    refs = [set(it["references"]) for it in items]
    positives = torch.tensor([[t in r for t in texts] for r in refs])  # (N_img, N_txt): captions repeat
    sets["retrieval"] = (torch.stack([it["image"] for it in items]), texts, positives)
    return sets


@torch.no_grad()
def evaluate(model: CLIP, world: World, sets: dict, tokenizer, probe: bool = False,
             details: dict | None = None) -> dict:
    """Zero-shot top-1/top-5 (seen, held-out), retrieval R@1/5/10 + median rank, optionally the linear probe.

    Pass a dict as `details` to receive the confusion matrices, features and the retrieval similarity matrix.
    """
    zs = clip_lib.ZeroShotClassifier(model, world.classes, clip_lib.SHAPES_TEMPLATES, tokenizer)
    out, details = {}, details if details is not None else {}
    for name in ("seen", "heldout"):
        images, labels = sets[name]
        feats = clip_lib.encode_images(model, images)
        res = clip_lib.zero_shot_eval(feats, labels, zs.class_embeddings)
        out[f"zeroshot_{name}_top1"], out[f"zeroshot_{name}_top5"] = res["top1"], res["top5"]
        # which half of the name was wrong: the confusion matrix's rows are the truth, columns the guess
        truth, guess = torch.nonzero(res["confusion"], as_tuple=True)
        counts = res["confusion"][truth, guess]
        parts = color_shape_accuracy(world, truth.repeat_interleave(counts), guess.repeat_interleave(counts))
        out[f"zeroshot_{name}_color_acc"], out[f"zeroshot_{name}_shape_acc"] = parts["color"], parts["shape"]
        details[f"confusion_{name}"], details[f"features_{name}"] = res["confusion"], feats
    images, texts, positives = sets["retrieval"]
    img_f, txt_f = clip_lib.encode_images(model, images), clip_lib.encode_texts(model, texts, tokenizer)
    for k, v in clip_lib.retrieval_eval(img_f, txt_f, positives).items():
        out[f"retrieval_{k}"] = v
    details["retrieval_sim"] = img_f @ txt_f.T
    if probe and "probe_train" in sets:
        train_images, train_labels = sets["probe_train"]
        res = clip_lib.linear_probe(clip_lib.encode_images(model, train_images), train_labels,
                                    details["features_seen"], sets["seen"][1], num_classes=len(world.classes))
        out["linear_probe_top1"] = res["test_acc"]
    return out


def _plots(run_dir: Path, history, details: dict, sets: dict, world: World) -> None:
    import matplotlib.pyplot as plt

    from minivl import viz
    curve = {"step": [r["step"] for r in history.train], "loss": [r["loss"] for r in history.train]}
    viz.savefig(viz.plot_loss_curve(curve, title="CLIP contrastive loss"), run_dir / "loss.png", close=True)
    images, texts, _ = sets["retrieval"]
    n = min(10, len(texts))
    fig = viz.plot_similarity_matrix(details["retrieval_sim"][:n, :n].T, row_labels=texts[:n],
                                     images=[img for img in images[:n]], title="cosine similarity: texts x images")
    viz.savefig(fig, run_dir / "similarity.png", close=True)
    fig = viz.plot_confusion_matrix(details["confusion_seen"], world.classes,
                                    title="zero-shot, single-object test scenes")
    viz.savefig(fig, run_dir / "confusion.png", close=True)
    plt.close("all")


def run(preset: str = "cpu", steps: int | None = None, device=None, out=None, seed: int = 0, bf16: bool = False,
        progress: bool = True, checkpoint: str | Path | None = None, resume: bool = False,
        force: bool = False) -> dict:
    """Train, evaluate, save; returns the metrics dict (also written to <run folder>/metrics.json).

    `checkpoint` defaults to data/checkpoints/clip-<preset>; `out` (the run folder) to data/runs/clip-<preset>.
    `resume` goes on from the training checkpoint in the run folder; `force` starts afresh over one that
    an unfinished or longer run left there (refused otherwise: `recipes.resume_point`).
    """
    recipe = choose(RECIPES, "CLIP", preset, steps)
    tokenizer = world_tokenizer()  # the one BPE every preset reads
    config = CLIPConfig.preset(preset, pad_id=tokenizer.pad_id)
    if tokenizer.vocab_size != config.text.vocab_size:
        raise ValueError(f"the world tokenizer has {tokenizer.vocab_size} tokens, the {preset} preset expects "
                         f"{config.text.vocab_size}")
    world = World(image_size=config.vision.image_size)
    run_dir, ckpt_dir = folders(f"clip-{preset}", out, checkpoint)

    minivl.seed_everything(seed)
    model = CLIP(config)
    model.tokenizer = tokenizer
    sets = eval_sets(world, recipe.eval_images, recipe.heldout_images, recipe.retrieval_scenes, recipe.probe_images)
    ret_images, ret_texts, ret_pos = sets["retrieval"]
    small = {"seen": tuple(t[:200] for t in sets["seen"]), "heldout": tuple(t[:200] for t in sets["heldout"]),
             "retrieval": (ret_images[:200], ret_texts[:200], ret_pos[:200, :200])}  # quick checks while training
    batches = make_batches(world, tokenizer, recipe.batch_size, recipe.single_object, config.text.context_length,
                           seed, recipe.positives, recipe.steps)
    trainer, history, timing = fit(model, batches, recipe, seed=seed, progress=progress, bf16=bf16, device=device,
                                   run_dir=run_dir, eval_fn=lambda m, step: evaluate(m, world, small, tokenizer),
                                   resume=resume, force=force)
    if not trainer.dist.main:  # under torchrun, rank 0 alone evaluates and writes the checkpoint
        return {}
    details = {}
    with torch.no_grad(), trainer.autocast():
        metrics = evaluate(model, world, sets, tokenizer, probe=True, details=details)
    model.save(ckpt_dir, tokenizer)

    result = {**run_record(preset, recipe, trainer, history, timing, config=config, world=world,
                           checkpoint=ckpt_dir, run_dir=run_dir), **metrics, "logit_scale": model.scale().item()}
    write_metrics(run_dir, result)
    _plots(run_dir, history, details, sets, world)
    return result


def summary(m: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    return "\n".join([
        f"CLIP {m['preset']}: {m['steps']} steps in {m['train_seconds'] / 60:.1f} min " + timing_text(m),
        f"  zero-shot top-1 over all colour x shape classes: seen {pct(m['zeroshot_seen_top1'])}"
        f" | held-out {pct(m['zeroshot_heldout_top1'])} (colour {pct(m['zeroshot_heldout_color_acc'])},"
        f" shape {pct(m['zeroshot_heldout_shape_acc'])})",
        f"  linear probe top-1 (seen): {pct(m['linear_probe_top1'])}",
        f"  retrieval on {m['recipe']['retrieval_scenes']} test scenes: image->text R@1/5/10 "
        f"{pct(m['retrieval_i2t_R@1'])} / {pct(m['retrieval_i2t_R@5'])} / {pct(m['retrieval_i2t_R@10'])}"
        f" (median rank {m['retrieval_i2t_median_rank']:.0f}); text->image "
        f"{pct(m['retrieval_t2i_R@1'])} / {pct(m['retrieval_t2i_R@5'])} / {pct(m['retrieval_t2i_R@10'])}"
        f" (median rank {m['retrieval_t2i_median_rank']:.0f})",
        f"  checkpoint: {m['checkpoint']}  ->  minivl.clip.load({Path(m['checkpoint']).name!r})",
    ])


def main(args) -> int:
    return run_cli(run, summary, args)
