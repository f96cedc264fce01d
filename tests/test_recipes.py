"""The recipe scaffold: presets as data, the shared batch-stream and evaluation helpers,
`load_or_train` (train once, then load; fast mode never loads), and the CLI that finds recipes."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import minivl
from minivl import recipes
from minivl.recipes import Recipe, choose, color_shape_accuracy, load_or_train, stream_indices, tokenize_batch
from minivl.world import World


def test_recipe_is_validated_data():
    r = Recipe(steps=10, batch_size=4, lr=1e-3, warmup_steps=2, weight_decay=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.steps = 3  # a preset is data: change it with choose/replace, never in place
    for bad in (dict(steps=0), dict(batch_size=True), dict(warmup_steps=10), dict(lr=0.0), dict(weight_decay=-1)):
        with pytest.raises(ValueError):
            Recipe(**{**dataclasses.asdict(r), **bad})
    assert choose({"x": r}, "Toy", "x", steps=5) == dataclasses.replace(r, steps=5, warmup_steps=1)
    assert choose({"x": r}, "Toy", "x") is r
    with pytest.raises(ValueError, match="unknown Toy preset 'y'"):
        choose({"x": r}, "Toy", "y")
    with pytest.raises(ValueError, match="positive int"):
        choose({"x": r}, "Toy", "x", steps=-1)


def test_stream_indices_are_fresh_and_disjoint_across_steps_and_seeds():
    a, b = stream_indices(0, 0, 8), stream_indices(0, 1, 8)
    assert list(a) == list(range(8)) and list(b) == list(range(8, 16))
    assert not set(stream_indices(1, 0, 8)) & set(stream_indices(0, 10**6, 8))


def test_color_shape_accuracy_splits_the_two_halves_of_a_class():
    world = World()
    red_circle, red_square, blue_circle = (world.classes.index(n) for n in ("red circle", "red square", "blue circle"))
    got = color_shape_accuracy(world, [red_circle] * 4, [red_circle, red_square, blue_circle, red_square])
    assert got == {"color": 0.75, "shape": 0.5}
    with pytest.raises(ValueError, match="as many guesses"):
        color_shape_accuracy(world, [red_circle], [])


def test_tokenize_batch_pads_to_the_longest_and_cuts_at_the_context():
    from minivl.data import world_tokenizer
    tok = world_tokenizer()
    enc = tokenize_batch(tok, ["a red circle", "a large blue square and a small green triangle"], 40)
    assert enc["input_ids"].shape[1] == enc["attention_mask"].sum(1).max() < 40
    cut = tokenize_batch(tok, ["a large blue square and a small green triangle"], 5)
    assert cut["input_ids"].shape == (1, 5) and cut["input_ids"][0, -1] == tok.eos_id


def test_metrics_are_written_atomically_with_dataclasses_as_dicts(tmp_path):
    r = Recipe(steps=10, batch_size=4, lr=1e-3, warmup_steps=2, weight_decay=0.1)
    path = recipes.write_metrics(tmp_path, {"recipe": r, "acc": 0.5})
    assert json.loads(path.read_text()) == {"recipe": dataclasses.asdict(r), "acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_every_recipe_module_is_a_cli_target_with_the_shared_interface():
    from minivl.__main__ import modules
    assert recipes.families() == modules("recipes")
    assert {"clip", "vit", "lm"} <= set(recipes.families())
    assert {"clip", "vit", "metrics", "data"} <= set(modules("bench"))
    for family in recipes.families():
        module = __import__(f"minivl.recipes.{family}", fromlist=["run"])
        for name in ("RECIPES", "FAST_STEPS", "run", "summary", "main"):
            assert hasattr(module, name), f"recipes/{family}.py has no {name}"
        assert all(isinstance(r, Recipe) for r in module.RECIPES.values()), family
    out = subprocess.run([sys.executable, "-m", "minivl", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert all(f in out for f in recipes.families())


def test_load_or_train_trains_once_then_loads(monkeypatch, capsys):
    monkeypatch.setenv("MINIVL_FAST", "0")
    first = load_or_train("vit", "tiny", steps=2)
    assert first.trained and (first.checkpoint / "config.json").is_file() and first.metrics["steps"] == 2
    second = load_or_train("vit", "tiny", steps=2)
    assert not second.trained and second.metrics == json.loads((first.run_dir / "metrics.json").read_text())
    x = torch.zeros(1, 3, 32, 32)
    torch.testing.assert_close(second.model(x), first.model(x))
    assert not second.model.training
    # a checkpoint from another version of Shapes World is trained again, with a note
    stale = {**second.metrics, "world_version": "0.0"}
    (first.run_dir / "metrics.json").write_text(json.dumps(stale))
    assert load_or_train("vit", "tiny", steps=2).trained
    assert "trained on Shapes World 0.0" in capsys.readouterr().out
    assert load_or_train("vit", "tiny", steps=2, retrain=True).trained


def test_load_or_train_in_fast_mode_always_trains_the_tiny_preset(monkeypatch):
    monkeypatch.setenv("MINIVL_FAST", "1")
    a = load_or_train("lm", samples=2)
    assert a.trained and a.checkpoint.name == "lm-tiny" and a.metrics["steps"] == recipes.lm.FAST_STEPS
    assert a.model.tokenizer.vocab_size == a.model.config.vocab_size  # saved with the weights, attached on load
    assert load_or_train("lm", samples=2).trained  # never a stale or full-size checkpoint in fast mode
    with pytest.raises(ValueError, match="fast mode .* tiny preset only"):
        load_or_train("lm", "cpu")
    with pytest.raises(ValueError, match="unknown family 'gan'"):
        load_or_train("gan")
    assert minivl.data_dir().name == "data"



def test_fit_passes_parameter_groups_to_the_trainer(tmp_path):
    from minivl.vit import ViTClassifier, ViTConfig
    torch.manual_seed(0)
    model = ViTClassifier(ViTConfig.preset("tiny", num_classes=4))
    tower, head = model.vit.patch_embed.weight.detach().clone(), model.head.weight.detach().clone()
    S = model.config.image_size
    batch = {"image": torch.rand(8, 3, S, S) * 2 - 1, "label": torch.arange(8) % 4}
    recipe = Recipe(steps=3, batch_size=8, lr=1e-2, warmup_steps=0, weight_decay=0.0)
    trainer, _, _ = recipes.fit(model, lambda step: batch, recipe, seed=0, progress=False, bf16=False,
                                device="cpu", run_dir=tmp_path / "run", freeze=("vit",), lr_scale={"head": 0.5})
    assert torch.equal(model.vit.patch_embed.weight, tower) and not torch.equal(model.head.weight, head)
    assert trainer.config.freeze == ("vit",) and trainer.config.lr_scale == {"head": 0.5}
    with pytest.raises(TypeError, match="parameter-group options"):
        recipes.train_config(recipe, 0, False, lr_scales={"head": 0.5})
