"""DistributedDataParallel: 2 CPU processes (gloo) train to the weights of one process on the whole batch.

The test launches this file under `python -m torch.distributed.run --standalone --nproc_per_node 2`;
each rank runs `worker()`, which trains a few scenarios and writes its weights and histories to a
folder; the test then compares them with single-process runs it computes itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from minivl.checkpoint import Checkpointable
from minivl.train import StepSampler, TrainConfig, Trainer

STEPS = 4


@dataclass
class DDPTinyConfig:
    dim: int = 4  # input features
    hidden: int = 16  # hidden width
    dropout: float = 0.0  # 0 where runs must match one process (masks depend on the rows a rank holds)


class DDPTiny(Checkpointable, nn.Module):
    """A small regression MLP; `fail_at` raises at that loss call, to crash after a checkpoint."""

    config_class = DDPTinyConfig

    def __init__(self, config: DDPTinyConfig):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.dim, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, 1)
        self.calls, self.fail_at = 0, None

    def loss(self, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("crash")
        h = self.drop(torch.relu(self.norm(self.fc1(batch["x"]))))  # (B, D)
        loss = F.mse_loss(self.head(h).squeeze(-1), batch["y"])
        return loss, {"mse": loss.detach()}


def get_batch(step, n=8):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 4, generator=g)
    return {"x": x, "y": x.sum(1)}


DATA = TensorDataset(torch.randn(24, 4, generator=torch.Generator().manual_seed(5)))


def loader():
    """A DataLoader whose StepSampler loads only this rank's share of each step's 6 rows."""
    return DataLoader(DATA, batch_sampler=StepSampler(len(DATA), 6, seed=1),
                      collate_fn=lambda rows: {"x": torch.stack([r[0] for r in rows]),
                                               "y": torch.stack([r[0] for r in rows]).sum(1)})


def build(dropout=0.0):
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    return DDPTiny(DDPTinyConfig(dropout=dropout))


def config(**kw):
    base = dict(steps=STEPS, lr=1e-2, warmup_steps=1, log_every=1, progress=False, seed=3,
                freeze=("norm",), lr_scale={"head": 10.0})
    return TrainConfig(**{**base, **kw})


SCENARIOS = {  # name -> (model dropout, batches, TrainConfig overrides); the reference runs one process
    "callable": (0.0, get_batch, dict(accumulation_steps=2)),  # 8 rows = 2 ranks x 2 micro-batches of 2
    "sampler": (0.0, loader, dict()),  # 6 rows: 3 loaded by each rank
}


def worker(out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    results, histories = {}, {}
    for name, (dropout, batches, kw) in SCENARIOS.items():
        evals = []
        data = batches if name == "callable" else batches()
        trainer = Trainer(build(dropout), data, config(progress=name == "sampler", **kw), out_dir=out / name,
                          device="cpu", eval_fn=lambda m, step, seen=evals: seen.append(step) or {"n": 1})
        assert trainer.dist.world_size == 2 and trainer.dist.rank == rank
        histories[name] = [r["loss"] for r in trainer.fit().train]
        assert evals == [STEPS], evals  # every rank evaluates
        results.update({f"{name}.{k}": v for k, v in trainer.model.state_dict().items()})
    # exact resume under DDP, dropout on: crash after the step-2 checkpoint, resume, match the run that never stopped
    steady = Trainer(build(0.3), get_batch, config(), device="cpu")
    steady.fit()
    crashing = build(0.3)
    crashing.fail_at = 3
    try:
        Trainer(crashing, get_batch, config(ckpt_every=2), out_dir=out / "resume", device="cpu").fit()
    except RuntimeError:
        pass
    resumed = Trainer(build(0.3), get_batch, config(ckpt_every=2), out_dir=out / "resume", device="cpu")
    resumed.fit(resume_from=out / "resume" / "checkpoint")
    for (k, a), b in zip(steady.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    results.update({f"dropout.{k}": v for k, v in steady.model.state_dict().items()})
    save_file({k: v.contiguous() for k, v in results.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(histories))


def reference(name: str) -> tuple[dict, list]:
    dropout, batches, kw = SCENARIOS[name]
    kw = {k: v for k, v in kw.items() if k != "accumulation_steps"}  # one process, one batch
    if name == "sampler":  # the same 6 rows a step, loaded whole
        sampler = StepSampler(len(DATA), 6, seed=1)
        data = lambda step: loader().collate_fn([DATA[i] for i in sampler.indices(step)])  # noqa: E731
    else:
        data = batches
    trainer = Trainer(build(dropout), data, config(**kw), device="cpu")
    history = trainer.fit()
    return trainer.model.state_dict(), [r["loss"] for r in history.train]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_two_processes_train_to_the_weights_of_one_on_the_whole_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    for name in SCENARIOS:
        weights, losses = reference(name)
        for k, v in weights.items():
            torch.testing.assert_close(ranks[0][f"{name}.{k}"], v, rtol=1e-6, atol=1e-6, msg=f"{name}.{k}")
        assert not torch.equal(ranks[0][f"{name}.head.weight"], build().head.weight)  # it trained
        assert torch.equal(ranks[0][f"{name}.norm.weight"], build().norm.weight)  # frozen under DDP too
        history = json.loads((tmp_path / "rank1.json").read_text())[name]
        assert history == pytest.approx(losses, rel=1e-5)  # logged: the mean over both ranks' rows
        # rank 0 alone wrote files, keyed like the plain model (no "module." prefix)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["checkpoint", "history.json"]
        saved = load_file(str(tmp_path / name / "checkpoint" / "model.safetensors"))
        assert sorted(saved) == sorted(weights)
    progress = [line for line in proc.stdout.splitlines() if line.startswith("train:")]
    assert len(progress) == STEPS  # one rank's progress lines, not two
    assert proc.stdout.count(f"step {STEPS}: n 1") == 2  # rank 0's eval line, once per scenario


# ---------------------------------------------------------------------------- CLIP: negatives from every rank
CLIP_STEPS = 3
ORDER = [0, 1, 4, 5, 2, 3, 6, 7]  # 2 ranks x 2 micro-batches: micro-batch i gathers both ranks' i-th slices
CLIP_SCENARIOS = {"clip": 1, "clip_accum": 2}  # name -> accumulation_steps


def clip_batches():
    """8 Shapes World pairs a step, with extra positives across the two ranks' shares and inside one."""
    from minivl.data import world_tokenizer
    from minivl.recipes.clip import make_batches
    from minivl.world import World
    base = make_batches(World(image_size=32), world_tokenizer(), 8, 0.5, 40, 0, True, CLIP_STEPS)

    def get_batch(step):
        batch = base(step)
        pos = batch["positives"].clone()
        pos[1, 6] = pos[6, 1] = pos[0, 5] = pos[5, 0] = pos[2, 3] = True
        return {**batch, "positives": pos}
    return get_batch


