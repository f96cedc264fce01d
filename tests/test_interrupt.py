"""Nothing lost, nothing silent: Ctrl-C lands at step boundaries, resume is bit-exact wherever it came,
a diverged run never overwrites its last good checkpoint, and the CLI resumes or refuses - never silently
overwrites an interrupted run."""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from minivl.__main__ import main
from minivl.checkpoint import checkpoints_dir, load_model, load_state
from minivl.train import Trainer, checkpoint_progress
from tests.test_train import assert_same_weights, cfg, get_batch, losses, model  # the tiny trainable model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def evals(m, step):
    return {"w": float(m.fc2.weight.sum())}  # depends on the weights: a redone eval must see the same ones


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run (with periodic evals) every interrupted run must reproduce exactly."""
    trainer = Trainer(model(), get_batch, cfg(eval_every=4), eval_fn=evals, device="cpu")
    history = trainer.fit()
    return history, trainer.model


def resume_and_compare(tmp_path, reference, step):
    """The checkpoint on disk is at `step`; resuming it from other weights gives the reference run."""
    ref_history, ref_model = reference
    assert load_state(tmp_path / "checkpoint", "train_state")["step"] == step
    resumed = Trainer(model(seed=99), get_batch, cfg(eval_every=4), eval_fn=evals, out_dir=tmp_path, device="cpu")
    history = resumed.fit(resume_from=tmp_path / "checkpoint")
    assert losses(history) == losses(ref_history) and [r["step"] for r in history.train] == list(range(1, 9))
    assert history.eval == ref_history.eval  # an eval the interrupt cut short is redone, not skipped
    assert_same_weights(resumed.model, ref_model)


def interrupt_inside_optimizer_step(monkeypatch, at: int, how: str) -> None:
    """At update `at`, interrupt from inside optimizer.step: a real SIGINT after the update (the moment
    that used to label the checkpoint with the previous step), or a KeyboardInterrupt raised by code
    just before or just after it."""
    original = torch.optim.AdamW.step

    def step(self, *args, **kw):
        n = max([int(s["step"]) for s in self.state.values()] or [0])  # updates done before this one
        if n == at and how == "raise before":
            raise KeyboardInterrupt
        out = original(self, *args, **kw)
        if n == at and how == "signal after":
            os.kill(os.getpid(), signal.SIGINT)
        if n == at and how == "raise after":
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("at", sorted(random.Random(18).sample(range(8), 3)))  # random steps, fixed by a seed
@pytest.mark.parametrize("how", ["signal after", "raise after", "raise before"])
def test_interrupt_at_the_optimizer_step_lands_on_a_step_boundary(tmp_path, reference, monkeypatch, at, how):
    before = signal.getsignal(signal.SIGINT)
    interrupt_inside_optimizer_step(monkeypatch, at, how)
    trainer = Trainer(model(), get_batch, cfg(eval_every=4), eval_fn=evals, out_dir=tmp_path, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is before  # fit restores the handler it found
    done = at if how == "raise before" else at + 1  # the update landed: it is counted, never applied twice
    assert trainer.step == done and [r["step"] for r in trainer.history.train] == list(range(1, done + 1))
    resume_and_compare(tmp_path, reference, done)


def test_a_sigint_during_the_forward_pass_finishes_the_step_first(tmp_path, reference):
    m = model()
    original = m.loss

    def loss(batch):
        if m.calls == 5:  # the 6th call: step 5
            os.kill(os.getpid(), signal.SIGINT)
        return original(batch)

    m.loss = loss
    with pytest.raises(KeyboardInterrupt):
        Trainer(m, get_batch, cfg(eval_every=4), eval_fn=evals, out_dir=tmp_path, device="cpu").fit()
    resume_and_compare(tmp_path, reference, 6)


def test_a_sigint_while_loading_data_stops_at_once_before_the_step(tmp_path, reference):
    def batches(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # outside a step: raised right here (a stuck loader stops)
        return get_batch(step)

    with pytest.raises(KeyboardInterrupt):
        Trainer(model(), batches, cfg(eval_every=4), eval_fn=evals, out_dir=tmp_path, device="cpu").fit()
    resume_and_compare(tmp_path, reference, 3)


@pytest.mark.parametrize("when", [4, 8])  # a periodic eval, the final one
def test_ctrl_c_during_an_evaluation_still_writes_the_checkpoint(tmp_path, reference, when):
    def eval_fn(m, step):
        if step == when:
            os.kill(os.getpid(), signal.SIGINT)
        return evals(m, step)

    trainer = Trainer(model(), get_batch, cfg(eval_every=4), eval_fn=eval_fn, out_dir=tmp_path, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.model.training  # the interrupted eval did not leave eval mode behind
    resume_and_compare(tmp_path, reference, when)


# ---------------------------------------------------------------------------- divergence
def all_finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters())


def test_lr_100_without_clipping_stops_naming_the_step_and_keeps_a_finite_checkpoint(tmp_path):
    trainer = Trainer(model(), get_batch, cfg(steps=200, lr=100.0, grad_clip=None, warmup_steps=0, ckpt_every=2,
                                              log_every=5), out_dir=tmp_path, device="cpu")
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        trainer.fit()
    assert trainer.step < 200
    if (tmp_path / "checkpoint").exists():
        assert all_finite(load_model(tmp_path / "checkpoint"))
        state = load_state(tmp_path / "checkpoint", "train_state")
        assert all(torch.isfinite(v).all() for s in state["optimizer"]["state"].values() for v in s.values())


def test_non_finite_weights_with_a_finite_loss_are_never_saved(tmp_path):
    def blow_up(m, step):  # what overflow does to a weight while the loss of this step still read a number
        if step == 6:
            with torch.no_grad():
                m.fc1.weight[0, 0] = math.inf

    trainer = Trainer(model(), get_batch, cfg(ckpt_every=2), out_dir=tmp_path, device="cpu", after_step=blow_up)
    with pytest.raises(FloatingPointError, match=r"diverged: after step 6 1 tensor\(s\) are not finite \(fc1.weight\)"):
        trainer.fit()
    assert load_state(tmp_path / "checkpoint", "train_state")["step"] == 4  # the last good one stays
    assert all_finite(load_model(tmp_path / "checkpoint"))


def test_an_interrupt_checkpoint_of_non_finite_weights_is_refused(tmp_path, capsys):
    def blow_up_then_interrupt(m, step):
        if step == 5:
            with torch.no_grad():
                m.fc1.weight[0, 0] = math.nan
            raise KeyboardInterrupt

    trainer = Trainer(model(), get_batch, cfg(ckpt_every=2), out_dir=tmp_path, device="cpu",
                      after_step=blow_up_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert "no checkpoint written (the last good one stays)" in capsys.readouterr().out
    assert load_state(tmp_path / "checkpoint", "train_state")["step"] == 4
    assert all_finite(load_model(tmp_path / "checkpoint"))


# ---------------------------------------------------------------------------- resuming with another config
def test_resume_with_another_config_names_the_fields_and_allows_the_harmless_ones(tmp_path):
    Trainer(model(), get_batch, cfg(), out_dir=tmp_path, device="cpu").fit()
    with pytest.raises(ValueError, match=r"lr saved 0.01, now 0.02; seed saved 7, now 8\. .*only steps, progress"):
        Trainer(model(), get_batch, cfg(lr=2e-2, seed=8), device="cpu").fit(resume_from=tmp_path / "checkpoint")
    longer = Trainer(model(), get_batch, cfg(steps=12, log_every=2, eval_every=3, ckpt_every=5), device="cpu")
    assert [r["step"] for r in longer.fit(resume_from=tmp_path / "checkpoint").train][-2:] == [10, 12]
    with pytest.raises(ValueError, match="at step 8, past this run's steps=4"):
        Trainer(model(), get_batch, cfg(steps=4), device="cpu").fit(resume_from=tmp_path / "checkpoint")


# ---------------------------------------------------------------------------- the command line
def train(tmp_path, *extra, steps=4):
    return main(["train", "lm", "--preset", "tiny", "--steps", str(steps), "--device", "cpu",
                 "--out", str(tmp_path / "run"), *extra])


def weights():
    return load_file(str(checkpoints_dir() / "lm-tiny" / "model.safetensors"))


def refused(tmp_path, capsys, *extra, steps=4) -> str:
    """The one-line error of a command the CLI refuses (exit status 2)."""
    capsys.readouterr()
    assert train(tmp_path, *extra, steps=steps) == 2
    return capsys.readouterr().err


def test_cli_resume_after_an_interrupt_is_exact_and_a_plain_rerun_is_refused(tmp_path, monkeypatch, capsys):
    assert train(tmp_path / "a") == 0
    uninterrupted = weights()
    interrupt_inside_optimizer_step(monkeypatch, 1, "signal after")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path)
    monkeypatch.undo()
    assert checkpoint_progress(tmp_path / "run" / "checkpoint") == (2, 4)
    # the same command again is refused, and says how to go on; the interrupted run is kept
    assert re.search(r"interrupted at step 2 of 4; .* --resume .* --force", refused(tmp_path, capsys))
    assert checkpoint_progress(tmp_path / "run" / "checkpoint") == (2, 4)
    assert train(tmp_path, "--resume") == 0
    assert all(torch.equal(uninterrupted[k], v) for k, v in weights().items())  # bit-exact
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps_trained"] == 2


def test_cli_resume_without_a_checkpoint_and_reruns_of_a_finished_run(tmp_path, capsys):
    assert "nothing to resume" in refused(tmp_path, capsys, "--resume")
    assert train(tmp_path) == 0
    assert train(tmp_path) == 0  # a finished run, trained again the same way: nothing is lost
    assert re.search("finished run of 4 steps, more than the 2 asked for.*--force", refused(tmp_path, capsys, steps=2))
    assert train(tmp_path, "--force", steps=2) == 0
    assert checkpoint_progress(tmp_path / "run" / "checkpoint") == (2, 2)
    assert train(tmp_path, "--resume", steps=3) == 0  # train longer
    assert checkpoint_progress(tmp_path / "run" / "checkpoint") == (3, 3)
    with pytest.raises(SystemExit):
        train(tmp_path, "--resume", "--force")  # argparse: one or the other
