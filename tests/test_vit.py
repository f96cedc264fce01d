"""The ViT is checked for shapes, for the two facts its design rests on (a strided conv is a linear
map per patch; without position embeddings patches are a *set*), for learning (gradients reach the
pixels' projection, a classifier memorises a batch), for its input checks and its attention maps."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from minivl.vit import ViTClassifier, ViTConfig, VisionTransformer


def _vit(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig.preset("tiny", **overrides)).eval()


def _images(B=3, size=32, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, size, size, generator=g) * 2 - 1  # in [-1, 1] like image_to_tensor


def test_output_shapes():
    vit = _vit()
    c = vit.config
    N = c.grid**2
    out = vit(_images(), need_weights=True, output_hidden_states=True)
    assert out.tokens.shape == (3, 1 + N, c.width)
    assert out.pooled.shape == (3, c.width)
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])  # the class token summarises
    assert len(out.hidden_states) == c.depth + 1
    assert all(h.shape == (3, 1 + N, c.width) for h in out.hidden_states)
    assert len(out.attentions) == c.depth
    assert all(a.shape == (3, c.heads, 1 + N, 1 + N) for a in out.attentions)
    plain = vit(_images())
    assert plain.attentions is None and plain.hidden_states is None


def test_fast_path_equals_explicit_attention_path():
    vit = _vit()
    x = _images()
    torch.testing.assert_close(vit(x).tokens, vit(x, need_weights=True).tokens, atol=1e-5, rtol=1e-5)


def test_images_are_processed_independently():
    vit = _vit()
    x = _images(B=4)
    torch.testing.assert_close(vit(x).pooled[1:3], vit(x[1:3]).pooled, atol=1e-5, rtol=1e-5)


def test_patch_embedding_is_a_linear_map_of_flattened_patches():
    vit = _vit()
    P = vit.config.patch_size
    x = _images(B=2)
    patches = rearrange(x, "b c (gh p) (gw q) -> b (gh gw) (c p q)", p=P, q=P)  # (B, N, 3*P*P)
    weight = rearrange(vit.patch_embed.weight, "d c p q -> d (c p q)")  # (D, 3*P*P)
    by_hand = patches @ weight.T  # (B, N, D)
    by_conv = rearrange(vit.patch_embed(x), "b d gh gw -> b (gh gw) d")
    torch.testing.assert_close(by_conv, by_hand, atol=1e-5, rtol=1e-5)


def _shuffle_patches(x: torch.Tensor, P: int, perm: torch.Tensor) -> torch.Tensor:
    g = x.shape[-1] // P
    patches = rearrange(x, "b c (gh p) (gw q) -> b (gh gw) c p q", p=P, q=P)
    return rearrange(patches[:, perm], "b (gh gw) c p q -> b c (gh p) (gw q)", gh=g)


def test_position_embeddings_are_the_only_source_of_patch_order():
    vit = _vit()
    P, N = vit.config.patch_size, vit.config.grid**2
    x = _images(B=2)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    shuffled = _shuffle_patches(x, P, perm)
    assert not torch.allclose(shuffled, x)
    # with learned positions, shuffling the patches changes what the class token sees ...
    assert not torch.allclose(vit(x).pooled, vit(shuffled).pooled, atol=1e-4)
    # ... without them the ViT sees a bag of patches: the class token is permutation-invariant
    with torch.no_grad():
        vit.pos_embed.zero_()
    torch.testing.assert_close(vit(x).pooled, vit(shuffled).pooled, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_patch_embedding():
    model = ViTClassifier(ViTConfig.preset("tiny", num_classes=5))
    nn_head = model.head
    with torch.no_grad():  # a zero head would block the gradient to the encoder on step one
        nn_head.weight.normal_(std=0.1)
    batch = {"image": _images(B=4), "label": torch.tensor([0, 1, 2, 3])}
    loss, logs = model.loss(batch)
    loss.backward()
    for name in ("vit.patch_embed.weight", "vit.cls_token", "vit.pos_embed"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert isinstance(logs["acc"], torch.Tensor) and logs["acc"].dim() == 0  # a tensor: no host sync per step
    assert 0.0 <= logs["acc"].item() <= 1.0


def test_classifier_starts_uniform_and_overfits_one_batch():
    torch.manual_seed(0)
    K = 4
    model = ViTClassifier(ViTConfig.preset("tiny", num_classes=K))
    batch = {"image": _images(B=8), "label": torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])}
    loss0, _ = model.loss(batch)
    assert abs(loss0.item() - torch.log(torch.tensor(float(K))).item()) < 1e-4  # zero-init head
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, logs = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 and logs["acc"].item() == 1.0
    assert model(batch["image"]).shape == (8, K)


def test_classifier_needs_classes():
    with pytest.raises(ValueError, match="num_classes"):
        ViTClassifier(ViTConfig.preset("tiny"))


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "float"),
    (torch.zeros(2, 1, 32, 32), ValueError, r"\(B, 3, 32, 32\)"),
    (torch.zeros(2, 3, 64, 64), ValueError, r"got \(2, 3, 64, 64\)"),
    (torch.zeros(3, 32, 32), ValueError, r"\(B, 3, 32, 32\)"),
    (torch.zeros(2, 32, 32, 3), ValueError, r"got \(2, 32, 32, 3\)"),  # channels-last numpy layout
    (__import__("numpy").zeros((2, 3, 32, 32), "float32"), TypeError, "torch.Tensor"),
])
def test_bad_images_raise_clear_errors(bad, error, match):
    vit = _vit()
    with pytest.raises(error, match=match):
        vit(bad)
    with pytest.raises(error, match=match):
        vit.attention_maps(bad)


def test_config_checks_patch_size_and_preset_name():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="unknown ViT preset"):
        ViTConfig.preset("huge")
    assert ViTConfig.preset("cpu").grid == 8
    assert ViTConfig.preset("tiny", width=64).width == 64


def test_hidden_state_runs_only_the_blocks_before_it():
    vit = _vit()
    x = _images(B=2)
    states = vit(x, output_hidden_states=True).hidden_states
    depth = vit.config.depth
    for layer in range(-depth - 1, depth + 1):
        torch.testing.assert_close(vit.hidden_state(x, layer), states[layer])
    for bad in (depth + 1, -depth - 2, 1.0, True):
        with pytest.raises(ValueError, match="layer must be an int"):
            vit.hidden_state(x, bad)


def test_attention_maps_are_the_class_token_row():
    vit = _vit()
    c = vit.config
    x = _images(B=2)
    maps = vit.attention_maps(x)
    assert maps.shape == (2, c.depth, c.grid, c.grid)
    weights = torch.stack(vit(x, need_weights=True).attentions, 1).mean(2)  # (B, L, 1+N, 1+N)
    # the map is the class token's attention to the patches; with its attention to itself, a distribution
    torch.testing.assert_close(maps.flatten(2).sum(-1) + weights[:, :, 0, 0], torch.ones(2, c.depth))
    assert (maps >= 0).all()


def test_attention_rollout_equals_product_of_residual_attention():
    vit = _vit(depth=3)
    c = vit.config
    x = _images(B=2)
    rolled = vit.attention_maps(x, rollout=True)
    assert rolled.shape == (2, c.depth, c.grid, c.grid)
    weights = torch.stack(vit(x, need_weights=True).attentions, 1).mean(2)  # (B, L, 1+N, 1+N)
    eye = torch.eye(weights.shape[-1])
    joint = eye.expand_as(weights[:, 0])
    for layer in range(c.depth):
        joint = (0.5 * weights[:, layer] + 0.5 * eye) @ joint  # residual: half attention, half identity
        torch.testing.assert_close(joint.sum(-1), torch.ones_like(joint[..., 0]))  # rows stay distributions
        torch.testing.assert_close(rolled[:, layer].flatten(1), joint[:, 0, 1:], atol=1e-5, rtol=1e-5)
    # rollout keeps some mass on the class token itself, so the patch map sums to less than one
    assert (rolled.flatten(2).sum(-1) < 1).all() and (rolled >= 0).all()


def test_classifier_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = ViTClassifier(ViTConfig.preset("tiny", num_classes=3)).eval()
    with torch.no_grad():
        model.head.weight.normal_()
    model.save(tmp_path / "vit")
    loaded = ViTClassifier.load(tmp_path / "vit").eval()
    assert loaded.config == model.config
    x = _images(B=2)
    torch.testing.assert_close(loaded(x), model(x))
    assert F.softmax(loaded(x), -1).shape == (2, 3)


def test_input_normalisation_is_a_per_channel_standardisation():
    # a ViT with image_mean/std equals the identity-config ViT fed (x - mean) / std by hand
    mean, std = (-0.6, -0.5, 0.1), (0.3, 0.25, 2.0)
    plain, normed = _vit(), _vit(image_mean=mean, image_std=std)
    normed.load_state_dict(plain.state_dict())
    x = _images()
    by_hand = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x).tokens, plain(by_hand).tokens)
        assert not torch.allclose(normed(x).tokens, plain(x).tokens)  # the statistics are used
    assert ViTConfig().image_mean == (0.0, 0.0, 0.0) and ViTConfig().image_std == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="std > 0"):
        ViTConfig(image_std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3 values each"):
        ViTConfig(image_mean=(0.0, 0.0))


def test_normalised_classifier_checkpoint_keeps_its_statistics(tmp_path):
    torch.manual_seed(0)
    model = ViTClassifier(ViTConfig.preset("tiny", num_classes=3, image_mean=(-0.7,) * 3, image_std=(0.2,) * 3))
    model.save(tmp_path / "vit")
    loaded = ViTClassifier.load(tmp_path / "vit").eval()
    assert loaded.config.image_mean == (-0.7,) * 3 and loaded.config == model.config  # JSON lists -> tuples
    x = _images(B=2)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_recipe_pixel_stats_match_the_training_images():
    from minivl.recipes import vit as recipe
    from minivl.world import World
    world = World(image_size=32)
    mean, std = recipe.pixel_stats(world)
    assert all(-1 < m < -0.3 for m in mean), mean  # a dark background with one small bright object
    assert all(0.05 < s < 1 for s in std), std
    config = recipe.model_config("tiny", world)
    assert config.image_mean == mean and config.image_std == std and config.num_classes == len(world.classes)


# ---- the recipe (python -m minivl train vit) and the bench (python -m minivl bench vit) ----

def test_recipe_tiny_run_writes_checkpoint_and_run_folder(tmp_path):
    import json

    import minivl
    from minivl.recipes import vit as recipe
    result = recipe.run("tiny", steps=4, out=tmp_path / "run", progress=False)
    for name in ("metrics.json", "history.json", "loss.png", "confusion.png", "attention.png"):
        assert (tmp_path / "run" / name).is_file(), name
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["steps"] == 4 and saved["preset"] == "tiny" and saved["seen_classes"] == 30
    for key in ("test_top1", "test_top5", "test_color_acc", "test_shape_acc", "heldout_color_acc"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved["test_top5"] >= saved["test_top1"]
    ckpt = minivl.data_dir() / "checkpoints" / "vit-tiny"  # conftest points data_dir at a temp folder
    assert saved["checkpoint"] == str(ckpt)
    model = ViTClassifier.load(ckpt)
    assert model.config.num_classes == 35 and model.config.image_size == 32
    assert "test top-1" in recipe.summary(result)


def test_recipe_rejects_bad_arguments():
    from minivl.recipes import vit as recipe
    with pytest.raises(ValueError, match="unknown ViT preset"):
        recipe.run("huge")
    with pytest.raises(ValueError, match="positive int"):
        recipe.run("tiny", steps=0)


def test_recipe_batches_are_fresh_single_objects_without_heldout_pairs():
    from minivl.recipes.vit import make_batches
    from minivl.world import World
    world = World(image_size=32)
    get_batch = make_batches(world, batch_size=16, seed=0)
    a, b = get_batch(0), get_batch(1)
    assert a["image"].shape == (16, 3, 32, 32) and a["label"].shape == (16,)
    assert torch.equal(get_batch(0)["image"], a["image"])  # a pure function of the step
    assert not torch.equal(a["image"], b["image"])
    heldout = {world.classes.index(f"{c} {s}") for c, s in world.heldout}
    labels = torch.cat([get_batch(s)["label"] for s in range(10)])
    assert not set(labels.tolist()) & heldout


def test_timing_helper_interleaves_and_reports_medians():
    from minivl.bench import time_fn, time_many
    calls = []
    res = time_many({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, items=8, warmup=1, iters=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warmup each, then interleaved rounds
    for r in res.values():
        assert len(r["times"]) == 3 and r["median_s"] == sorted(r["times"])[1]
        assert r["items_per_s"] == pytest.approx(8 / r["median_s"])
    assert time_fn(lambda: None, iters=1, warmup=0)["median_s"] >= 0
    with pytest.raises(ValueError, match="iters >= 1"):
        time_fn(lambda: None, iters=0)
    with pytest.raises(TypeError, match="callable"):
        time_many({"x": 3})


def test_bench_vit_runs_on_a_tiny_model():
    from minivl.bench.vit import bench
    result = bench("tiny", batch_size=4, iters=1, warmup=0, reference=False)
    assert set(result) == {"minivl"} and result["minivl"] > 0


def test_bench_reference_has_the_same_size():
    pytest.importorskip("transformers")
    from minivl.bench.vit import HFViTClassifier
    config = ViTConfig.preset("tiny", num_classes=7)
    ours, ref = ViTClassifier(config), HFViTClassifier(config)
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    # same blocks and head; CLIP's layout adds ln_pre (2D) and drops the patch bias (D)
    assert n_ours - n_ref == config.width
    assert ref.vit.config._attn_implementation == "sdpa"
    assert ref(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_pooled_class_token_of_the_stack_equals_the_full_forward():
    vit = _vit(depth=3)
    x = vit.ln_pre(vit.embed(_images(B=3)))  # (B, 1 + N, D)
    pooled = vit.transformer(x, pool_index=0).last_hidden_state  # (B, D): the last block for the class token only
    torch.testing.assert_close(vit.ln_post(pooled), vit(_images(B=3)).pooled, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- validation where data enters
def test_float64_and_float16_images_are_cast_to_the_weights_dtype():
    vit, x = _vit(), _images()
    with torch.no_grad():
        torch.testing.assert_close(vit(x.double()).pooled, vit(x).pooled)
        assert vit(x.half()).pooled.dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    (torch.full((2, 3, 32, 32), float("nan")), "NaN or inf"),
    (torch.rand(2, 3, 32, 32) * 255, "0..255"),  # a forgotten normalisation: confident garbage otherwise
    (torch.zeros(0, 3, 32, 32), "empty"),
])
def test_bad_image_values_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        _vit()(bad)


def test_classifier_labels_are_checked():
    torch.manual_seed(0)
    clf = ViTClassifier(ViTConfig.preset("tiny", num_classes=3))
    x = _images(2)
    with pytest.raises(ValueError, match=r"batch\['label'\] must lie in \[0, 2\]"):
        clf.loss({"image": x, "label": torch.tensor([0, 3])})
    with pytest.raises(TypeError, match="integer"):
        clf.loss({"image": x, "label": torch.tensor([0.0, 1.0])})
    loss, _ = clf.loss({"image": x, "label": torch.tensor([0, 2], dtype=torch.int32)})  # int32 is fine
    assert torch.isfinite(loss)


@pytest.mark.parametrize("field, value, error, match", [
    ("heads", 3, ValueError, "divisible"), ("depth", -1, ValueError, "depth"), ("width", 32.0, TypeError, "width"),
    ("patch_size", 0, ValueError, "patch_size"), ("mlp_ratio", -1.0, ValueError, "mlp_ratio"),
    ("num_classes", True, TypeError, "num_classes"),
])
def test_vit_config_rejects_bad_fields(field, value, error, match):
    with pytest.raises(error, match=match):
        ViTConfig.preset("tiny", **{field: value})