def build_clip():
    from minivl.clip import CLIP, CLIPConfig
    torch.manual_seed(0)
    return CLIP(CLIPConfig.preset("tiny"))


def clip_config(**kw):
    return TrainConfig(**{**dict(steps=CLIP_STEPS, lr=1e-3, warmup_steps=1, log_every=1, progress=False, seed=3),
                          **kw})


def clip_rows(items, positives=False):
    """DataLoader collate for (image, ids, mask) rows; with `positives`, the (b, b) mask of the rows it holds."""
    batch = {k: torch.stack([r[i] for r in items]) for i, k in enumerate(("image", "input_ids", "attention_mask"))}
    return {**batch, "positives": torch.eye(len(items), dtype=torch.bool)} if positives else batch


CLIP_DATA = None


def clip_loader(positives=False):
    """A StepSampler DataLoader over 8 pairs, 8 a step: under DDP each rank loads its 4 only."""
    global CLIP_DATA
    if CLIP_DATA is None:
        rows = clip_batches()(0)
        CLIP_DATA = TensorDataset(rows["image"], rows["input_ids"], rows["attention_mask"])
    return DataLoader(CLIP_DATA, batch_sampler=StepSampler(8, 8, seed=1),
                      collate_fn=lambda items: clip_rows(items, positives))


