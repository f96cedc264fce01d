"""Data parallelism: one batch, cut by rows across processes (DDP) and across time (accumulation).

What it builds: `split_batch(batch, n)` (n contiguous row chunks of a nested batch),
`micro_batches(...)` (this process's micro-batches of a step's batch, with their loss weights),
`to_device`, `setup()` (the process group from torchrun's environment), `wrap()`
(DistributedDataParallel around a model's `loss`), and the few collectives the trainer needs: a
sum of logged numbers, a gather of RNG states, a barrier; plus `world_size()` and
`all_gather_rows()` (with gradients) for a loss that needs other processes' rows (CLIP's).
`minivl.train.Trainer` uses it; a single process never touches torch.distributed.

Follows Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training"
(VLDB 2020): every process holds a full replica; during backward the gradients are averaged with
bucketed all-reduces that overlap the remaining backward computation, so every replica takes the
same optimizer step. Gradient accumulation is the same sum taken in time instead of space: several
micro-batches' gradients add up in `.grad` before one update; DDP's `no_sync()` skips the
all-reduce on all but the last of them, so the network carries one all-reduce per update.

The one idea: parallelism changes where rows are computed, never what a step means. The trainer
cuts get_batch(step)'s batch into world_size contiguous shares (rank r keeps the r-th), each share
into accumulation_steps micro-batches, and weights each micro-batch's loss by its fraction of the
rows. For a loss that is a mean over samples, one update is then the update a single process
computes on the whole batch. A contrastive loss is not such a mean: its negatives are the rows it
sees. So under DDP CLIP gathers every process's features (`all_gather_rows`, gradients included, as
open_clip does) and contrasts each row against the whole global batch: the update is again one
process's on the whole batch. Accumulation is different: each micro-batch is its own, smaller,
contrastive batch (see `CLIP.split_batch`).
"""
from __future__ import annotations

import atexit
import inspect
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import minivl


def split_batch(batch, n: int) -> list:
    """Cut `batch` into `n` contiguous row chunks (sizes as `torch.tensor_split`: the first B % n
    chunks get one row more). B is the first tensor's leading dimension.

    Dicts and tuples are cut field by field; tensors along dim 0 (they must have B rows); a list of
    B items (captions, per-image box tensors) is cut into sub-lists, while a list whose items are
    all B-row tensors is a tuple of fields (what DataLoader's default collate makes); numbers,
    strings, None and 0-d tensors are shared by every chunk. A model whose batch does not fit these
    rules (say a (B, B) pairwise mask) defines `split_batch(self, batch, n)` and the trainer uses it,
    for micro-batches and process shares alike; if it takes a keyword `ranks`, the shares are cut
    with ranks=True, so it can keep what a cross-process loss needs (`minivl.clip.CLIP.split_batch`).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    rows = batch_rows(batch)
    if rows is None:
        raise ValueError(f"cannot split a batch without a tensor of rows (got {type(batch).__name__}); "
                         "use accumulation_steps=1 and one process, or define model.split_batch")
    return [_take(batch, rows, share(rows, n, i), "batch") for i in range(n)]


def share(rows: int, n: int, i: int) -> slice:
    """The rows of chunk i when `rows` rows are cut into n contiguous chunks, as `torch.tensor_split`."""
    size, extra = divmod(rows, n)
    start = i * size + min(i, extra)
    return slice(start, start + size + (i < extra))


def _take(x, rows: int, part: slice, path: str):
    """The rows `part` of every per-row value in `x` (see `split_batch`)."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            return x
        if x.shape[0] != rows:
            raise ValueError(f"{path} has shape {tuple(x.shape)}, but the batch has {rows} rows: cannot cut it "
                             "into micro-batches / process shares (define model.split_batch for such batches)")
        return x[part]
    if isinstance(x, dict):
        return {k: _take(v, rows, part, f"{path}[{k!r}]") for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_take(v, rows, part, f"{path}.{k}") for k, v in zip(x._fields, x)))
    fields = isinstance(x, tuple) or (isinstance(x, list) and (len(x) != rows or all(
        isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows for v in x)))
    if fields:
        return type(x)(_take(v, rows, part, f"{path}[{i}]") for i, v in enumerate(x))
    if isinstance(x, list):  # one item per row
        return x[part]
    return x  # numbers, strings, None: the same for every row


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


