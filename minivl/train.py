"""One training loop for every model in minivl.

What it builds: `Trainer(model, batches, TrainConfig(...)).fit() -> History` - AdamW (Loshchilov &
Hutter, "Decoupled Weight Decay Regularization", 2019) with no decay on norms, biases and
embeddings; linear warmup (Goyal et al., "Accurate, Large Minibatch SGD", 2017) then cosine decay
(Loshchilov & Hutter, "SGDR", 2017); gradient clipping; bf16 autocast; periodic evaluation;
checkpoints with exact resume.

The one idea: the loop knows nothing about the model. Anything with `loss(batch) -> (loss, logs)`
trains. The whole training state is weights + optimizer moments + step + RNG state; save all of it
and a resumed run is, bit for bit, the run that never stopped.

Conventions:
- "step s" counts completed optimizer updates: a history record or checkpoint at step s comes
  after s updates, and a NaN loss "at step s" is found while computing update s (0-based).
- `batches` is either a callable `get_batch(step) -> batch` (exact resume for free: Shapes World
  samples are pure functions of their index) or an iterable such as a DataLoader. For a DataLoader,
  pass `batch_sampler=StepSampler(len(dataset), batch_size, seed)`: the trainer tells it which step
  to start from. Other iterables are fast-forwarded on resume (exact only if they are deterministic).
- Ctrl-C (KeyboardInterrupt) writes `out_dir/checkpoint` at the interrupted step, then re-raises
  so scripts stop; `trainer.history` still holds the run so far. `fit(resume_from=...)` goes on.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

import minivl
from minivl.checkpoint import WEIGHTS, atomic_dir, load_state, load_state_dict_checked, save_state, \
    write_json, write_model_files


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer updates in total; the schedule spans all of them
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.05  # decoupled decay, on Linear/Conv weights only
    betas: tuple[float, float] = (0.9, 0.95)  # Adam moment decays; 0.95 is steadier for transformers
    warmup_steps: int = 100  # linear warmup: lr/warmup_steps at step 0, lr at step warmup_steps-1
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr, reached at the last step
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    bf16: bool | None = None  # bf16 autocast; None = on for CUDA, off elsewhere
    eval_every: int = 0  # call eval_fn every N steps (0 = only at the end)
    ckpt_every: int = 0  # checkpoint every N steps (0 = only at the end); needs out_dir
    log_every: int = 10  # a history record (mean over the last N steps) every N steps
    seed: int = 0  # seeds python/numpy/torch when a fresh run starts
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self):
        lows = {"steps": 1, "log_every": 1, "warmup_steps": 0, "eval_every": 0, "ckpt_every": 0, "seed": 0}
        for name, low in lows.items():
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an int >= {low}, got {getattr(self, name)!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0; got "
                             f"{self.lr}, {self.min_lr_ratio}, {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        self.betas = tuple(self.betas)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for update `step`: linear warmup, then cosine down to min_lr_ratio * lr."""
    if step < config.warmup_steps:  # large early updates from random init can diverge (Goyal et al.)
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps))
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only Linear/Conv weights. Norm gains, biases and embeddings get none: shrinking a
    gain or an offset toward 0 regularises nothing useful, and rare tokens' embeddings would
    decay away between the steps that see them. An embedding tied to an output Linear counts
    as an embedding."""
    matrices = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    decay = {id(m.weight) for m in model.modules() if isinstance(m, matrices)}
    decay -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"name": "decay", "params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where torch has it for this device, else foreach."""
    groups = param_groups(model, config.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=True)


def to_device(batch, device: torch.device):
    """Move every tensor in nested dicts/lists/tuples to `device`; leave other values alone."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _batch_size(batch) -> int | None:  # the first tensor's leading dimension, for samples/s
    if isinstance(batch, (dict, list, tuple)):
        values = batch.values() if isinstance(batch, dict) else batch
        return next((n for n in map(_batch_size, values) if n is not None), None)
    return batch.shape[0] if isinstance(batch, torch.Tensor) and batch.dim() else None


class StepSampler:
    """DataLoader batch sampler whose batch for step s depends only on (seed, s): each epoch is
    a fresh permutation seeded by (seed, epoch), so a resumed run starts at any step without
    replaying data. Infinite; the trainer stops it. The last partial batch of an epoch is dropped."""

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, start_step: int = 0):
        if not 1 <= batch_size <= dataset_len:
            raise ValueError(f"need 1 <= batch_size <= dataset_len, got {batch_size} and {dataset_len}")
        self.n, self.batch_size, self.seed, self.start_step = dataset_len, batch_size, seed, start_step

    def indices(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.n // self.batch_size)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[j * self.batch_size:(j + 1) * self.batch_size].tolist()

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.indices(step)
            step += 1


def rng_state() -> dict:
    """Every RNG a step may draw from (dropout, data augmentation), as checkpointable values."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


