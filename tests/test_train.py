"""The training loop: exact resume, NaN stop, Ctrl-C checkpoint, schedule, decay groups, clipping."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from minivl.checkpoint import Checkpointable, load_model, load_state
from minivl.train import History, StepSampler, TrainConfig, Trainer, lr_at, param_groups, to_device


@dataclass
class TrainTinyConfig:
    dim: int = 4  # input features
    hidden: int = 16  # hidden width
    dropout: float = 0.3  # makes the loss depend on the RNG, so resume must restore it


class TrainTiny(Checkpointable, nn.Module):
    """A small regression MLP with an embedding, a norm and dropout: every kind of parameter."""

    config_class = TrainTinyConfig

    def __init__(self, config: TrainTinyConfig):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.dim, config.hidden)
        self.kind = nn.Embedding(3, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.hidden, 1)
        self.interrupt_at = None  # raise KeyboardInterrupt at this call, after the forward pass
        self.calls = 0

    def loss(self, batch):
        h = self.drop(torch.relu(self.norm(self.fc1(batch["x"]) + self.kind(batch["kind"]))))  # (B, D)
        loss = F.mse_loss(self.fc2(h).squeeze(-1), batch["y"])
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return loss, {"mse": loss.item()}


def get_batch(step, n=8):
    g = torch.Generator().manual_seed(1000 + step)  # a pure function of the step, like Shapes World
    x = torch.randn(n, 4, generator=g)
    return {"x": x, "kind": torch.randint(0, 3, (n,), generator=g), "y": x.sum(1) * 3}


def model(seed=0):
    torch.manual_seed(seed)
    return TrainTiny(TrainTinyConfig())


def cfg(**kw):
    base = dict(steps=8, lr=1e-2, warmup_steps=2, log_every=1, progress=False, seed=7)
    return TrainConfig(**{**base, **kw})


def losses(history):
    return [r["loss"] for r in history.train]


def assert_same_weights(a, b):
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors this small train faster on one thread than with hand-offs on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run every resume test must reproduce exactly."""
    m = model()
    return losses(Trainer(m, get_batch, cfg(), device="cpu").fit()), m


@pytest.mark.parametrize("where", ["loss", "data"])
def test_ctrl_c_checkpoints_step_k_and_resume_is_exact(tmp_path, reference, where):
    ref_losses, ref_model = reference
    m = model()

    def batches(step):
        if where == "data" and step == 5:
            raise KeyboardInterrupt
        return get_batch(step)

    if where == "loss":
        m.interrupt_at = 6  # call 6 is step 5, interrupted after dropout drew its mask
    trainer = Trainer(m, batches, cfg(), out_dir=tmp_path, device="cpu")
    with pytest.raises(KeyboardInterrupt):  # documented: re-raised after the checkpoint is written
        trainer.fit()
    assert trainer.step == 5 and len(trainer.history.train) == 5
    assert load_state(tmp_path / "checkpoint", "train_state")["step"] == 5
    resumed = Trainer(model(seed=99), get_batch, cfg(), out_dir=tmp_path, device="cpu")
    history = resumed.fit(resume_from=tmp_path / "checkpoint")
    assert losses(history) == ref_losses
    assert [r["step"] for r in history.train] == list(range(1, 9))
    assert_same_weights(resumed.model, ref_model)


@pytest.mark.parametrize("data", ["callable", "dataloader", "list"])
def test_resume_from_mid_run_checkpoint_after_a_crash_is_exact(tmp_path, data):
    ds = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)), torch.randn(40))

    def make_batches():
        if data == "callable":
            return get_batch
        if data == "list":  # a plain iterable: fast-forwarded on resume, with a warning
            return [get_batch(s) for s in range(8)]
        return DataLoader(ds, batch_sampler=StepSampler(len(ds), 8, seed=3),
                          collate_fn=lambda s: {"x": torch.stack([a for a, _, _ in s]),
                                                "kind": torch.stack([b for _, b, _ in s]),
                                                "y": torch.stack([c for _, _, c in s])})

    ref = losses(Trainer(model(), make_batches(), cfg(), device="cpu").fit())
    crashing = model()
    crashing.interrupt_at = None
    original_loss = crashing.loss

    def loss_with_crash(batch):
        if crashing.calls == 6:
            raise RuntimeError("crash at step 6")
        return original_loss(batch)

    crashing.loss = loss_with_crash
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(crashing, make_batches(), cfg(ckpt_every=4), out_dir=tmp_path, device="cpu").fit()
    assert load_state(tmp_path / "checkpoint", "train_state")["step"] == 4  # the periodic one survives
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = Trainer(model(seed=5), make_batches(), cfg(ckpt_every=4), out_dir=tmp_path,
                          device="cpu").fit(resume_from=tmp_path / "checkpoint")
    assert losses(history) == ref
    assert any("discarding 4 batches" in str(w.message) for w in caught) == (data == "list")


