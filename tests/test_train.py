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

    def mse(self, batch):
        h = self.drop(torch.relu(self.norm(self.fc1(batch["x"]) + self.kind(batch["kind"]))))  # (B, D)
        return F.mse_loss(self.fc2(h).squeeze(-1), batch["y"])

    def loss(self, batch):
        loss = self.mse(batch)
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


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


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


# ---------------------------------------------------------------------------- parameter groups and freezing
def test_frozen_modules_do_not_move_and_have_no_optimizer_state():
    trainer = Trainer(model(), get_batch, cfg(freeze=("fc1", "kind")), device="cpu")
    m = trainer.model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainer.fit()
    assert trainer.frozen == ["fc1.weight", "fc1.bias", "kind.weight"]
    assert not any(p.requires_grad for p in (*m.fc1.parameters(), m.kind.weight))
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in (m.norm.weight, m.norm.bias, m.fc2.weight, m.fc2.bias)}
    assert len(trainer.optimizer.state) == 4  # Adam moments for the trained tensors only
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]) == k.startswith(("fc1", "kind")), k


def test_lr_scale_sets_each_groups_lr_and_equals_the_scale_applied_by_hand():
    # fc2 at 10x the others, written two ways: lr 1e-3 with fc2 x10, or lr 1e-2 with the rest x0.1
    a = Trainer(model(), get_batch, cfg(lr=1e-3, lr_scale={"fc2": 10}), device="cpu")
    b = Trainer(model(), get_batch, cfg(lr=1e-2, lr_scale={"fc1": 0.1, "kind": 0.1, "norm": 0.1}), device="cpu")
    a.fit(), b.fit()
    assert [g["name"] for g in a.optimizer.param_groups] == ["decay", "no_decay", "fc2/decay", "fc2/no_decay"]
    c = cfg(lr=1e-3)
    assert [g["lr"] for g in a.optimizer.param_groups] == pytest.approx([lr_at(7, c)] * 2 + [10 * lr_at(7, c)] * 2)
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)
    # a scale of 0 holds a group still while the others learn
    z = Trainer(model(), get_batch, cfg(lr_scale={"norm": 0.0}), device="cpu")
    z.fit()
    fresh = model()
    assert torch.equal(z.model.norm.weight, fresh.norm.weight) and not torch.equal(z.model.fc1.weight, fresh.fc1.weight)


def test_longest_prefix_wins_and_a_later_trainer_unfreezes_what_an_earlier_one_froze():
    m = model()
    t = Trainer(m, get_batch, cfg(steps=1, freeze=("fc1",), lr_scale={"fc1.bias": 2.0}), device="cpu")
    assert t.frozen == ["fc1.weight"] and m.fc1.bias.requires_grad  # the longer lr_scale prefix trains it
    m.fc2.bias.requires_grad_(False)  # frozen by hand: no Trainer touches it
    Trainer(m, get_batch, cfg(steps=1), device="cpu")  # stage 2 (LLaVA: projector + LM) trains fc1 again
    assert m.fc1.weight.requires_grad and not m.fc2.bias.requires_grad


def test_bad_prefixes_and_group_settings_raise():
    with pytest.raises(ValueError, match=r"freeze prefix 'fc' matches no parameter.*\['fc1', 'kind', 'norm', 'fc2'\]"):
        Trainer(model(), get_batch, cfg(freeze=("fc",)), device="cpu")  # prefixes are whole names: fc != fc1
    with pytest.raises(ValueError, match="lr_scale prefix 'visual'"):
        Trainer(model(), get_batch, cfg(lr_scale={"visual": 0.1}), device="cpu")
    with pytest.raises(ValueError, match="no trainable parameter"):
        Trainer(model(), get_batch, cfg(freeze=("fc1", "kind", "norm", "fc2")), device="cpu")
    with pytest.raises(TypeError, match="tuple of parameter-name prefixes"):
        TrainConfig(freeze="fc1")  # a bare string would freeze "f" and "c"
    with pytest.raises(ValueError, match="finite number >= 0"):
        TrainConfig(lr_scale={"fc1": -1})
    with pytest.raises(ValueError, match="both frozen and given an lr_scale"):
        TrainConfig(freeze=("fc1",), lr_scale={"fc1": 2.0})
    with pytest.raises(ValueError, match="accumulation_steps"):
        TrainConfig(accumulation_steps=0)


