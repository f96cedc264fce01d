"""Every training preset, `gpu` included, builds the model its recipe trains and takes one training step.

The `cpu` and `gpu` recipes are too long for the test suite, and no GPU is here, so a typo in a
preset would only surface on a learner's machine. This file builds each recipe's model at its real
size, as `run()` does, draws a real batch (two examples) from the recipe's own data stream and
checks the loss is finite, near its chance value, and sends a gradient to every parameter.
"""
import math

import pytest
import torch

from minivl.data import world_tokenizer
from minivl.world import World

PRESETS = ("tiny", "cpu", "gpu")


def _step(model, batch) -> float:
    model.train()
    loss, logs = model.loss(batch)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return loss.item()


def test_every_recipe_has_the_same_presets_and_fields():
    from minivl import clip, lm, vit
    from minivl.recipes import clip as clip_recipe
    from minivl.recipes import lm as lm_recipe
    from minivl.recipes import vit as vit_recipe
    for recipe, models in ((vit_recipe, vit), (clip_recipe, clip), (lm_recipe, lm)):
        assert set(recipe.RECIPES) == set(models.PRESETS) == set(PRESETS), recipe.__name__
        assert len({type(r) for r in recipe.RECIPES.values()}) == 1, f"{recipe.__name__}: presets of different types"
        for p, r in recipe.RECIPES.items():
            assert r.warmup_steps < r.steps and r.lr > 0 and r.batch_size >= 1, (recipe.__name__, p)
    assert clip_recipe.RECIPES["gpu"].bf16 and vit_recipe.RECIPES["gpu"].bf16  # the GPU runs in bf16


@pytest.mark.parametrize("preset", PRESETS)
def test_vit_recipe_model_trains_one_step(preset):
    from minivl.recipes import vit as recipe
    from minivl.vit import ViTClassifier
    config = recipe.model_config(preset)
    world = World(image_size=config.image_size)
    torch.manual_seed(0)
    model = ViTClassifier(config)
    batch = recipe.make_batches(world, 2, seed=0)(0)
    assert batch["image"].shape == (2, 3, config.image_size, config.image_size)
    loss = _step(model, batch)
    assert abs(loss - math.log(config.num_classes)) < 1.0, loss  # near chance at initialisation


@pytest.mark.parametrize("preset", PRESETS)
def test_clip_recipe_model_trains_one_step(preset):
    from minivl.clip import CLIP, CLIPConfig
    from minivl.recipes import clip as recipe
    r, tokenizer = recipe.RECIPES[preset], world_tokenizer()
    config = CLIPConfig.preset(preset, pad_id=tokenizer.pad_id)
    assert config.text.vocab_size == tokenizer.vocab_size  # every preset reads the one world BPE
    world = World(image_size=config.vision.image_size)
    torch.manual_seed(0)
    model = CLIP(config)
    batch = recipe.make_batches(world, tokenizer, 2, r.single_object, config.text.context_length, 0,
                                r.positives, r.steps)(0)
    assert batch["image"].shape[-1] == config.vision.image_size
    loss = _step(model, batch)
    assert 0 < loss < math.log(2) + 2.0, loss


@pytest.mark.parametrize("preset", PRESETS)
def test_lm_recipe_model_trains_one_step(preset):
    from minivl.lm import CausalLM, LMConfig
    from minivl.recipes import lm as recipe
    tokenizer = world_tokenizer()
    config = LMConfig.preset(preset, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                             bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)  # as recipe.run builds it
    torch.manual_seed(0)
    model = CausalLM(config)
    batch = recipe.caption_batches(World(), tokenizer, 2, config.context_length, 0)(0)
    loss = _step(model, batch)
    assert abs(loss - math.log(config.vocab_size)) < 1.5, loss  # near uniform over the vocabulary
