"""Training recipes: `python -m minivl train <family>` and the `load_or_train(...)` every notebook calls.

A recipe module (`recipes/clip.py`, `recipes/vit.py`, ...) pairs a model preset with a training
preset - a `Recipe` dataclass of steps, batch size, learning rate and the family's own settings -
trains with `minivl.train.Trainer`, writes a checkpoint to `data/checkpoints/<family>-<preset>`
and a run folder `data/runs/<family>-<preset>` (metrics.json and plots), and prints a summary.
A module that defines `run(preset, ...)`, `summary(metrics)` and `main(args)` is found by the CLI
on its own: a new family is added by adding its file.

This file is the scaffold they share, so each recipe holds only what is particular to its task:
the deterministic batch stream, the single-object evaluation sets, colour/shape accuracy, "pad to
the longest, truncate at the context", metrics written atomically, and `load_or_train`.

The one idea to take away: a training run is data (the presets) plus one loop; the rest is
bookkeeping that should be written once, so that every family's numbers mean the same thing.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import minivl
from minivl.checkpoint import CONFIG, checkpoints_dir, load_model, read_json, resolve, write_json
from minivl.train import History, TrainConfig, Trainer, checkpoint_progress


@dataclass(frozen=True)
class Recipe:
    """What every family's training preset holds; a family subclasses it to add its own fields."""

    steps: int  # optimizer updates
    batch_size: int  # samples per update (the global batch, whatever the number of processes)
    lr: float  # peak learning rate (AdamW), reached after warmup
    warmup_steps: int  # linear warmup, capped at a fifth of the steps
    weight_decay: float  # decoupled weight decay on weight matrices
    eval_every: int = 0  # quick evaluations during training (0 = only the full one at the end)
    bf16: bool = False  # bf16 autocast on CUDA (the gpu presets); CPU stays fp32 unless --bf16
    workers: int = 0  # processes drawing the next batches (the gpu presets: scenes are drawn on the CPU)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.warmup_steps < self.steps or self.eval_every < 0:
            raise ValueError(f"need 0 <= warmup_steps < steps and eval_every >= 0, got "
                             f"{self.warmup_steps}, {self.steps}, {self.eval_every}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")


