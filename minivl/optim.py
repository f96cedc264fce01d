"""What trains, and how fast: AdamW parameter groups, freezing by name, and the learning-rate schedule.

What it builds: `lr_at(step, config)` (linear warmup, then cosine decay), `param_groups(model, ...)`
(AdamW groups by parameter name), `apply_freeze(model, freeze, lr_scale)`, `check_prefixes`,
`check_group_options` and `make_optimizer(model, config)`. `minivl.train.Trainer` uses all of it;
`minivl.train` re-exports it.

Follows:
- AdamW, Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019): weight decay is a
  shrink of the weights applied beside the Adam update, not an L2 term added to the gradient (which
  Adam would rescale per parameter, decaying rarely-updated weights the least).
- Linear warmup, Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour" (2017):
  Adam's second-moment estimates are poor in the first steps and random-init gradients are large,
  so full-size early updates can diverge; the lr ramps up over `warmup_steps`.
- Cosine decay, Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts" (ICLR
  2017), without the restarts: one half cosine from the peak lr down to `min_lr_ratio * lr`.

Why no decay on norms, biases and embeddings: decay pulls a weight toward 0, which regularises a
matrix (smaller weights, smoother function) but only distorts a LayerNorm gain (whose neutral value
is 1) or a bias (an offset, not a capacity); and an embedding row gets a gradient only in the steps
that see its token, while decay shrinks it every step, so rare tokens' embeddings would fade away.

How prefixes pick groups: a prefix names a module in `model.named_parameters()` ("visual" covers
"visual.blocks.0.attn.qkv.weight"; "visual.blocks.0" only that block). A parameter belongs to the
longest prefix that matches one of its names (a tied weight has several), so `freeze=("lm",)` with
`lr_scale={"lm.head": 1.0}` freezes the LM but trains its head. A prefix matching nothing is an
error: a typo would otherwise silently train (or freeze) the wrong thing.

The one idea: an optimizer is a list of groups, each with its own lr and decay; naming groups by
module prefix turns "train the projector 10x faster, keep the vision tower fixed" into data.
"""
from __future__ import annotations

import math
import weakref
import torch
from torch import nn

def lr_at(step: int, config) -> float:
    """Learning rate for update `step`: linear warmup, then cosine down to min_lr_ratio * lr.
    `config` is a `minivl.train.TrainConfig` (not imported: the loop sits a floor above this file)."""
    if step < config.warmup_steps:  # large early updates from random init can diverge (Goyal et al.)
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps))
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_group_options(lr_scale, freeze) -> tuple[dict[str, float], tuple[str, ...]]:
    """TrainConfig's `lr_scale` (prefix -> finite number >= 0) and `freeze` (prefixes), checked and
    normalised to a dict of floats and a tuple; TypeError/ValueError for anything else."""
    if not isinstance(lr_scale, dict) or not all(isinstance(k, str) and k for k in lr_scale):
        raise TypeError(f"lr_scale must be a dict of parameter-name prefix -> number, e.g. {{'head': 10.0}}, "
                        f"got {lr_scale!r}")
    for k, v in lr_scale.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise ValueError(f"lr_scale[{k!r}] must be a finite number >= 0, got {v!r}")
    if not isinstance(freeze, (tuple, list)) or not all(isinstance(p, str) and p for p in freeze):
        raise TypeError(f"freeze must be a tuple of parameter-name prefixes, e.g. ('visual',), got {freeze!r}")
    if set(freeze) & set(lr_scale):
        raise ValueError(f"{sorted(set(freeze) & set(lr_scale))} both frozen and given an lr_scale")
    return {k: float(v) for k, v in lr_scale.items()}, tuple(freeze)


def _names(model: nn.Module) -> dict[int, tuple[nn.Parameter, list[str]]]:
    """id -> (parameter, every name it has): a tied weight answers to both of its names."""
    out: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), (p, []))[1].append(name)
    return out


def _owner(names: list[str], prefixes) -> str | None:
    """The longest prefix that names a module (or parameter) holding one of `names`."""
    hits = [p for p in prefixes for n in names if n == p or n.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def check_prefixes(model: nn.Module, prefixes, what: str) -> None:
    """ValueError for a prefix that matches no parameter: a typo would silently train everything."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for p in prefixes:
        if _owner(names, [p]) is None:
            top = list(dict.fromkeys(n.split(".")[0] for n in names))
            raise ValueError(f"{what} prefix {p!r} matches no parameter of {type(model).__name__}; "
                             f"names start with one of {top} (as in model.named_parameters())")


_FROZEN_BY_TRAINER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> names a Trainer froze


def apply_freeze(model: nn.Module, freeze=(), lr_scale=()) -> list[str]:
    """Set requires_grad=False on the parameters under a `freeze` prefix (unless a longer `lr_scale`
    prefix claims them); returns their names. What an earlier Trainer froze and this one does not
    trains again (LLaVA's stage 2 unfreezes the LM on the same model); what you froze by hand stays."""
    check_prefixes(model, freeze, "freeze")
    before, frozen = _FROZEN_BY_TRAINER.get(model, set()), []
    for p, names in _names(model).values():
        if _owner(names, (*freeze, *lr_scale)) in freeze:
            p.requires_grad_(False)
            frozen.append(names[0])
        elif names[0] in before:
            p.requires_grad_(True)
    _FROZEN_BY_TRAINER[model] = set(frozen)
    return frozen


def param_groups(model: nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters in AdamW groups. Decay only Linear/Conv weights: norm gains, biases and
    embeddings get none (see the module docstring; an embedding tied to an output Linear counts as an
    embedding). Each `lr_scale` prefix gets its own pair of groups, "<prefix>/decay" and
    "<prefix>/no_decay", whose lr the trainer sets to scheduled lr * scale."""
    lr_scale = dict(lr_scale or {})
    check_prefixes(model, lr_scale, "lr_scale")
    matrices = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    decay = {id(m.weight) for m in model.modules() if isinstance(m, matrices)}
    decay -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {}  # a fixed order (default groups, then lr_scale's), so optimizer state loads back in place
    for prefix in (None, *lr_scale):
        for kind, wd in (("decay", weight_decay), ("no_decay", 0.0)):
            name = kind if prefix is None else f"{prefix}/{kind}"
            groups[prefix, kind] = {"name": name, "params": [], "weight_decay": wd,
                                    "lr_scale": 1.0 if prefix is None else lr_scale[prefix]}
    for p, names in _names(model).values():
        if p.requires_grad:
            groups[_owner(names, lr_scale), "decay" if id(p) in decay else "no_decay"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def make_optimizer(model: nn.Module, config) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused (one kernel for all parameters) where torch has it for this
    device, else foreach; `config` is a TrainConfig. The trainer sets each group's lr every step
    (`lr_at` * its lr_scale)."""
    groups = param_groups(model, config.weight_decay, config.lr_scale)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameter (all frozen: freeze={config.freeze})")
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=True)


__all__ = ["lr_at", "param_groups", "make_optimizer", "apply_freeze", "check_prefixes", "check_group_options"]
