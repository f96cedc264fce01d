"""Train the BLIP-style captioner on Shapes World (or your data), evaluate it, write checkpoint + run folder.

    python -m minivl train captioner [--preset tiny|cpu|gpu] [--steps N] [--data DIR]

What it builds: a stream of image-caption pairs (fresh scenes every step, one caption phrasing per
scene), the `minivl.train.Trainer` loop around `Captioner.loss` (ITC + ITM + LM), the image encoder
started from CLIP's vision tower when `data/checkpoints/clip-<preset>` exists (fine-tuned at
`vision_lr_scale` of the learning rate), and the evaluation: BLEU / CIDEr-D, caption truth by
number of objects with beam 3 *and* greedy decoding, held-out colour-shape scenes, ITM accuracy on
hard negatives and ITC recall@K. The run folder holds metrics.json, history.json, the loss curve of
each objective and sample captions drawn under their images.

`--data DIR` fine-tunes on your own captions instead: DIR holds `captions.json` (COCO captions
format) and the images it names (see `minivl.captioner.data`); only training and BLEU/CIDEr-D on
the items themselves are then reported (there is no scene graph to check truth against).

The one idea to take away: the three objectives cost one image encoding per batch; the text side
runs three times (unimodal, matched/unmatched pairs, caption), and that is where the time goes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

import minivl
from minivl.captioner import Captioner, CaptionerConfig
from minivl.captioner import data as own_data
from minivl.captioner import eval as ev
from minivl.checkpoint import checkpoints_dir
from minivl.data import collate, image_to_tensor, world_tokenizer
from minivl.recipes import (Recipe, choose, folders, resume_point, run_cli, run_record, step_rng, stream_indices, timed_fit,
                            timing_text, tokenize_batch, train_config, write_metrics)
from minivl.resume import checkpoint_progress
from minivl.train import Trainer
from minivl.world import World


@dataclass(frozen=True)
class CaptionerRecipe(Recipe):
    """The captioner's training preset (the model sizes are minivl.captioner.PRESETS)."""

    objectives: tuple[str, ...] = ("itc", "itm", "lm")  # ("lm",) is the ablation: a plain captioner
    # which of world.captions' phrasings the LM is trained on (0 sizes left to right, 1 "there are N
    # objects: ...", 2 grouped counts, 3 regions); None = a random one of all of them per scene
    phrasings: tuple[int, ...] | None = None
    vision_lr_scale: float = 0.5  # the (CLIP-initialised) image encoder learns at this share of the lr
    # the ITC temperature learns at this share: at the full lr it falls 0.07 -> 0.008 in a few hundred
    # steps (BLIP's lr is 100x smaller), ITC logits grow 125x and its gradients swamp the LM's
    temperature_lr_scale: float = 1.0
    # max global gradient norm. ITC + ITM + LM sum to a gradient norm several times the LM's alone:
    # clipped at 1.0, every update (the LM's with it) would shrink by that factor
    grad_clip: float | None = 1.0
    # BLIP pre-trains with ITC + ITM + LM, then fine-tunes the captioner with the LM loss alone: the last
    # `lm_finetune_share` of the steps are that fine-tune (0 = all three at full weight to the end)
    lm_finetune_share: float = 0.0
    # ITC and ITM's weight during that fine-tune: 0 = the LM loss alone (BLIP's captioner, whose matching
    # heads then drift: it is a captioner, no longer a judge); > 0 keeps them trained, at this weight
    finetune_matching_weight: float = 0.0
    init_from_clip: bool = True  # start the ViT from data/checkpoints/clip-<preset> when it exists
    eval_scenes: int = 1000  # test scenes for BLEU / CIDEr / truth (beam 3 and greedy)
    heldout_scenes: int = 500  # scenes with one held-out colour-shape pair
    match_scenes: int = 500  # test scenes for ITM accuracy and ITC recall@K