def test_nan_loss_stops_with_the_step_number():
    def batches(step):
        b = get_batch(step)
        if step == 3:
            b["x"][0, 0] = float("nan")
        return b

    trainer = Trainer(model(), batches, cfg(), device="cpu")
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        trainer.fit()
    assert trainer.step == 3 and all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_no_decay_groups_norms_biases_and_embeddings():
    m = model()
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(groups["decay"]) == {id(m.fc1.weight), id(m.fc2.weight)} and groups["decay"]["weight_decay"] == 0.1
    assert ids(groups["no_decay"]) == {id(p) for p in (m.fc1.bias, m.fc2.bias, m.kind.weight, m.norm.weight,
                                                       m.norm.bias)}
    assert groups["no_decay"]["weight_decay"] == 0.0
    tied = nn.ModuleDict({"emb": nn.Embedding(5, 4), "head": nn.Linear(4, 5, bias=False)})
    tied.head.weight = tied.emb.weight  # a tied output layer stays an embedding: no decay
    assert [g["name"] for g in param_groups(tied, 0.1)] == ["no_decay"]


def test_warmup_cosine_schedule_at_known_steps():
    c = TrainConfig(steps=101, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1)  # lr / warmup_steps
    assert lr_at(9, c) == pytest.approx(1.0) and lr_at(10, c) == pytest.approx(1.0)  # end of warmup
    assert lr_at(55, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(100, c) == pytest.approx(0.1) and lr_at(500, c) == pytest.approx(0.1)  # floor at the end
    lrs = [lr_at(s, c) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    seen = Trainer(model(), get_batch, cfg(lr=0.5, warmup_steps=4), device="cpu").fit()
    assert [r["lr"] for r in seen.train] == [lr_at(s, cfg(lr=0.5, warmup_steps=4)) for s in range(8)]


@pytest.mark.parametrize("clip", [0.05, None])
def test_grad_clipping_caps_the_norm_the_optimizer_sees(clip):
    trainer = Trainer(model(), get_batch, cfg(steps=4, grad_clip=clip), device="cpu")
    seen, step = [], trainer.optimizer.step

    def spy(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    history = trainer.fit()
    raw = [r["grad_norm"] for r in history.train]
    assert min(raw) > 0.05  # clipping had work to do
    if clip is None:
        assert seen == pytest.approx(raw, rel=1e-5)
    else:
        assert max(seen) <= clip * (1 + 1e-4)


def test_history_has_train_and_eval_entries_and_round_trips(tmp_path):
    calls = []

    def eval_fn(m, step):
        calls.append((step, m.training))
        return {"loss": 1.0 / (step + 1), "acc": torch.tensor(0.5)}

    history = Trainer(model(), get_batch, cfg(steps=7, log_every=3, eval_every=3), eval_fn=eval_fn,
                      out_dir=tmp_path, device="cpu").fit()
    assert [r["step"] for r in history.train] == [3, 6, 7]  # every log_every steps, and the last
    assert {"step", "loss", "lr", "grad_norm", "mse", "samples_per_s"} <= set(history.train[0])
    assert calls == [(3, False), (6, False), (7, False)]
    assert history.eval == [{"step": s, "loss": 1.0 / (s + 1), "acc": 0.5} for s in (3, 6, 7)]
    assert History.from_json(tmp_path / "history.json") == history
    assert isinstance(load_model(tmp_path / "checkpoint"), TrainTiny)  # the checkpoint is a model folder too
    fig = history.plot()
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [3, 3]  # train loss, eval loss
    import matplotlib.pyplot as plt
    plt.close("all")


def test_optimizer_is_fused_or_foreach_and_bf16_is_opt_in_on_cpu():
    trainer = Trainer(model(), get_batch, cfg(steps=1), device="cpu")
    assert trainer.optimizer.defaults.get("fused") or trainer.optimizer.defaults.get("foreach")
    assert trainer.bf16 is False
    dtypes = []
    m = model()
    m.fc1.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    h = Trainer(m, get_batch, cfg(steps=2, bf16=True), device="cpu").fit()
    assert dtypes == [torch.bfloat16] * 2 and all(math.isfinite(r["loss"]) for r in h.train)
    assert m.fc1.weight.dtype == torch.float32  # weights and optimizer state stay fp32


def test_step_sampler_is_a_pure_function_of_seed_and_step():
    s = StepSampler(10, 3, seed=1)
    it = iter(s)
    first = [next(it) for _ in range(6)]  # 3 batches per epoch, the 10th sample dropped
    assert first == [s.indices(k) for k in range(6)]
    assert len(set(sum(first[:3], []))) == 9 and first[:3] != first[3:]
    assert next(iter(StepSampler(10, 3, seed=1, start_step=4))) == first[4]
    assert StepSampler(10, 3, seed=2).indices(0) != s.indices(0)
    with pytest.raises(ValueError, match="batch_size"):
        StepSampler(2, 3)


def test_to_device_and_input_checks():
    b = to_device({"a": [torch.ones(1), (torch.zeros(2), "txt")], "n": 3}, torch.device("cpu"))
    assert torch.equal(b["a"][0], torch.ones(1)) and b["a"][1][1] == "txt" and b["n"] == 3
    with pytest.raises(TypeError, match="loss"):
        Trainer(nn.Linear(2, 2), get_batch, cfg())
    no_config = nn.Linear(2, 2)
    no_config.loss = lambda batch: (no_config(batch).sum(), {})
    with pytest.raises(TypeError, match="dataclass `model.config`"):
        Trainer(no_config, get_batch, cfg(), out_dir="unused", device="cpu")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0)
