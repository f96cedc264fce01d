"""Training recipes: `python -m minivl train <model>` and the `run(...)` the notebooks call.

Each recipe module pairs a model preset with its training preset (steps, batch size, learning
rate, warmup...) as data, trains with `minivl.train.Trainer`, writes a checkpoint to
`data/checkpoints/<model>-<preset>` and a run folder `data/runs/<model>-<preset>` (metrics.json
and plots), and prints a short summary.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import minivl
from minivl.checkpoint import checkpoints_dir
from minivl.train import History, TrainConfig, Trainer


def choose(recipes: dict, model: str, preset: str, steps: int | None = None) -> dict:
    """A copy of `recipes[preset]`, with `steps` overridden when given; clear errors for bad values."""
    if preset not in recipes:
        raise ValueError(f"unknown {model} preset {preset!r}; choose from {sorted(recipes)}")
    recipe = dict(recipes[preset])
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        recipe["steps"] = steps
    return recipe


def folders(name: str, out=None, checkpoint=None) -> tuple[Path, Path]:
    """(run folder, checkpoint folder): `out` / `checkpoint`, or data/runs/<name> and data/checkpoints/<name>.

    The run folder is created; the checkpoint folder is written atomically when the model is saved.
    """
    run_dir = Path(out) if out is not None else minivl.data_dir() / "runs" / name
    ckpt_dir = Path(checkpoint) if checkpoint is not None else checkpoints_dir() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, ckpt_dir


def train_config(recipe: dict, seed: int, progress: bool, bf16: bool = False) -> TrainConfig:
    """The TrainConfig of a recipe: warmup capped at a fifth of the steps; bf16 from the recipe (CUDA
    only) unless `bf16=True` asks for it on every device."""
    return TrainConfig(steps=recipe["steps"], lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                       warmup_steps=min(recipe["warmup_steps"], recipe["steps"] // 5),
                       bf16=True if bf16 else (None if recipe["bf16"] else False),
                       eval_every=recipe["eval_every"], log_every=10, seed=seed, progress=progress)


def timed_fit(trainer: Trainer) -> tuple[History, dict]:
    """trainer.fit(), with what a reader needs to judge the time: wall and CPU seconds, threads, load."""
    load_before = os.getloadavg()[0]
    tic, cpu_tic = time.perf_counter(), time.process_time()
    history = trainer.fit()
    timing = {"train_seconds": time.perf_counter() - tic, "train_cpu_seconds": time.process_time() - cpu_tic,
              "torch_threads": torch.get_num_threads(), "loadavg_1min": [load_before, os.getloadavg()[0]]}
    return history, timing


def timing_text(m: dict) -> str:
    """'(N images/s on DEVICE, T threads, C CPU-min, load L)': how to read a recipe's training time."""
    return (f"({m['train_images_per_s']:.0f} images/s on {m['device']}, {m['torch_threads']} threads, "
            f"{m['train_cpu_seconds'] / 60:.1f} CPU-min, load {m['loadavg_1min'][0]:.1f})")