RECIPES = {
    "tiny": CaptionerRecipe(steps=40, batch_size=16, lr=2e-3, warmup_steps=5, weight_decay=0.05, init_from_clip=False,
                            eval_scenes=12, heldout_scenes=6, match_scenes=12),
    # lr 5e-3: at 1.5e-3 the LM alone reached 47% exact scenes in 800 steps, at 3e-3 64%, at 5e-3 71%.
    # The last 75% of the steps are the captioning fine-tune, ITC + ITM at weight 0.1. Exact scenes, beam 3, 1,000
    # test scenes, before the model preset's memory_detail: all three to the end 90.4%; half the steps fine-tune
    # with LM alone 92.3% (but ITM's pair accuracy fell to 56%, ITC R@5 57%), with ITC + ITM at 0.25 92.4% (ITM
    # 97.4%, ITC R@5 96.4%). With memory_detail (drop 0.2; CaptionerConfig.memory_detail has its table), half /
    # 0.25: 96.2% (4 objects 88.7%, CHAIR 1.4%, held-out 64.8%); half / 0.1: 97.0% (91.1%, 1.1%, 66.2%); 75% /
    # 0.25: 97.0% (93.0%, 1.1%, 67.8%); 75% / 0.1, the preset: 98.0% (100 / 100 / 96.8 / 95.3%), every claim true
    # 97.0%, CHAIR 0.8%, held-out 80.6%, ITM pair accuracy 98.2%, ITC R@5 98.0%, in 8.0 min on two threads
    # Tried to fit 5 minutes (2026-12-04; 500 test / 300 held-out scenes, beam 3): the CLIP tower frozen (LiT-style, no
    # backward through it, a third of a step) 86.2% exact (4 objects 64%), CHAIR 5.6%, held-out 30.3%; frozen with 1,800
    # steps 86.0%; ITC + ITM on every 4th fine-tune step at 4x weight (the tower trained) 96.2% (4 objects 89.0%), CHAIR
    # 1.1%, held-out 69.0%, ITM 85% on hard negatives, and still 7.75 min on 2 threads; torch.compile of the loss: 0.145
    # vs 0.142 s a step eager, after 115 s of compiling. The step is arithmetic (~8 GFLOP, ~45% of it the tower)
    "cpu": CaptionerRecipe(steps=2400, batch_size=48, lr=5e-3, warmup_steps=100, weight_decay=0.05, phrasings=(0,),
                           temperature_lr_scale=0.05, grad_clip=5.0, lm_finetune_share=0.75,
                           finetune_matching_weight=0.1),
    # the cpu recipe's schedule (one phrasing, the slow temperature, the LM-led fine-tune) at a 384-wide model's lr
    "gpu": CaptionerRecipe(steps=6000, batch_size=256, lr=1e-3, warmup_steps=300, weight_decay=0.05, phrasings=(0,),
                           temperature_lr_scale=0.05, grad_clip=5.0, lm_finetune_share=0.75,
                           finetune_matching_weight=0.1, eval_scenes=2000, heldout_scenes=1000, match_scenes=1000,
                           bf16=True, workers=8),
}
FAST_STEPS = 8  # what a notebook trains in fast mode (MINIVL_FAST=1), on the tiny preset


def make_batches(world: World, tokenizer, batch_size: int, context_length: int, seed: int = 0,
                 phrasings: tuple[int, ...] | None = None):
    """get_batch(step) -> {image, input_ids, attention_mask, positives}: a pure function of (seed, step)."""
    def get_batch(step: int) -> dict:
        rng = step_rng(seed, step)
        scenes = [world.scene(i, "train") for i in stream_indices(seed, step, batch_size)]
        refs = [world.captions(s) for s in scenes]
        pool = [r if phrasings is None else [r[min(p, len(r) - 1)] for p in phrasings] for r in refs]
        texts = [p[int(rng.integers(len(p)))] for p in pool]
        batch = collate([{"image": image_to_tensor(s.image)} for s in scenes])
        positives = torch.tensor([[t in set(r) for t in texts] for r in refs])  # (B, B): text j true of image i
        return {"image": batch["image"], **tokenize_batch(tokenizer, texts, context_length), "positives": positives}
    return get_batch


def finetune_schedule(recipe: CaptionerRecipe, matching_weight: float = 1.0):
    """after_step(model, step): from step (1 - lm_finetune_share) * steps on, the captioning fine-tune:
    the LM alone, or with ITC + ITM at `finetune_matching_weight`; before it, every objective of the
    recipe at `matching_weight` (the model config's)."""
    if not 0.0 <= recipe.lm_finetune_share <= 1.0:
        raise ValueError(f"lm_finetune_share must be in [0, 1], got {recipe.lm_finetune_share}")
    if recipe.finetune_matching_weight < 0:
        raise ValueError(f"finetune_matching_weight must be >= 0, got {recipe.finetune_matching_weight}")
    switch = round(recipe.steps * (1.0 - recipe.lm_finetune_share)) if "lm" in recipe.objectives else recipe.steps
    tuned = ("lm",) if recipe.finetune_matching_weight == 0 else tuple(recipe.objectives)

    def stage(model: Captioner, step: int) -> None:
        later = step >= switch
        model.config.objectives = tuned if later else tuple(recipe.objectives)
        model.config.matching_weight = recipe.finetune_matching_weight if later and tuned != ("lm",) else matching_weight
    return stage