def test_resume_with_groups_is_exact_and_a_different_grouping_is_refused(tmp_path):
    groups = dict(freeze=("kind",), lr_scale={"fc2": 3.0})
    m = model()
    ref = losses(Trainer(m, get_batch, cfg(**groups), device="cpu").fit())
    crashing = model()
    crashing.interrupt_at = 6
    with pytest.raises(KeyboardInterrupt):
        Trainer(crashing, get_batch, cfg(**groups), out_dir=tmp_path, device="cpu").fit()
    resumed = Trainer(model(seed=3), get_batch, cfg(**groups), device="cpu")
    assert losses(resumed.fit(resume_from=tmp_path / "checkpoint")) == ref
    assert_same_weights(resumed.model, m)
    with pytest.raises(ValueError, match=r"another TrainConfig: freeze saved \(.kind.,\), now \(\); lr_scale"):
        Trainer(model(), get_batch, cfg(), device="cpu").fit(resume_from=tmp_path / "checkpoint")


# ---------------------------------------------------------------------------- accumulation and batch splitting
@pytest.mark.parametrize("micro", [2, 3])  # 8 rows as 4 + 4, and unevenly as 3 + 3 + 2
def test_accumulated_micro_batches_equal_one_step_on_the_whole_batch(micro):
    def no_dropout():
        torch.manual_seed(0)
        return TrainTiny(TrainTinyConfig(dropout=0.0))

    whole = Trainer(no_dropout(), get_batch, cfg(steps=4), device="cpu")
    split = Trainer(no_dropout(), get_batch, cfg(steps=4, accumulation_steps=micro), device="cpu")
    calls = []
    split.model.fc1.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))  # rows per forward
    h1, h2 = whole.fit(), split.fit()
    assert calls == ([4, 4] if micro == 2 else [3, 3, 2]) * 4
    for (k, p), q in zip(whole.model.state_dict().items(), split.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)
    assert losses(h2) == pytest.approx(losses(h1), rel=1e-5)  # the logged loss is the whole batch's mean
    with pytest.raises(ValueError, match="2 rows cannot make 1 process share"):
        Trainer(no_dropout(), lambda s: get_batch(s, n=2), cfg(accumulation_steps=3), device="cpu").fit()


def test_split_batch_cuts_rows_and_shares_the_rest():
    from collections import namedtuple

    from minivl.distributed import split_batch
    Pair = namedtuple("Pair", "a b")
    batch = {"x": torch.arange(10).reshape(5, 2), "caps": list("abcde"), "pair": Pair(torch.arange(5), 7),
             "fields": [torch.zeros(5), torch.ones(5, 3)], "t": torch.tensor(2.0), "name": "demo",
             "boxes": [torch.zeros(i, 4) for i in range(5)]}
    first, second = split_batch(batch, 2)
    assert first["x"].tolist() == [[0, 1], [2, 3], [4, 5]] and second["caps"] == ["d", "e"]
    assert second["pair"].a.tolist() == [3, 4] and second["pair"].b == 7 and isinstance(second["pair"], Pair)
    assert [f.shape[0] for f in second["fields"]] == [2, 2]  # a collated [x, y] list: fields, not rows
    assert [b.shape[0] for b in second["boxes"]] == [3, 4]  # one tensor per image: rows
    assert second["t"] is batch["t"] and second["name"] == "demo"
    with pytest.raises(ValueError, match=r"batch\['mask'\] has shape \(4, 4\), but the batch has 5 rows"):
        split_batch({"x": torch.zeros(5), "mask": torch.zeros(4, 4)}, 2)