def micro_batches(batch, ctx: Context, n: int, device: torch.device, split=None,
                  rows: int | None = None) -> tuple[list, int | None]:
    """This process's part of a step's batch: ([(micro-batch on `device`, its fraction of the whole
    batch's rows)] * n, the whole batch's rows). With `rows` given, `batch` is already this rank's
    share of a batch that long (what a StepSampler loads under DDP). `split` (default split_batch)
    cuts the shares too, with ranks=True if it takes that keyword, and each share into micro-batches."""
    if n == 1 and ctx.world_size == 1:
        return [(to_device(batch, device), 1.0)], batch_rows(batch)
    split = split or split_batch
    if rows is None:
        rows = batch_rows(batch)
        if ctx.world_size > 1:
            by_rank = {"ranks": True} if "ranks" in inspect.signature(split).parameters else {}
            batch = split(batch, ctx.world_size, **by_rank)[ctx.rank]  # on the host: only this rank's rows travel
    chunks = split(to_device(batch, device), n)
    sizes = [batch_rows(c) or 0 for c in chunks]
    if not rows or len(chunks) != n or min(sizes) == 0:
        raise ValueError(f"a batch of {rows} rows cannot make {ctx.world_size} process share(s) x {n} "
                         "micro-batch(es) of at least one row each")
    return [(c, k / rows) for c, k in zip(chunks, sizes)], rows


def batch_rows(batch) -> int | None:
    """The first tensor's leading dimension: the batch size (None if there is no such tensor)."""
    if isinstance(batch, (dict, list, tuple)):
        values = batch.values() if isinstance(batch, dict) else batch
        return next((n for n in map(batch_rows, values) if n is not None), None)
    return batch.shape[0] if isinstance(batch, torch.Tensor) and batch.dim() else None


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank r of world_size processes, on GPU local_rank of its machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:  # rank 0 alone writes files and prints
        return self.rank == 0


def _teardown() -> None:
    """At exit: wait until every rank is here, then leave the group. Without the barrier a fast rank
    tears its gloo connections down while a slow one still talks on them, and the slow one can die in
    C++ ("terminate called without an active exception") after a run that finished correctly."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def setup(device=None) -> tuple[Context, torch.device]:
    """(Context, device) for this process. One process unless torchrun set WORLD_SIZE > 1 (or a
    process group is already initialised); then join the group (nccl on CUDA, gloo on CPU), and on
    CUDA take GPU LOCAL_RANK."""
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Context(), minivl.device(None if device is None else str(device))
        if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are not set: launch with "
                             "`torchrun --nproc_per_node N script.py`")
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world} asks for several processes, but this torch has no "
                               "torch.distributed")
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    dev = minivl.device(None if device is None else str(device))
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)  # nccl and all_gather_object use the current device
    elif dev.type != "cpu":
        raise ValueError(f"data-parallel training runs on cuda (nccl) or cpu (gloo), not {dev}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")  # env:// from torchrun
        atexit.register(_teardown)
    return Context(rank, world, local), dev


class _LossForward(nn.Module):
    """DDP does its bookkeeping in forward(); minivl models train through loss(). This makes loss
    the forward, so `ddp(batch)` runs `model.loss(batch)` with DDP's hooks armed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def wrap(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DistributedDataParallel over `model.loss`. Construction broadcasts rank 0's weights, so every
    replica starts equal. Frozen parameters (requires_grad=False) are left out of the all-reduce."""
    return nn.parallel.DistributedDataParallel(
        _LossForward(model), device_ids=[device.index] if device.type == "cuda" else None)


def world_size() -> int:
    """How many processes train together: torch.distributed's world size once a group is up, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(t: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Every process's `t` (b, ...) concatenated in rank order -> (world_size * b, ...); every rank
    must pass the same shape. With grad=True gradients flow back (torch.distributed.nn's all_gather:
    its backward sums, over ranks, the gradient each rank found for this rank's rows), which is what a
    loss over the gathered rows needs; grad=False is a plain collective (masks, indices)."""
    if grad:
        from torch.distributed.nn.functional import all_gather
        with warnings.catch_warnings():  # torch 2.13 marks it deprecated; its successor is still private
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(t), dim=0)
    flag = t.dtype == torch.bool  # gloo has no bool collectives
    src = t.to(torch.uint8) if flag else t.contiguous()
    out = [torch.empty_like(src) for _ in range(dist.get_world_size())]
    dist.all_gather(out, src)
    out = torch.cat(out, dim=0)
    return out.bool() if flag else out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a list of numbers over all processes (float64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (pickled over the wire only, never to disk)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier(device: torch.device) -> None:
    """Wait for every process (an all-reduce of one number: nccl's barrier() must guess the device)."""
    dist.all_reduce(torch.zeros(1, device=device))


__all__ = ["split_batch", "share", "batch_rows", "to_device", "micro_batches", "Context", "setup", "wrap",
           "world_size", "all_gather_rows", "all_reduce_sum", "gather_objects", "barrier"]