def eval_sets(world: World, recipe: CaptionerRecipe) -> dict:
    test = [world.scene(i, "test") for i in range(recipe.eval_scenes)]
    heldout = [world.scene(i, "heldout") for i in range(recipe.heldout_scenes)]
    match = test[:recipe.match_scenes]
    texts = [world.captions(s)[0] for s in match]
    positives = torch.tensor([[t in set(world.captions(s)) for t in texts] for s in match])
    return {"test": test, "heldout": heldout, "match": (match, texts, positives)}


def _pixels(scenes) -> torch.Tensor:
    return image_to_tensor(torch.stack([torch.from_numpy(s.image) for s in scenes]).numpy())


@torch.no_grad()
def evaluate(model: Captioner, world: World, sets: dict, greedy: bool = True, samples: dict | None = None) -> dict:
    """Beam-3 (and greedy) caption scores on the test scenes, beam 3 on held-out scenes, ITM and ITC."""
    out = {}
    decodings = {"beam3": dict(num_beams=3)}
    if greedy:
        decodings["greedy"] = dict(num_beams=1)
    for name, dec in decodings.items():
        caps = ev.generate_captions(model, _pixels(sets["test"]), **dec)
        out[name] = ev.caption_scores(world, sets["test"], caps)
        if samples is not None:
            samples[name] = caps
    caps = ev.generate_captions(model, _pixels(sets["heldout"]), num_beams=3)
    out["heldout_beam3"] = ev.caption_scores(world, sets["heldout"], caps)
    if samples is not None:
        samples["heldout"] = caps
    scenes, texts, positives = sets["match"]
    images = _pixels(scenes)
    out.update(ev.itm_accuracy(model, images, texts, positives))
    out.update({f"itc_{k}": v for k, v in ev.itc_retrieval(model, images, texts, positives).items()})
    return out


def _init_vision(model: Captioner, preset: str) -> str | None:
    """Copy CLIP-<preset>'s vision tower into the captioner's, when the checkpoint exists and fits."""
    path = checkpoints_dir() / f"clip-{preset}"
    if not (path / "config.json").is_file():
        return None
    from minivl import clip
    clip_model, _ = clip.load(path, device="cpu")
    if dataclasses.asdict(clip_model.config.vision) != dataclasses.asdict(model.config.vision):
        print(f"{path}: its vision tower has another shape than the captioner's: training from scratch")
        return None
    model.vision.load_state_dict(clip_model.visual.state_dict())
    return str(path)


def _plots(run_dir: Path, history, world: World, sets: dict, samples: dict) -> None:
    import matplotlib.pyplot as plt

    from minivl.viz import captioner as viz_cap
    viz_cap.savefig(viz_cap.plot_objective_curves(history.train), run_dir / "loss.png")
    scenes = sets["test"][:8]
    viz_cap.savefig(viz_cap.show_captions([s.image for s in scenes], samples["beam3"][:8],
                                          [world.captions(s)[0] for s in scenes]), run_dir / "samples.png")
    plt.close("all")