def test_a_models_own_split_batch_is_used():
    m = model()
    seen = []

    def split_batch(batch, n):
        seen.append(n)
        return [{k: v[i::n] for k, v in batch.items()} for i in range(n)]  # strided, for the test

    m.split_batch = split_batch
    Trainer(m, get_batch, cfg(steps=2, accumulation_steps=2), device="cpu").fit()
    assert seen == [2, 2]


# ---------------------------------------------------------------------------- hooks, logs and host syncs
def test_after_step_hooks_run_after_every_update_model_first():
    m = model()
    order = []
    m.after_step = lambda: order.append(("model", m.fc1.weight.grad is not None))
    Trainer(m, get_batch, cfg(steps=3), device="cpu", after_step=lambda mod, step: order.append((mod is m, step))).fit()
    assert order == [("model", True), (True, 1), ("model", True), (True, 2), ("model", True), (True, 3)]
    with pytest.raises(TypeError, match="after_step"):
        Trainer(model(), get_batch, cfg(), device="cpu", after_step="clamp")


def test_clip_clamps_its_temperature_after_the_step_not_in_the_loss():
    from minivl.clip import CLIP, CLIPConfig
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig.preset("tiny"))
    images = torch.randn(4, 3, 32, 32)
    batch = {"image": images, "input_ids": torch.randint(0, 400, (4, 12))}
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1000.0))
    loss, logs = clip.loss(batch)
    assert clip.logit_scale.item() == pytest.approx(math.log(1000.0))  # the loss only reads its parameters
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in logs.values())
    assert logs["logit_scale"].item() == pytest.approx(100.0)  # scale() caps what the loss uses
    # texts embedded as their own images: sharper logits lower the loss, so a big lr pushes the scale up
    clip.encode_text = lambda text: clip.encode_image(images)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(50.0))
    seen = []
    towers = ("visual", "text", "visual_projection", "text_projection")
    trainer = Trainer(clip, lambda s: batch, cfg(steps=1, lr=10.0, warmup_steps=0, grad_clip=None, freeze=towers),
                      device="cpu", after_step=lambda mod, step: seen.append(mod.logit_scale.item()))
    assert [g["params"] for g in trainer.optimizer.param_groups] == [[clip.logit_scale]]
    grad = []
    clip.logit_scale.register_hook(grad.append)
    trainer.fit()
    assert grad[0].item() < 0  # the update went up by lr = 10, far past ln(100)
    assert clip.logit_scale.item() == pytest.approx(math.log(100.0)) and seen == [clip.logit_scale.item()]


class TensorLogs(TrainTiny):
    """Logs as tensors, as models should return them (the trainer reads them once per window)."""

    def loss(self, batch):
        loss = self.mse(batch)
        return loss, {"mse": loss.detach(), "half": torch.tensor([0.5])}


def test_tensor_logs_are_read_once_per_window_and_averaged(monkeypatch):
    reads = []  # every way a tensor's value reaches the host (a device sync on a GPU)
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _f=original, _n=name: reads.append(_n) or _f(t, *a))
    history = Trainer(TensorLogs(TrainTinyConfig()), get_batch, cfg(steps=8, log_every=4), device="cpu").fit()
    monkeypatch.undo()
    assert reads == ["tolist", "tolist"]  # one read per window (the old loop read ~4 numbers per step)
    assert [r["step"] for r in history.train] == [4, 8] and all(r["half"] == 0.5 for r in history.train)
    assert all(type(v) is float for r in history.train for v in r.values() if v is not r["step"])
    bad = TrainTiny(TrainTinyConfig())
    bad.loss = lambda batch: (bad.fc2.weight.sum(), {"acc": torch.ones(3)})
    with pytest.raises(TypeError, match="log 'acc' must be a number or a one-element tensor"):
        Trainer(bad, get_batch, cfg(), device="cpu").fit()


