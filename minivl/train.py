"""One training loop for every model in minivl.

What it builds: `TrainConfig`, `Trainer(model, batches, config).fit() -> History`, `StepSampler`
(a DataLoader batch sampler with exact resume) and the RNG-state helpers. The loop runs AdamW in
parameter groups by module name, some with their own lr or frozen, on a warmup + cosine schedule
(`minivl.optim`: Loshchilov & Hutter 2019, Goyal et al. 2017, SGDR 2017); gradient clipping;
gradient accumulation; bf16 autocast; DistributedDataParallel under torchrun (`minivl.distributed`:
Li et al., "PyTorch Distributed", VLDB 2020); periodic evaluation; checkpoints with exact resume;
progress lines (`minivl.progress`); exact resume and Ctrl-C at step boundaries (`minivl.resume`).
This module re-exports what those define.

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
- One update is get_batch(step)'s whole batch, however it is computed: under torchrun each of W
  processes keeps a contiguous row share (a StepSampler DataLoader loads only its own), cut into
  accumulation_steps micro-batches whose losses are weighted by their fraction of the rows, so for a
  loss that is a mean over samples the update is one process's on the whole batch (details, and a
  model's own `split_batch`: `minivl.distributed`; CLIP's loss is no such mean: `CLIP.split_batch`).
  The batch stream, hence resume, does not depend on W or the accumulation.
- `TrainConfig.workers` > 0 draws a callable's batches ahead in that many processes
  (`minivl.prefetch`): the same batches, so the same run, while a GPU trains on the current one.
- The host waits for the device once per log window (and at evals and checkpoints), not every
  step: losses and logs stay tensors until then. A non-finite loss or gradient norm is found there,
  named by its step, before the window's last update and before any checkpoint is written (with
  log_every=1 the weights are still those from before the bad step).
- A model may define `after_step(self)` (CLIP clamps its temperature there); `Trainer(after_step=fn)`
  adds fn(model, step). Both run after every update, `step` counting it.
- Under DDP rank 0 alone prints, shows progress and writes files; every rank runs eval_fn (no rank
  idles in a collective that could time out); logged numbers are means over all ranks' rows. Rank r
  seeds its RNG (dropout) with seed + 1_000_003 r: ranks draw different masks, as rows of one batch.
- Ctrl-C lands only between steps: during a step, fit's SIGINT handler (main thread only, restored
  after) just asks to stop, and the step finishes first; a second Ctrl-C stops at once. Then
  `out_dir/checkpoint` is written at that step boundary (also when Ctrl-C comes during an eval, the
  final one included) and KeyboardInterrupt is re-raised so scripts stop; `trainer.history` holds the
  run so far. A KeyboardInterrupt raised by code mid-step counts the step if AdamW applied its update,
  else redoes it. `fit(resume_from=...)` goes on, bit-exact, redoing an eval the interrupt cut short;
  the saved TrainConfig must match but for the RESUMABLE fields (more steps, how often to log...).
- Weights or optimizer moments that are not finite are never saved (the loss can still read a number
  while lr 100 overflows them): the run stops naming the step, the last good checkpoint stays.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

import minivl
from minivl import distributed
from minivl.checkpoint import WEIGHTS, atomic_dir, load_state, load_state_dict_checked, read_tensors, resolve, \
    save_state, write_json, write_model_files
from minivl.distributed import split_batch, to_device
from minivl.prefetch import Prefetch
from minivl.optim import apply_freeze, check_group_options, check_prefixes, lr_at, make_optimizer, param_groups
from minivl.progress import LineProgress, progress_bar
from minivl.resume import StepBoundaries, StepSampler, checkpoint_progress, rng_state, set_rng_state


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
    progress: bool = True  # show progress: a tqdm bar on a terminal, plain lines elsewhere
    accumulation_steps: int = 1  # micro-batches per update: each step's batch is cut into this many
    #                              row chunks, one forward/backward each (the activation memory of one)
    lr_scale: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> multiplier of
    #                              the scheduled lr, e.g. {"head": 10.0}; the longest matching prefix wins
    freeze: tuple[str, ...] = ()  # parameter-name prefixes kept fixed (requires_grad=False, no optimizer
    #                               state), e.g. ("visual", "lm"); a longer lr_scale prefix trains again
    workers: int = 0  # processes drawing get_batch(step) ahead (minivl.prefetch); the same batches, so
    #                   the same run: 0 on a 2-core CPU, several where a GPU would wait for the data

    def __post_init__(self):
        lows = {"steps": 1, "log_every": 1, "warmup_steps": 0, "eval_every": 0, "ckpt_every": 0, "seed": 0,
                "accumulation_steps": 1, "workers": 0}
        for name, low in lows.items():
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an int >= {low}, got {getattr(self, name)!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0; got "
                             f"{self.lr}, {self.min_lr_ratio}, {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        self.betas = tuple(self.betas)
        self.lr_scale, self.freeze = check_group_options(self.lr_scale, self.freeze)


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


# TrainConfig fields a resumed run may change: more `steps` trains longer (the cosine schedule then spans
# the new total, so the lr from the saved step on differs from the old plan), and how often to log, evaluate,
# checkpoint or show progress changes no update, nor does how many workers draw the batches. Any other field
# would make a different run: refused.
RESUMABLE = ("steps", "progress", "log_every", "eval_every", "ckpt_every", "workers")

_META = ("step", "lr", "seconds", "samples")  # per-step bookkeeping in a log window, not averaged
_LOCAL = (*_META, "grad_norm")  # the same on every rank (grad_norm is taken after the all-reduce): not summed


class Trainer:
    """`Trainer(model, batches, config, eval_fn, out_dir, device, after_step).fit(resume_from=None) -> History`.

    eval_fn(model, step) -> dict of numbers runs every `eval_every` steps and at the end, in eval
    mode under no_grad. after_step(model, step) runs after every update. With `out_dir`, checkpoints
    go to `out_dir/checkpoint` (a folder that `minivl.checkpoint.load_model` also reads) and the
    history to `out_dir/history.json`. `trainer.model` is always the plain model, never the DDP wrapper;
    `trainer.frozen` names the parameters `config.freeze` froze.
    """

    def __init__(self, model: nn.Module, batches, config: TrainConfig | None = None,
                 eval_fn: Callable | None = None, out_dir: str | Path | None = None, device=None,
                 after_step: Callable | None = None):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass the plain model: under torchrun the Trainer wraps it in DDP itself")
        if not callable(getattr(model, "loss", None)):
            raise TypeError(f"{type(model).__name__} needs a loss(batch) -> (loss, logs) method")
        if not (callable(batches) or hasattr(batches, "__iter__")):
            raise TypeError(f"batches must be get_batch(step) or an iterable, got {type(batches).__name__}")
        if out_dir is not None and not is_dataclass(getattr(model, "config", None)):
            raise TypeError(f"checkpoints need a dataclass `model.config`; {type(model).__name__} has none")
        if after_step is not None and not callable(after_step):
            raise TypeError(f"after_step must be a callable fn(model, step), got {type(after_step).__name__}")
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        self.dist, self.device = distributed.setup(device)
        self.model = model.to(self.device)
        self.batches, self.eval_fn, self.after_step = batches, eval_fn, after_step
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_path = self.out_dir / "checkpoint" if self.out_dir is not None else None
        self.bf16 = self.config.bf16 if self.config.bf16 is not None else self.device.type == "cuda"
        self.frozen = apply_freeze(self.model, self.config.freeze, self.config.lr_scale)  # before DDP and AdamW
        self.optimizer = make_optimizer(self.model, self.config)
        self._ddp = distributed.wrap(self.model, self.device) if self.dist.world_size > 1 else None
        self.step, self.history = 0, History()
        self._pending, self._window = [], []  # this window's per-step logs: not yet synced (tensors), synced
        self._shard_rows = None  # the global batch size when a StepSampler already loads this rank's share

    def fit(self, resume_from: str | Path | None = None) -> History:
        """Train up to `config.steps` (from a training checkpoint folder when given)."""
        cfg, rng = self.config, None
        if resume_from is not None:
            rng = self.load_checkpoint(resume_from)
        get_batch = self._batch_source(self.step)  # before seeding: a DataLoader draws from the torch RNG
        if rng is not None:
            set_rng_state(rng)
        elif self.step == 0:
            minivl.seed_everything(cfg.seed + 1_000_003 * self.dist.rank)
        self.model.train()
        bar = progress_bar(cfg.steps, initial=self.step, desc="train", disable=not (cfg.progress and self.dist.main))
        try:
            with StepBoundaries(tqdm.write if self.dist.main else lambda s: None) as stop:
                if resume_from is not None and 0 < self.step < cfg.steps and self._eval_due(self.step) and \
                        not (self.history.eval and self.history.eval[-1]["step"] == self.step):
                    self._guarded(self._evaluate, bar)  # the eval an interrupt at this step cut short
                while self.step < cfg.steps:
                    start, rng, tic = self.step, rng_state(), time.perf_counter()
                    try:
                        batch = get_batch(self.step)  # outside the deferral: a stuck loader stays interruptible
                        with stop.deferring():  # the update, its counter and its record: all or nothing
                            entry = self._train_step(batch)
                            entry["seconds"] = time.perf_counter() - tic
                            self._log(bar)  # first: a plain progress line printed by update() shows this record
                            bar.update()
                        stop.check()  # Ctrl-C during the step lands here, at the boundary after it
                        if self._eval_due(self.step):
                            self._evaluate()
                        if self.out_dir is not None and cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                            self._checkpoint()
                    except KeyboardInterrupt:
                        self._interrupted(start, rng, bar)
                        raise
                if self.eval_fn is not None and (not self.history.eval or self.history.eval[-1]["step"] != self.step):
                    self._guarded(self._evaluate, bar)
                if self.out_dir is not None:
                    self._guarded(self._checkpoint, bar)
                    if self.dist.main:
                        self.history.to_json(self.out_dir / "history.json")
            if self._ddp is not None:
                distributed.barrier(self.device)  # the files are written when any rank's fit returns
        finally:
            bar.close()
            if isinstance(get_batch, Prefetch):
                get_batch.close()
        return self.history

    def _eval_due(self, step: int) -> bool:
        return bool(self.config.eval_every and step % self.config.eval_every == 0)

    def _guarded(self, work: Callable, bar) -> None:
        """work() between steps; on Ctrl-C the interrupt checkpoint is written at this step, then re-raised."""
        try:
            work()
        except KeyboardInterrupt:
            self._interrupted(self.step, None, bar)
            raise

    def _interrupted(self, start: int, rng: dict | None, bar) -> None:
        """Ctrl-C: save the last whole step. A step either completed or did not: if the optimizer applied
        update `start` (a KeyboardInterrupt raised from code, not a deferred SIGINT), it is finished and
        counted; if not, it is dropped and saved with the RNG as it found it, so resume redoes it."""
        say = tqdm.write if self.dist.main else (lambda s: None)
        self.model.train()  # an interrupted eval leaves eval mode behind
        if self.step == start and self._updates_applied() > start:
            self.step += 1  # the update landed, the counter had not moved yet: count it, with its hooks
            self._run_hooks()
        if self.step > start:
            rng = None  # the RNG is where the finished step left it
            self._log(bar)  # its record, if a KeyboardInterrupt from code came before it (a no-op if written)
        self._pending = [e for e in self._pending if e["step"] < self.step]  # a half-done step is redone
        self._window = [e for e in self._window if e.get("step", -1) < self.step]
        if self.out_dir is None:
            say(f"interrupted at step {self.step}; no out_dir, so no checkpoint")
            return
        try:
            self.save_checkpoint(self.checkpoint_path, rng=rng)
        except FloatingPointError as err:
            say(f"interrupted at step {self.step}; no checkpoint written (the last good one stays): {err}")
            return
        say(f"interrupted at step {self.step}: checkpoint in {self.checkpoint_path}; "
            "continue with fit(resume_from=...) or `python -m minivl train ... --resume`")

    def _updates_applied(self) -> int:
        """How many updates AdamW has made, from its own per-parameter step counts (0 before the first)."""
        steps = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        return int(max(float(s) for s in steps)) if steps else 0

    def _run_hooks(self) -> None:
        if callable(getattr(self.model, "after_step", None)):
            self.model.after_step()
        if self.after_step is not None:
            self.after_step(self.model, self.step)

    def autocast(self):
        """bf16 matmuls with fp32 weights and optimizer state: no loss scaling needed, unlike fp16."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _train_step(self, batch) -> dict:
        """One update from the step's batch; returns its (not yet synced) log entry."""
        lr, world = lr_at(self.step, self.config), self.dist.world_size
        for group in self.optimizer.param_groups:  # the schedule is a pure function of the step
            group["lr"] = lr * group.get("lr_scale", 1.0)
        chunks, rows = distributed.micro_batches(batch, self.dist, self.config.accumulation_steps, self.device,
                                                 getattr(self.model, "split_batch", None), self._shard_rows)
        self.optimizer.zero_grad(set_to_none=True)
        sums = {}  # loss and logs, each micro-batch weighted by its share of the rows
        for i, (chunk, weight) in enumerate(chunks):
            last = i == len(chunks) - 1  # DDP all-reduces the summed gradients once, after the last
            with self._ddp.no_sync() if self._ddp is not None and not last else contextlib.nullcontext():
                with self.autocast():
                    out = self._ddp(chunk) if self._ddp is not None else self.model.loss(chunk)
                loss, logs = self._check_output(out)
                # DDP averages gradients over ranks; weight * world undoes that, leaving the row-weighted sum
                (loss if weight * world == 1 else loss * (weight * world)).backward()
            for k, v in [*logs.items(), ("loss", loss)]:
                v = v.detach() if isinstance(v, torch.Tensor) else v
                v = v if weight == 1 else v * weight
                sums[k] = sums[k] + v if k in sums else v
        clip = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # norm before clipping
        entry = {**sums, "step": self.step, "lr": lr, "grad_norm": grad_norm, "samples": rows or 0, "seconds": 0.0}
        self._pending.append(entry)
        if self._boundary(self.step + 1):
            self._flush()  # the one host sync of the window; raises before a non-finite update
        self.optimizer.step()
        self.step += 1
        self._run_hooks()
        return entry

    def _check_output(self, out) -> tuple[torch.Tensor, dict]:
        loss, logs = out if isinstance(out, tuple) and len(out) == 2 else (None, None)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and isinstance(logs, dict)):
            raise TypeError(f"{type(self.model).__name__}.loss must return (scalar tensor, dict), got {out!r:.80}")
        for k, v in logs.items():
            if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)) or \
                    isinstance(v, torch.Tensor) and v.numel() != 1:
                raise TypeError(f"{type(self.model).__name__}.loss log {k!r} must be a number or a one-element "
                                f"tensor, got {v!r:.60}")
        return loss, {k: v for k, v in logs.items() if k not in (*_LOCAL, "loss")}  # the trainer's own keys win

    def _boundary(self, step: int) -> bool:
        """Steps after which the host reads the window: logs, evals, checkpoints and the end."""
        cfg = self.config
        return (step % cfg.log_every == 0 or step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
                or bool(self.out_dir is not None and cfg.ckpt_every and step % cfg.ckpt_every == 0))

    def _flush(self, reduce: bool = True) -> None:
        """Pending tensors -> floats in one device sync (summed over ranks under DDP), then check them."""
        pending, self._pending = self._pending, []
        slots = [(e, k) for e in pending for k in e if k not in _LOCAL] + [(e, "grad_norm") for e in pending]
        tensors = [e[k].reshape(()).float().to(self.device) for e, k in slots if isinstance(e[k], torch.Tensor)]
        read = iter(torch.stack(tensors).tolist() if tensors else [])
        values = [next(read) if isinstance(e[k], torch.Tensor) else float(e[k]) for e, k in slots]
        n = len(values) - len(pending)  # the summed slots come first, the grad norms last
        if self.dist.world_size > 1:  # this rank's rows' share of each mean -> the mean over all rows
            values[:n] = distributed.all_reduce_sum(values[:n], self.device) if reduce else \
                [v * self.dist.world_size for v in values[:n]]  # no collective (Ctrl-C): this rank's estimate
        for (e, k), v in zip(slots, values):
            e[k] = v
        for e in pending:
            bad = "loss" if not math.isfinite(e["loss"]) else "gradient norm" if not math.isfinite(e["grad_norm"]) \
                else None
            if bad:
                now = self.step == e["step"]
                raise FloatingPointError(
                    f"{bad} is {e['loss' if bad == 'loss' else 'grad_norm']} at step {e['step']} (lr {e['lr']:.3g}); "
                    + ("the weights are still those after the previous step." if now else
                       f"updates {e['step']}..{self.step - 1} used it, so the weights are not finite: resume from "
                       "a checkpoint (a lower log_every stops sooner).")
                    + " Try a lower lr, grad_clip or bf16=False.")
        self._window += pending

    def _log(self, bar) -> None:
        if self.step % self.config.log_every and self.step != self.config.steps or \
                self.history.train and self.history.train[-1]["step"] == self.step:
            return
        win, self._window = self._window, []
        last = win[-1]
        keys = [k for k in last if k not in _META and all(k in r for r in win)]  # means over the window
        record = {"step": self.step, **{k: sum(r[k] for r in win) / len(win) for k in keys}, "lr": last["lr"]}
        if last["samples"]:
            record["samples_per_s"] = sum(r["samples"] for r in win) / max(1e-9, sum(r["seconds"] for r in win))
        self.history.train.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        **({"samples/s": f"{record['samples_per_s']:.0f}"} if last["samples"] else {}))

    def _evaluate(self) -> None:
        if self.eval_fn is None:
            return
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.eval_fn(self.model, self.step)
        self.model.train()
        if not isinstance(metrics, dict):
            raise TypeError(f"eval_fn must return a dict of numbers, got {type(metrics).__name__}")
        self.history.eval.append({"step": self.step, **{k: float(v) for k, v in metrics.items()}})
        if self.dist.main:
            tqdm.write(f"step {self.step}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()))

    def _batch_source(self, start: int) -> Callable:
        if callable(self.batches):
            if self.config.workers and start < self.config.steps:
                return Prefetch(self.batches, start, self.config.steps, self.config.workers)
            return self.batches
        sampler = getattr(self.batches, "batch_sampler", None)
        skip = start
        if isinstance(sampler, StepSampler):
            sampler.start_step, skip = start, 0
            sampler.rank, sampler.world_size = self.dist.rank, self.dist.world_size
            self._shard_rows = sampler.batch_size if self.dist.world_size > 1 else None
        elif start:
            warnings.warn(f"resuming by drawing and discarding {start} batches; exact only if the iterable "
                          "is deterministic (use a get_batch(step) callable or a StepSampler)", stacklevel=3)
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

    def _checkpoint(self) -> None:
        """save_checkpoint from rank 0, with every rank's RNG state (a collective: all ranks call it)."""
        rngs = distributed.gather_objects(rng_state()) if self.dist.world_size > 1 else None
        self.save_checkpoint(self.checkpoint_path, rank_rngs=rngs)

    def save_checkpoint(self, path: str | Path, rng: dict | None = None, rank_rngs: list | None = None) -> None:
        """Weights + config (loadable by load_model), optimizer, step, RNG and history, atomically.
        Rank 0 alone writes; a FloatingPointError instead if the window's losses are not finite."""
        self._flush(reduce=False)  # empty at the trainer's own checkpoints; collectives would need every rank
        self._check_finite(path)  # on every rank (DDP keeps the weights equal), so all of them stop together
        if not self.dist.main:
            return
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "rng": rng or rng_state(),
                 "window": self._window, "config": asdict(self.config)}
        if rank_rngs is not None:
            state["rank_rngs"] = rank_rngs
        with atomic_dir(path) as tmp:
            write_model_files(self.model, tmp)
            save_state(tmp, "train_state", state)
            self.history.to_json(tmp / "history.json")

    def _check_finite(self, path: str | Path) -> None:
        """A finite loss does not make finite weights (lr 100 without clipping overflows them while the
        loss still reads a number): refuse to write non-finite weights or moments over a good checkpoint.
        One device sync for all tensors."""
        named = [(n, p) for n, p in self.model.named_parameters()]
        named += [(f"optimizer moment {k!r}", v) for st in self.optimizer.state.values() for k, v in st.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step"]
        if not named:
            return
        ok = torch.stack([torch.isfinite(t).all().to(self.device) for _, t in named]).tolist()
        bad = [n for (n, _), good in zip(named, ok) if not good]
        if bad:
            raise FloatingPointError(
                f"the training diverged: after step {self.step} {len(bad)} tensor(s) are not finite ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}), though the loss may still read a number; not saving them to "
                f"{path}, whose last checkpoint (if any) is the last good one. Try a lower lr or grad_clip.")

    def _check_config(self, path: Path, saved: dict | None) -> None:
        """Resuming with another TrainConfig would change some settings and silently ignore others (the
        seed, say): only RESUMABLE fields may differ; any other difference is named and refused."""
        if saved is None:
            return
        ours = asdict(self.config)
        differ = sorted(k for k in saved if k not in RESUMABLE and saved[k] != ours.get(k))  # a field newer than
        #          the checkpoint cannot be compared; freeze and lr_scale are checked again as optimizer groups
        if differ:
            raise ValueError(f"{path} was saved with another TrainConfig: "
                             + "; ".join(f"{k} saved {saved.get(k)!r}, now {ours.get(k)!r}" for k in differ)
                             + f". Resume with the saved values (only {', '.join(RESUMABLE)} may change), "
                             "or start a fresh run")

    def load_checkpoint(self, path: str | Path) -> dict | None:
        """Restore weights, optimizer, step and history from `path`; returns this rank's saved RNG state."""
        path = resolve(path)  # a save a kill cut short is repaired first
        if not (path / "train_state.json").is_file():
            raise FileNotFoundError(f"{path} is not a training checkpoint (no train_state.json)")
        state = load_state(path, "train_state")
        self._check_config(path, state.get("config"))
        if state["step"] > self.config.steps:
            raise ValueError(f"{path} is at step {state['step']}, past this run's steps={self.config.steps}: "
                             "resume with at least as many steps")
        load_state_dict_checked(self.model, read_tensors(path / WEIGHTS))  # damaged or non-finite: ValueError
        groups = self.optimizer.param_groups
        ours = [(g["name"], len(g["params"])) for g in groups]
        saved = [(g.get("name"), len(g["params"])) for g in state["optimizer"]["param_groups"]]
        if saved != ours:
            raise ValueError(f"{path} has optimizer groups {saved} (name, size) but this TrainConfig makes {ours}: "
                             "resume with the freeze / lr_scale the run was saved with")
        scales = [g.get("lr_scale", 1.0) for g in groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for g, s in zip(self.optimizer.param_groups, scales):  # this config's scales win over the saved ones
            g["lr_scale"] = s
        self.step, self._window, self._pending = state["step"], state["window"], []
        self.history = History.from_json(path / "history.json")
        rngs, world = state.get("rank_rngs"), self.dist.world_size
        if rngs is not None and len(rngs) == world:
            return rngs[self.dist.rank]
        if world > 1 or rngs is not None:
            if self.dist.main:
                warnings.warn(f"{path} was saved by {len(rngs) if rngs else 1} process(es), resumed by {world}: "
                              "the training RNG is re-seeded per rank, so the run is not bit-exact", stacklevel=3)
            minivl.seed_everything(self.config.seed + self.step + 1_000_003 * self.dist.rank)
            return None
        return state["rng"]


__all__ = ["TrainConfig", "Trainer", "History", "StepSampler", "lr_at", "param_groups", "make_optimizer",
           "apply_freeze", "check_prefixes", "split_batch", "progress_bar", "LineProgress", "to_device",
           "rng_state", "set_rng_state", "checkpoint_progress", "RESUMABLE"]