def choose(recipes: dict, family: str, preset: str, steps: int | None = None) -> Recipe:
    """`recipes[preset]`, with `steps` overridden when given; clear errors for bad values."""
    if preset not in recipes:
        raise ValueError(f"unknown {family} preset {preset!r}; choose from {sorted(recipes)}")
    recipe = recipes[preset]
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        recipe = dataclasses.replace(recipe, steps=steps, warmup_steps=min(recipe.warmup_steps, steps // 5))
    return recipe


def folders(name: str, out=None, checkpoint=None) -> tuple[Path, Path]:
    """(run folder, checkpoint folder): `out` / `checkpoint`, or data/runs/<name> and data/checkpoints/<name>.

    The run folder is created; the checkpoint folder is written atomically when the model is saved.
    """
    run_dir = Path(out) if out is not None else minivl.data_dir() / "runs" / name
    ckpt_dir = Path(checkpoint) if checkpoint is not None else checkpoints_dir() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, ckpt_dir


def train_config(recipe: Recipe, seed: int, progress: bool, bf16: bool = False, **groups) -> TrainConfig:
    """The TrainConfig of a recipe: warmup capped at a fifth of the steps; bf16 from the recipe (CUDA
    only) unless `bf16=True` asks for it on every device. `groups`: the parameter-group options of
    TrainConfig, `lr_scale={prefix: multiplier}` and `freeze=(prefix, ...)`, for families that
    fine-tune a pretrained tower slower or keep it fixed."""
    unknown = set(groups) - {"lr_scale", "freeze"}
    if unknown:
        raise TypeError(f"train_config takes lr_scale and freeze as parameter-group options, got {sorted(unknown)}")
    return TrainConfig(steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay,
                       warmup_steps=min(recipe.warmup_steps, recipe.steps // 5),
                       bf16=True if bf16 else (None if recipe.bf16 else False),
                       eval_every=recipe.eval_every, log_every=10, seed=seed, progress=progress,
                       workers=recipe.workers, **groups)


# ---------------------------------------------------------------- data every family draws the same way
def stream_indices(seed: int, step: int, batch_size: int) -> range:
    """Scene indices of batch `step`: fresh scenes every step, a pure function of (seed, step), so a
    resumed run (or another process of a distributed one) draws exactly the same batch."""
    first = seed * 2**40 + step * batch_size  # 2**40 scenes per seed before two seeds' streams meet
    return range(first, first + batch_size)


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The random choices of batch `step` (phrasings, curriculum draws), as pure as its scenes."""
    return np.random.default_rng([seed, step])


def single_object_set(world, split: str, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-object scenes offset..offset+n-1 of `split`: images (n, 3, H, W) and class labels (n,)."""
    from minivl.data import image_to_tensor
    scenes = [world.scene(offset + i, split, n_objects=1) for i in range(n)]
    images = image_to_tensor(np.stack([s.image for s in scenes]))  # (n, 3, H, W)
    return images, torch.tensor([world.class_index(s) for s in scenes])


def color_shape_accuracy(world, truth, guess) -> dict:
    """{"color": share of guesses with the true colour, "shape": ... the true shape} over class indices.

    On a held-out pair the whole-class answer cannot be right (the model has no such class), so
    these two halves are what compositional generalisation is measured by."""
    truth, guess = torch.as_tensor(truth).tolist(), torch.as_tensor(guess).tolist()
    if len(truth) != len(guess) or not truth:
        raise ValueError(f"need as many guesses as labels, at least one; got {len(guess)} and {len(truth)}")
    return {part: float(np.mean([world.combos[t][axis] == world.combos[g][axis] for t, g in zip(truth, guess)]))
            for part, axis in (("color", 0), ("shape", 1))}


def tokenize_batch(tokenizer, texts: list[str], context_length: int) -> dict:
    """Texts -> {input_ids, attention_mask} padded to the longest text (not to the context: less
    compute); the rare text over the context is cut there, eos kept last."""
    return tokenizer(list(texts), context_length=context_length, truncate=True, padding="longest")


# ---------------------------------------------------------------- running, timing, writing down
def fit(model, batches, recipe: Recipe, *, seed: int, progress: bool, bf16: bool, device, run_dir: Path,
        eval_fn=None, resume: bool = False, force: bool = False, lr_scale: dict | None = None,
        freeze: tuple = ()) -> tuple[Trainer, History, dict]:
    """Train `model` on `batches` by the recipe, checkpointing into the run folder; -> (trainer, history,
    timing). The model comes back in eval mode, ready for the final evaluation.

    resume: go on from the training checkpoint in the run folder (`resume_from`). force: start afresh
    even where that replaces an interrupted or longer run there; without it such a run is refused.
    lr_scale / freeze: TrainConfig's parameter groups (a pretrained tower trained slower, or kept fixed)."""
    resume_from = resume_point(run_dir, recipe.steps, resume, force)
    config = train_config(recipe, seed, progress, bf16, lr_scale=dict(lr_scale or {}), freeze=tuple(freeze))
    trainer = Trainer(model, batches, config, eval_fn=eval_fn, out_dir=run_dir, device=device)
    history, timing = timed_fit(trainer, resume_from)
    model.eval()
    return trainer, history, timing


def run_cli(run, summary, args) -> int:
    """`python -m minivl train <family> ...`: call the family's `run` with the parsed options (--data and
    --stage only where `run` takes them), print `summary` of the metrics, exit status 0."""
    import inspect
    takes = inspect.signature(run).parameters
    options = {o: getattr(args, o, None) for o in ("data", "stage") if o in takes}
    result = run(args.preset, steps=args.steps, device=args.device, out=args.out, seed=args.seed, bf16=args.bf16,
                 progress=True, resume=args.resume, force=args.force, **options)
    if result:  # empty on the other ranks of a torchrun job
        print(summary(result))
    return 0


def resume_point(run_dir: Path, steps: int, resume: bool, force: bool = False) -> Path | None:
    """The checkpoint to resume from (resume=True), or None to start afresh once that loses nothing.

    Starting afresh over the run folder's training checkpoint is refused when that run is unfinished
    (resume it instead) or went further than `steps` (its final model would be replaced by a shorter
    one). Over a finished run of at most `steps` it is allowed: the same command trains the same run
    again, and data/checkpoints/<name> is replaced, atomically, only when the new run has finished."""
    if resume and force:
        raise ValueError("resume=True continues the run in the folder, force=True replaces it: choose one")
    checkpoint = Path(run_dir) / "checkpoint"
    progress = checkpoint_progress(checkpoint)
    if resume:
        if progress is None:
            raise FileNotFoundError(f"nothing to resume: {checkpoint} holds no training checkpoint (no "
                                    "train_state.json); run without --resume to start the run")
        return checkpoint
    if progress is None or force:
        return None
    step, total = progress
    if step < total:
        raise ValueError(f"{checkpoint} holds a run interrupted at step {step} of {total}; starting afresh would "
                         f"overwrite it. Continue it with --resume (resume=True; --steps N to train longer), or "
                         f"start afresh with --force (force=True), with --out DIR, or after moving {run_dir} away")
    if step > steps:
        raise ValueError(f"{checkpoint} holds a finished run of {step} steps, more than the {steps} asked for; a "
                         f"fresh run would replace its model with a shorter one. Do that with --force (force=True), "
                         f"or keep it: use --out DIR, or move {run_dir} away first")
    print(f"{checkpoint} holds a finished run of {step} steps: training again from scratch "
          "(--resume continues it instead)")
    return None


def run_record(preset: str, recipe: Recipe, trainer: Trainer, history: History, timing: dict, *, config,
               world, checkpoint: Path, run_dir: Path) -> dict:
    """The fields every family's metrics.json shares: what ran, how long, where it went."""
    return {"preset": preset, "steps": recipe.steps, **timing,
            "train_images_per_s": timing["steps_trained"] * recipe.batch_size / timing["train_seconds"],
            "final_loss": history.train[-1]["loss"] if history.train else None,
            "device": str(trainer.device), "bf16": trainer.bf16, "checkpoint": str(checkpoint), "run_dir": str(run_dir),
            "recipe": dataclasses.asdict(recipe), "config": dataclasses.asdict(config), "world_version": world.version}


def timed_fit(trainer: Trainer, resume_from: Path | None = None) -> tuple[History, dict]:
    """trainer.fit(resume_from), with what a reader needs to judge the time: wall and CPU seconds, threads,
    load (of this call: a resumed run counts only the steps it trained now)."""
    load_before = os.getloadavg()[0]
    first = checkpoint_progress(resume_from)[0] if resume_from is not None else 0
    tic, cpu_tic = time.perf_counter(), time.process_time()
    history = trainer.fit(resume_from=resume_from)
    timing = {"steps_trained": trainer.step - first, "train_seconds": time.perf_counter() - tic, "train_cpu_seconds": time.process_time() - cpu_tic,
              "torch_threads": torch.get_num_threads(), "loadavg_1min": [load_before, os.getloadavg()[0]]}
    return history, timing


def timing_text(m: dict) -> str:
    """'(N images/s on DEVICE, T threads, C CPU-min, load L)': how to read a recipe's training time."""
    return (f"({m['train_images_per_s']:.0f} images/s on {m['device']}, {m['torch_threads']} threads, "
            f"{m['train_cpu_seconds'] / 60:.1f} CPU-min, load {m['loadavg_1min'][0]:.1f})")


def write_metrics(run_dir: str | Path, metrics: dict) -> Path:
    """metrics.json in the run folder, written atomically (a crash never leaves half a file)."""
    def plain(x):  # recipes and configs are dataclasses; JSON wants dicts
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) and not isinstance(x, type) else x
    path = Path(run_dir) / "metrics.json"
    write_json(path, {k: plain(v) for k, v in metrics.items()})
    return path


def families() -> list[str]:
    """The recipe modules in this folder (what `python -m minivl train` offers), found without importing them."""
    import pkgutil
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


@dataclass
class Trained:
    """What `load_or_train` hands a notebook."""

    model: torch.nn.Module  # in eval mode, on the requested device; `model.tokenizer` when it has one
    metrics: dict  # the run's metrics.json (empty when the checkpoint came without its run folder)
    checkpoint: Path  # the folder the model was loaded from
    run_dir: Path  # the run folder: metrics.json, history.json, plots
    trained: bool  # True when this call trained it, False when it loaded an earlier run


def load_or_train(family: str, preset: str | None = None, *, steps: int | None = None, device=None,
                  retrain: bool = False, progress: bool | None = None, **run_kwargs) -> Trained:
    """Load `data/checkpoints/<family>-<preset>` if an earlier run wrote it, else train it; then load it.

    preset: "cpu" by default, "tiny" in fast mode (MINIVL_FAST=1). In fast mode the recipe always
    trains, for the module's FAST_STEPS steps, and never loads a full-size checkpoint: the fast run
    takes the same code path as a learner's first full run (train, save, load back), in seconds.
    A checkpoint made from another version of Shapes World is trained again, with a note. A run that
    was interrupted (a training checkpoint short of its steps in the run folder) is resumed, with a note;
    retrain=True starts afresh instead. Extra keyword arguments go to the recipe's `run(...)`.
    """
    if family not in families():
        raise ValueError(f"unknown family {family!r}; recipes: {families()}")
    module = importlib.import_module(f"minivl.recipes.{family}")
    fast = minivl.fast_mode()
    preset = preset or ("tiny" if fast else "cpu")
    if fast and preset != "tiny":
        raise ValueError(f"fast mode (MINIVL_FAST=1) trains the tiny preset only, got preset={preset!r}")
    if fast and steps is None:
        steps = getattr(module, "FAST_STEPS", None)
    name = f"{family}-{preset}"
    run_dir, ckpt_dir = folders(name, run_kwargs.pop("out", None), run_kwargs.pop("checkpoint", None))
    metrics_path = run_dir / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}  # a damaged file: ValueError naming it
    have = (resolve(ckpt_dir) / CONFIG).is_file() and not (fast or retrain)  # resolve: a save a kill cut short
    stale = metrics.get("world_version") not in (None, _world_version())
    if have and stale:
        print(f"{ckpt_dir} was trained on Shapes World {metrics['world_version']}; this is "
              f"{_world_version()}: training again")
        have = False
    if have:
        print(f"loading {ckpt_dir} (trained earlier; retrain=True trains again)")
    else:
        progress = (not fast) if progress is None else progress
        # fast mode and retrain=True start afresh whatever the run folder holds (asked for, or seconds of
        # tiny training); otherwise an interrupted run there is resumed, so no step of it is lost
        force = fast or retrain or stale
        at = checkpoint_progress(run_dir / "checkpoint")
        resume = not force and at is not None and at[0] < at[1]
        if resume:
            print(f"resuming the run interrupted at step {at[0]} of {at[1]} in {run_dir} (retrain=True starts afresh)")
        metrics = module.run(preset, steps=steps, device=device, progress=progress, out=run_dir,
                             checkpoint=ckpt_dir, resume=resume, force=force, **run_kwargs)
        if not fast:
            print(module.summary(metrics))
    model = load_model(ckpt_dir, map_location=minivl.device(None if device is None else str(device))).eval()
    return Trained(model, metrics, ckpt_dir, run_dir, trained=not have)


def _world_version() -> str:
    from minivl.world import VERSION
    return VERSION


__all__ = ["Recipe", "choose", "folders", "train_config", "run_cli", "stream_indices", "step_rng", "single_object_set",
           "color_shape_accuracy", "tokenize_batch", "fit", "resume_point", "run_record", "timed_fit", "timing_text", "write_metrics", "families",
           "Trained", "load_or_train"]