def clip_worker(out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    results, histories = {}, {}
    for name, accumulation in CLIP_SCENARIOS.items():
        trainer = Trainer(build_clip(), clip_batches(), clip_config(accumulation_steps=accumulation), device="cpu")
        histories[name] = [r["loss"] for r in trainer.fit().train]
        results.update({f"{name}.{k}": v for k, v in trainer.model.state_dict().items()})
    # shares a StepSampler loads: gathered (after checking they are equal) without positives ...
    trainer = Trainer(build_clip(), clip_loader(), clip_config(), device="cpu")
    histories["loaded"] = [r["loss"] for r in trainer.fit().train]
    results.update({f"loaded.{k}": v for k, v in trainer.model.state_dict().items()})
    try:  # ... but such a share cannot know the other ranks' positives: a clear error on every rank
        Trainer(build_clip(), clip_loader(positives=True), clip_config(steps=1), device="cpu").fit()
        histories["error"] = None
    except ValueError as err:
        histories["error"] = str(err)
    save_file({k: v.contiguous() for k, v in results.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(histories))


def test_clip_micro_batches_of_a_ddp_share_keep_their_global_rows():
    from minivl.distributed import Context, micro_batches
    model, batch = build_clip(), clip_batches()(0)
    chunks, rows = micro_batches(batch, Context(rank=1, world_size=2), 2, torch.device("cpu"), model.split_batch)
    assert rows == 8 and [w for _, w in chunks] == [0.25, 0.25]
    assert [c["global_rows"].tolist() for c, _ in chunks] == [[4, 5], [6, 7]]  # the share was cut with ranks=True
    assert torch.equal(chunks[1][0]["global_positives"], batch["positives"][6:])  # (2, 8): rows of the whole mask
    assert torch.equal(chunks[0][0]["positives"], batch["positives"][4:6, 4:6])  # (2, 2): the square block


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_clip_on_two_processes_contrasts_the_global_batch_and_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path), "clip"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    get_batch = clip_batches()

    def reordered(step):  # one process whose micro-batch i holds the rows DDP gathers for micro-batch i
        batch = get_batch(step)
        return {**{k: batch[k][ORDER] for k in ("image", "input_ids", "attention_mask")},
                "positives": batch["positives"][ORDER][:, ORDER]}

    initial = build_clip().state_dict()
    clip_loader()  # the pairs a StepSampler draws from
    sampler = StepSampler(8, 8, seed=1)
    whole = lambda step: clip_rows([CLIP_DATA[i] for i in sampler.indices(step)])  # noqa: E731
    for name, accumulation in [*CLIP_SCENARIOS.items(), ("loaded", 1)]:
        # accumulation_steps=1: one process on the whole batch, as given; 2: one process with 2 micro-batches
        # on the batch reordered so that its micro-batches are the ones DDP gathers (see CLIP.split_batch);
        # loaded: one process on the 8 rows the sampler draws, loaded whole
        data = whole if name == "loaded" else reordered if accumulation > 1 else get_batch
        trainer = Trainer(build_clip(), data, clip_config(accumulation_steps=accumulation), device="cpu")
        losses = [r["loss"] for r in trainer.fit().train]
        for k, v in trainer.model.state_dict().items():
            torch.testing.assert_close(ranks[0][f"{name}.{k}"], v, rtol=1e-5, atol=1e-5, msg=f"{name}.{k}")
        assert not torch.equal(ranks[0][f"{name}.visual_projection.weight"], initial["visual_projection.weight"])
        assert json.loads((tmp_path / "rank1.json").read_text())[name] == pytest.approx(losses, rel=1e-5)
    errors = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in (0, 1)]
    assert all(e and "whole batch's positives mask" in e for e in errors), errors


if __name__ == "__main__":
    (clip_worker if sys.argv[2:] == ["clip"] else worker)(Path(sys.argv[1]))