@dataclass
class History:
    train: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "grad_norm", ..., "samples_per_s"}
    eval: list[dict] = field(default_factory=list)  # {"step", **metrics from eval_fn}

    def to_json(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def from_json(cls, path: str | Path) -> History:
        return cls(**json.loads(Path(path).read_text()))

    def plot(self, title: str | None = None, log_y: bool = False):
        """The loss curve (train records, plus eval metrics whose name has "loss"); returns the figure."""
        from minivl.viz import plot_loss_curve
        curves = {"step": [r["step"] for r in self.train], "loss": [r["loss"] for r in self.train]}
        keys = [k for k in (self.eval[0] if self.eval else {}) if "loss" in k]
        if keys:
            curves["val_step"] = [r["step"] for r in self.eval]
            curves.update({f"val_{k}": [r.get(k, math.nan) for r in self.eval] for k in keys})
        return plot_loss_curve(curves, title=title, log_y=log_y)


class Trainer:
    """`Trainer(model, batches, config, eval_fn, out_dir, device).fit(resume_from=None) -> History`.

    eval_fn(model, step) -> dict of numbers runs every `eval_every` steps and at the end, in eval
    mode under no_grad. With `out_dir`, checkpoints go to `out_dir/checkpoint` (a folder that
    `minivl.checkpoint.load_model` also reads) and the history to `out_dir/history.json`.
    """

    def __init__(self, model: nn.Module, batches, config: TrainConfig | None = None,
                 eval_fn: Callable | None = None, out_dir: str | Path | None = None, device=None):
        if not callable(getattr(model, "loss", None)):
            raise TypeError(f"{type(model).__name__} needs a loss(batch) -> (loss, logs) method")
        if not (callable(batches) or hasattr(batches, "__iter__")):
            raise TypeError(f"batches must be get_batch(step) or an iterable, got {type(batches).__name__}")
        if out_dir is not None and not is_dataclass(getattr(model, "config", None)):
            raise TypeError(f"checkpoints need a dataclass `model.config`; {type(model).__name__} has none")
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        self.device = minivl.device(None if device is None else str(device))
        self.model = model.to(self.device)
        self.batches, self.eval_fn = batches, eval_fn
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_path = self.out_dir / "checkpoint" if self.out_dir is not None else None
        self.bf16 = self.config.bf16 if self.config.bf16 is not None else self.device.type == "cuda"
        self.optimizer = make_optimizer(self.model, self.config)
        self.step, self.history, self._window = 0, History(), []  # _window: per-step logs since last record

    def fit(self, resume_from: str | Path | None = None) -> History:
        """Train up to `config.steps` (from a training checkpoint folder when given)."""
        cfg, rng = self.config, None
        if resume_from is not None:
            rng = self.load_checkpoint(resume_from)
        get_batch = self._batch_source(self.step)  # before seeding: a DataLoader draws from the torch RNG
        if rng is not None:
            set_rng_state(rng)
        elif self.step == 0:
            minivl.seed_everything(cfg.seed)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc="train", dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                start, rng, tic = self.step, rng_state(), time.perf_counter()
                try:
                    batch = get_batch(self.step)
                    logs = self._train_step(batch)
                    self.step += 1
                    bar.update()
                    self._log(logs, _batch_size(batch), time.perf_counter() - tic, bar)
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._evaluate()
                    if self.out_dir is not None and cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                        self.save_checkpoint(self.checkpoint_path)
                except KeyboardInterrupt:
                    self._interrupted(rng if self.step == start else None)
                    raise
            if self.eval_fn is not None and (not self.history.eval or self.history.eval[-1]["step"] != self.step):
                self._evaluate()
            if self.out_dir is not None:
                self.save_checkpoint(self.checkpoint_path)
                self.history.to_json(self.out_dir / "history.json")
        finally:
            bar.close()
        return self.history

    def _interrupted(self, rng: dict | None) -> None:
        """Ctrl-C: save step k with the RNG as step k found it (if it was mid-step), so resume redoes it."""
        if self.out_dir is None:
            tqdm.write(f"interrupted at step {self.step}; no out_dir, so no checkpoint")
            return
        self.save_checkpoint(self.checkpoint_path, rng=rng)
        tqdm.write(f"interrupted at step {self.step}: checkpoint in {self.checkpoint_path}; "
                   "continue with fit(resume_from=...)")

    def _autocast(self):
        """bf16 matmuls with fp32 weights and optimizer state: no loss scaling needed, unlike fp16."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _train_step(self, batch) -> dict:
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:  # the schedule is a pure function of the step
            group["lr"] = lr
        with self._autocast():
            out = self.model.loss(to_device(batch, self.device))
        loss, logs = out if isinstance(out, tuple) and len(out) == 2 else (None, None)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and isinstance(logs, dict)):
            raise TypeError(f"{type(self.model).__name__}.loss must return (scalar tensor, dict), got {out!r:.80}")
        value = loss.item()  # a GPU sync, as the models' float logs already are
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step} (lr {lr:.3g}); the weights are still "
                                     "those after the previous step. Try a lower lr, grad_clip or bf16=False.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # norm before clipping
        self.optimizer.step()
        return {**{k: float(v) for k, v in logs.items()}, "loss": value, "lr": lr, "grad_norm": grad_norm.item()}

    def _log(self, logs: dict, batch_size: int | None, seconds: float, bar) -> None:
        self._window.append({**logs, "seconds": seconds, "samples": batch_size or 0})
        if self.step % self.config.log_every and self.step != self.config.steps:
            return
        win, self._window = self._window, []
        keys = [k for k in logs if all(k in r for r in win)]  # means over the window; lr as it is now
        record = {"step": self.step, **{k: sum(r[k] for r in win) / len(win) for k in keys}, "lr": logs["lr"]}
        if batch_size:
            record["samples_per_s"] = sum(r["samples"] for r in win) / max(1e-9, sum(r["seconds"] for r in win))
        self.history.train.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        **({"samples/s": f"{record['samples_per_s']:.0f}"} if batch_size else {}))

    def _evaluate(self) -> None:
        if self.eval_fn is None:
            return
        self.model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.eval_fn(self.model, self.step)
        self.model.train()
        if not isinstance(metrics, dict):
            raise TypeError(f"eval_fn must return a dict of numbers, got {type(metrics).__name__}")
        self.history.eval.append({"step": self.step, **{k: float(v) for k, v in metrics.items()}})
        tqdm.write(f"step {self.step}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()))

    def _batch_source(self, start: int) -> Callable:
        if callable(self.batches):
            return self.batches
        sampler = getattr(self.batches, "batch_sampler", None)
        skip = start
        if isinstance(sampler, StepSampler):
            sampler.start_step, skip = start, 0
        elif start:
            warnings.warn(f"resuming by drawing and discarding {start} batches; exact only if the iterable "
                          "is deterministic (use a get_batch(step) callable or a StepSampler)")
        it = iter(self.batches)

        def get_batch(step):
            nonlocal it
            for _ in range(2):  # an exhausted iterable starts a new epoch
                try:
                    return next(it)
                except StopIteration:
                    it = iter(self.batches)
            raise ValueError("batches yielded nothing")

        for _ in range(skip):
            get_batch(None)
        return get_batch

    def save_checkpoint(self, path: str | Path, rng: dict | None = None) -> None:
        """Weights + config (loadable by load_model), optimizer, step, RNG and history, atomically."""
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "rng": rng or rng_state(),
                 "window": self._window, "config": asdict(self.config)}
        with atomic_dir(path) as tmp:
            write_model_files(self.model, tmp)
            save_state(tmp, "train_state", state)
            self.history.to_json(tmp / "history.json")

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore weights, optimizer, step and history from `path`; returns the saved RNG state."""
        path = Path(path)
        if not (path / "train_state.json").is_file():
            raise FileNotFoundError(f"{path} is not a training checkpoint (no train_state.json)")
        load_state_dict_checked(self.model, load_file(str(path / WEIGHTS)))
        state = load_state(path, "train_state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self._window = state["step"], state["window"]
        self.history = History.from_json(path / "history.json")
        return state["rng"]


__all__ = ["TrainConfig", "Trainer", "History", "StepSampler", "lr_at", "param_groups", "make_optimizer",
           "to_device", "rng_state", "set_rng_state"]