def test_nan_inside_a_window_is_named_and_no_checkpoint_holds_it(tmp_path):
    def batches(step):
        b = get_batch(step)
        if step == 5:
            b["x"][0, 0] = float("nan")
        return b

    trainer = Trainer(model(), batches, cfg(log_every=10, ckpt_every=4), out_dir=tmp_path, device="cpu")
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5 .*updates 5\.\.6 used it"):
        trainer.fit()  # found at step 7, the window's end (the last step), before its update
    assert trainer.step == 7 and len(trainer.history.train) == 0
    assert load_state(tmp_path / "checkpoint", "train_state")["step"] == 4  # the periodic one, all finite
    checkpoint = load_model(tmp_path / "checkpoint")
    assert all(torch.isfinite(p).all() for p in checkpoint.parameters())


def test_autocast_is_public_and_bf16_only_when_asked():
    with Trainer(model(), get_batch, cfg(bf16=True), device="cpu").autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with Trainer(model(), get_batch, cfg(), device="cpu").autocast():  # bf16=None: on for CUDA only
        assert not torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------------------- progress without a terminal
def test_progress_bar_prints_plain_lines_when_not_a_terminal():
    import io

    from minivl.train import LineProgress, progress_bar
    out = io.StringIO()  # a log file, CI or a notebook: isatty() is False
    bar = progress_bar(100, desc="train", file=out)
    assert isinstance(bar, LineProgress)
    for i in range(100):
        bar.update()
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in out.getvalue()  # every 5%, not every step
    assert lines[0].startswith("train: 5/100 (5%) | loss 0.2500 |") and "it/s" in lines[-1]
    assert lines[-1].startswith("train: 100/100 (100%)")
    out = io.StringIO()
    with progress_bar(7, file=out, seconds=0.0) as bar:  # seconds=0: a line per update
        for _ in range(7):
            bar.update()
    assert len(out.getvalue().splitlines()) == 7

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = progress_bar(10, file=term)
    bar.update(10)
    bar.close()
    assert not isinstance(bar, LineProgress) and "\r" in term.getvalue()  # tqdm's redraws


def test_training_without_a_terminal_logs_a_line_every_few_percent(capsys):
    Trainer(model(), get_batch, cfg(steps=40, progress=True), device="cpu").fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train:")]
    assert len(lines) == 20 and lines[-1].startswith("train: 40/40 (100%) | loss ")


def test_workers_draw_the_same_batches_so_the_run_and_its_resume_are_the_same(tmp_path, reference):
    """TrainConfig.workers: batches drawn ahead in processes are get_batch(step)'s own (minivl.prefetch)."""
    ref_losses, ref_model = reference
    m = model()
    assert losses(Trainer(m, get_batch, cfg(workers=2), device="cpu").fit()) == ref_losses
    assert_same_weights(m, ref_model)
    def batches(step):  # Ctrl-C before step 5 with no workers, then resumed with two
        if step == 5:
            raise KeyboardInterrupt
        return get_batch(step)

    with pytest.raises(KeyboardInterrupt):
        Trainer(model(), batches, cfg(), out_dir=tmp_path, device="cpu").fit()
    resumed = Trainer(model(seed=99), get_batch, cfg(workers=2), out_dir=tmp_path, device="cpu")
    history = resumed.fit(resume_from=tmp_path / "checkpoint")
    assert losses(history) == ref_losses
    assert_same_weights(resumed.model, ref_model)


def test_prefetch_gives_each_steps_batch_in_order_and_out_of_order():
    from minivl.prefetch import Prefetch
    fetch = Prefetch(get_batch, 2, 9, workers=2)
    try:
        for step in (2, 3, 3, 4, 7, 8, 8, 5):  # a redone step, a jump ahead, the last step, a jump back
            rng = torch.get_rng_state()
            got = fetch(step)
            assert torch.equal(torch.get_rng_state(), rng), step  # restarting the workers leaves dropout's RNG be
            want = get_batch(step)
            assert all(torch.equal(got[k], want[k]) for k in want), step
    finally:
        fetch.close()
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        Prefetch(get_batch, 0, 4, workers=0)
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        cfg(workers=-1)