def run(preset: str = "cpu", steps: int | None = None, device=None, out=None, seed: int = 0, bf16: bool = False,
        progress: bool = True, checkpoint: str | Path | None = None, resume: bool = False, force: bool = False,
        data: str | Path | None = None, objectives: tuple[str, ...] | None = None,
        phrasings: tuple[int, ...] | None | str = "recipe", init_from_clip: bool | None = None,
        greedy_eval: bool = True) -> dict:
    """Train, evaluate, save; returns the metrics dict (also <run folder>/metrics.json).

    objectives / phrasings / init_from_clip override the recipe's (the notebook's ablation:
    objectives=("lm",)). data: a folder with captions.json + images to fine-tune on instead.
    """
    recipe = choose(RECIPES, "captioner", preset, steps)
    changes = {k: v for k, v in dict(objectives=objectives, init_from_clip=init_from_clip).items() if v is not None}
    if phrasings != "recipe":
        changes["phrasings"] = phrasings
    recipe = dataclasses.replace(recipe, **changes)
    tokenizer = world_tokenizer()
    config = CaptionerConfig.preset(preset, objectives=tuple(recipe.objectives))
    world = World(image_size=config.vision.image_size)
    name = f"captioner-{preset}" + ("" if set(recipe.objectives) == {"itc", "itm", "lm"} else "-" + "-".join(recipe.objectives))
    run_dir, ckpt_dir = folders(name, out, checkpoint)

    minivl.seed_everything(seed)
    model = Captioner(config)
    model.tokenizer = tokenizer
    vision_from = _init_vision(model, preset) if recipe.init_from_clip else None
    if data is not None:
        items = own_data.load_coco_captions(Path(data) / "captions.json", data)
        batches = own_data.item_batches(items, tokenizer, config.vision.image_size, recipe.batch_size,
                                        config.text.context_length - len(model.prompt_ids()), seed)
    else:
        room = config.text.context_length - len(model.prompt_ids())  # [DEC] + prompt replace bos in LM mode
        batches = make_batches(world, tokenizer, recipe.batch_size, room, seed, recipe.phrasings)
    cfg = dataclasses.replace(train_config(recipe, seed, progress, bf16), grad_clip=recipe.grad_clip,
                              lr_scale={"vision": recipe.vision_lr_scale, "temp": recipe.temperature_lr_scale})
    stage = finetune_schedule(recipe, config.matching_weight)
    trainer = Trainer(model, batches, cfg, out_dir=run_dir, device=device, after_step=stage)
    resume_from = resume_point(run_dir, recipe.steps, resume, force)
    stage(model, checkpoint_progress(resume_from)[0] if resume_from is not None else 0)  # a resumed run's stage
    history, timing = timed_fit(trainer, resume_from)
    stage(model, 0)  # the checkpoint's config names the objectives and weight the model was pre-trained with
    model.eval()
    if not trainer.dist.main:
        return {}
    model.save(ckpt_dir, tokenizer)
    record = run_record(preset, recipe, trainer, history, timing, config=config, world=world, checkpoint=ckpt_dir,
                        run_dir=run_dir)
    record["vision_init"] = vision_from
    if data is not None:
        caps = ev.generate_captions(model, own_data.item_pixels(items, config.vision.image_size))
        refs = [it["captions"] for it in items]
        from minivl.metrics import bleu, cider_d
        metrics = {"own_data_bleu4": bleu(caps, refs)["BLEU-4"], "own_data_cider_d": cider_d(caps, refs),
                   "own_data_items": len(items), "sample_captions": caps[:20]}
        result = {**record, **metrics}
        write_metrics(run_dir, result)
        return result
    sets, samples = eval_sets(world, recipe), {}
    with torch.no_grad(), trainer.autocast():
        metrics = evaluate(model, world, sets, greedy=greedy_eval, samples=samples)
    result = {**record, **metrics, "sample_captions": samples["beam3"][:20]}
    write_metrics(run_dir, result)
    _plots(run_dir, history, world, sets, samples)
    return result


def summary(m: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    if "beam3" not in m:
        return (f"captioner {m['preset']} on your data: {m['steps']} steps in {m['train_seconds'] / 60:.1f} min "
                + timing_text(m) + f"\n  CIDEr-D {m['own_data_cider_d']:.2f}; checkpoint: {m['checkpoint']}")
    lines = [f"captioner {m['preset']} ({'+'.join(m['recipe']['objectives'])}): {m['steps']} steps in "
             f"{m['train_seconds'] / 60:.1f} min " + timing_text(m)]
    for name in ("beam3", "greedy", "heldout_beam3"):
        if name not in m:
            continue
        r = m[name]
        by = " / ".join(pct(v["exact_scene"]) for _, v in sorted(r["by_objects"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"  {name}: exact scene {pct(r['exact_scene'])} (by objects {by}), all claims true "
                     f"{pct(r['all_claims_true'])}, CHAIR {pct(r['chair'])}, absent pairs {pct(r['absent_pair_rate'])}, "
                     f"BLEU-4 {r['bleu4']:.3f}, CIDEr-D {r['cider_d']:.2f}")
    lines.append(f"  ITM accuracy: true pairs {pct(m['itm_true_acc'])}, hard negatives {pct(m['itm_hard_negative_acc'])};"
                 f" ITC image->text R@1 {pct(m['itc_i2t_R@1'])}, text->image R@1 {pct(m['itc_t2i_R@1'])}")
    lines.append(f"  checkpoint: {m['checkpoint']}  ->  minivl.captioner.load({Path(m['checkpoint']).name!r})")
    return "\n".join(lines)


def main(args) -> int:
    return run_cli(run, summary, args)
