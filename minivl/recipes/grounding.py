"""Train the OWL-ViT-style open-vocabulary detector on Shapes World, evaluate it, save it.

    python -m minivl train grounding [--preset tiny|cpu|cpu-long|gpu] [--device ...] [--steps N] [--out DIR]

What it builds: a stream of fresh training scenes, each asked the batch's detection phrases and a
few of its own referring expressions (`minivl.grounding.targets.make_batch`), the towers taken from
the CLIP checkpoint of the same preset when one exists (data/checkpoints/clip-<preset>; from scratch
otherwise, with a note), the `minivl.train.Trainer` loop on the set loss, and the evaluation of
`minivl.grounding.eval`: COCO AP and AP@0.5 for shape and colour-shape queries on test scenes (seen
pairs), for the held-out pairs queried by name, and referring accuracy per expression type; plus a
check that `predict` and `post_process_object_detection` return the same boxes. Checkpoint:
data/checkpoints/grounding-<preset>; run folder data/runs/grounding-<preset> (metrics.json,
history.json, loss curves per term, boxes drawn on sample test images, precision-recall curve).

The one idea to take away: the detector is CLIP plus two tiny heads; the recipe's work is the
queries - which phrases each image is asked, and which are exact negatives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import minivl
from minivl.checkpoint import CONFIG, checkpoints_dir, resolve
from minivl.data import world_tokenizer
from minivl.grounding import PRESETS, OWLViT, OWLViTConfig, evaluate, post_process_object_detection, predict
from minivl.grounding.predict import as_images
from minivl.grounding.targets import make_batch
from minivl.metrics.boxes import box_convert
from minivl.recipes import Recipe, choose, fit, folders, run_cli, run_record, step_rng, stream_indices, timing_text, write_metrics
from minivl.world import World


@dataclass(frozen=True)
class GroundingRecipe(Recipe):
    """The grounding training preset (model sizes: minivl.grounding.PRESETS)."""

    referring_per_image: int = 6  # referring expressions asked of each training image
    from_clip: bool = True  # start the towers from data/checkpoints/clip-<preset> when it exists
    eval_scenes: int = 500  # test (and held-out) scenes for AP
    referring_scenes: int = 300  # test scenes whose every referring expression is grounded
    prefetch: bool = True  # build the next batch in a background thread while the model trains (scenes and
    #                        targets are pure Python, ~10-25% of a cpu step); the batches are the same
    head_lr_scale: float = 1.0  # lr of the fresh heads (HEADS: box, class, merge LayerNorm, fusion, class_pos) x
    #                             the towers' (which start from CLIP); 1 = one lr for all

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.head_lr_scale > 0:
            raise ValueError(f"head_lr_scale must be > 0, got {self.head_lr_scale!r}")


RECIPES = {
    "tiny": GroundingRecipe(steps=40, batch_size=8, lr=2e-3, warmup_steps=5, weight_decay=0.05, eval_scenes=20,
                            referring_scenes=10),
    # 2,900 steps of 32 scenes: what fits in 5 minutes on two threads, 310 images/s (a machine that ran the CLIP cpu
    # job in 4.3 min; earlier ones took 3.8 and 7.9). With the model preset's box_detail: colour-shape AP@0.5 0.990,
    # COCO AP 0.948, held-out pairs AP@0.5 0.954, referring 97-98%: the targets, the first and third at their
    # edge. cpu-long (5,000 steps, 8.5 min) clears them with room: 0.995, 0.973, 0.986, 98-99%. Measured on the way
    # (one lever per 2,500-step run, 1 thread): box_detail took colour-shape COCO AP 0.70 -> 0.92; smaller batches
    # for more steps, the same images, bought little (16 x 5,000 and 8 x 10,000: 0.71, without box_detail); head lr
    # x3 0.68; lr 3e-3 for towers and heads alike (at 800 steps, COCO AP 0.48 vs 0.40 at 5e-3 and 0.42 with towers
    # 1e-3 / heads 3e-3)
    "cpu": GroundingRecipe(steps=2900, batch_size=32, lr=3e-3, warmup_steps=100, weight_decay=0.05),
    "cpu-long": GroundingRecipe(steps=5000, batch_size=32, lr=3e-3, warmup_steps=100, weight_decay=0.05),
    "gpu": GroundingRecipe(steps=6000, batch_size=128, lr=5e-4, warmup_steps=300, weight_decay=0.05,
                           eval_scenes=1000, referring_scenes=500, bf16=True, workers=8),
}
# the parameters OWLViT adds to CLIP's towers
HEADS = ("box_head", "box_detail", "class_head", "layer_norm", "fusion", "class_pos")
FAST_STEPS = 10  # what a notebook trains in fast mode (MINIVL_FAST=1), on the tiny preset


def make_batches(world: World, tokenizer, batch_size: int, context_length: int, referring_per_image: int,
                 seed: int = 0, prefetch: bool = False):
    """get_batch(step) -> the batch `OWLViT.loss` reads, a pure function of (seed, step). prefetch=True
    builds batch step + 1 in a background thread while the caller trains on batch `step` (the same
    batches: a request for any other step is built on the spot)."""
    def build(step: int) -> dict:
        scenes = [world.scene(i, "train") for i in stream_indices(seed, step, batch_size)]
        return make_batch(world, scenes, tokenizer, context_length, step_rng(seed, step), referring_per_image)
    if not prefetch:
        return build
    from concurrent.futures import ThreadPoolExecutor
    pool, ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grounding-batches"), {}

    def get_batch(step: int) -> dict:
        future = ahead.pop(step, None)
        ahead.clear()  # a jump (resume): whatever was built ahead is not the next batch
        batch = future.result() if future is not None else build(step)
        ahead[step + 1] = pool.submit(build, step + 1)
        return batch
    return get_batch


def initial_model(preset: str, recipe: GroundingRecipe, tokenizer) -> tuple[OWLViT, str]:
    """(the model to train, where its towers came from)."""
    tower = PRESETS[preset]["clip"]  # the CLIP preset of the towers (cpu-long: cpu's)
    clip_dir = checkpoints_dir() / f"clip-{tower}"
    if recipe.from_clip and not minivl.fast_mode() and (resolve(clip_dir) / CONFIG).is_file():
        from minivl import clip
        heads = {k: v for k, v in PRESETS[preset].items() if k != "clip"}
        model = OWLViT.from_clip(clip.load(str(clip_dir))[0], **heads)
        model.tokenizer = tokenizer
        return model, str(clip_dir)
    model = OWLViT(OWLViTConfig.preset(preset, pad_id=tokenizer.pad_id))
    model.tokenizer = tokenizer
    if recipe.from_clip and not minivl.fast_mode():
        print(f"no CLIP checkpoint at {clip_dir}: training the towers from scratch "
              f"(python -m minivl train clip --preset {tower} first for the intended start)")
    return model, "scratch"


@torch.no_grad()
def predict_agrees(model, world: World, n: int = 8, threshold: float = 0.3) -> bool:
    """`predict` and `post_process_object_detection` give the same boxes on the same images."""
    caption = "circle . square . triangle . diamond . cross"
    S = world.config.image_size
    for i in range(n):
        image = world.scene(i, "test").image
        boxes, logits, _ = predict(model, image, caption, box_threshold=threshold, text_threshold=threshold)
        out = model(as_images(model, image)[0], **model.tokenize(caption.split(" . ")))
        post = post_process_object_detection(out, threshold, target_sizes=[(S, S)])[0]
        ours = box_convert(boxes, "cxcywh", "xyxy") * S if len(boxes) else boxes.reshape(0, 4)
        if ours.shape != post["boxes"].shape or not torch.allclose(ours, post["boxes"], atol=1e-4) or \
                not torch.allclose(logits, post["scores"], atol=1e-6):
            return False
    return True


def _plots(run_dir: Path, history, model, world: World, details: dict) -> None:
    import matplotlib.pyplot as plt

    from minivl import viz
    from minivl.viz import grounding as gviz
    rows = history.train
    curves = {"step": [r["step"] for r in rows]}
    for k in ("loss", "loss_class", "loss_l1", "loss_giou"):
        curves[k] = [r.get(k) for r in rows]
    viz.savefig(gviz.plot_loss_terms(curves), run_dir / "loss.png", close=True)
    viz.savefig(gviz.plot_predictions(model, [world.scene(i, "test").image for i in range(8)],
                                      "circle . square . triangle . diamond . cross"),
                run_dir / "boxes.png", close=True)
    if "pr" in details:
        viz.savefig(gviz.plot_pr_curve(details["pr"]), run_dir / "pr_curve.png", close=True)
    plt.close("all")


def run(preset: str = "cpu", steps: int | None = None, device=None, out=None, seed: int = 0, bf16: bool = False,
        progress: bool = True, checkpoint: str | Path | None = None, resume: bool = False,
        force: bool = False) -> dict:
    """Train, evaluate, save; returns the metrics dict (also written to <run folder>/metrics.json)."""
    from minivl.grounding.eval import detection_eval, precision_recall_curve
    recipe = choose(RECIPES, "grounding", preset, steps)
    tokenizer = world_tokenizer()
    minivl.seed_everything(seed)
    model, towers = initial_model(preset, recipe, tokenizer)
    config = model.config
    world = World(image_size=config.clip.vision.image_size)
    run_dir, ckpt_dir = folders(f"grounding-{preset}", out, checkpoint)
    batches = make_batches(world, tokenizer, recipe.batch_size, config.clip.text.context_length,
                           recipe.referring_per_image, seed, prefetch=recipe.prefetch)

    def quick_eval(m, step):  # 100 test scenes: a sign of learning while it trains
        return {"combos_AP50": detection_eval(m, world, "test", min(100, recipe.eval_scenes), "combos")["AP50"]}
    heads = {p: recipe.head_lr_scale for p in HEADS if getattr(model, p) is not None} \
        if recipe.head_lr_scale != 1.0 else None
    trainer, history, timing = fit(model, batches, recipe, seed=seed, progress=progress, bf16=bf16, device=device,
                                   run_dir=run_dir, eval_fn=quick_eval, resume=resume, force=force, lr_scale=heads)
    if not trainer.dist.main:
        return {}
    details = {}
    with torch.no_grad(), trainer.autocast():
        metrics = evaluate(model, world, recipe.eval_scenes, recipe.referring_scenes)
        det = {}
        detection_eval(model, world, "test", min(200, recipe.eval_scenes), "combos", details=det)
        details["pr"] = precision_recall_curve(det["predictions"], det["ground_truths"])
        metrics["predict_matches_post_process"] = predict_agrees(model, world)
    model.save(ckpt_dir, tokenizer)
    result = {**run_record(preset, recipe, trainer, history, timing, config=config, world=world,
                           checkpoint=ckpt_dir, run_dir=run_dir), "towers_from": towers, **metrics}
    write_metrics(run_dir, result)
    _plots(run_dir, history, model, world, details)
    return result


def summary(m: dict) -> str:
    f = lambda x: f"{x:.3f}"  # noqa: E731
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    pairs = ", ".join(f"{k} {v:.2f}" for k, v in m.get("heldout_AP50_per_pair", {}).items())
    return "\n".join([
        f"grounding {m['preset']}: {m['steps']} steps in {m['train_seconds'] / 60:.1f} min " + timing_text(m)
        + f", towers from {m['towers_from']}",
        f"  colour-shape queries, seen pairs: AP@0.5 {f(m['combos_AP50'])} | COCO AP {f(m['combos_AP'])}",
        f"  shape queries: AP@0.5 {f(m['shapes_AP50'])} | COCO AP {f(m['shapes_AP'])}",
        f"  held-out pairs queried by name: AP@0.5 {f(m['heldout_AP50'])} | COCO AP {f(m['heldout_AP'])}  ({pairs})",
        f"  referring accuracy (IoU >= 0.5): attribute {pct(m['referring_attribute'])} | relation "
        f"{pct(m['referring_relation'])} | extreme {pct(m['referring_extreme'])}",
        f"  predict == post_process_object_detection: {m['predict_matches_post_process']}",
        f"  checkpoint: {m['checkpoint']}",
    ])


def main(args) -> int:
    return run_cli(run, summary, args)
