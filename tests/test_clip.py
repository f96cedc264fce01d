"""CLIP: the loss, the learnable temperature, parity with transformers, the openai/clip-style API,
and the zero-shot / retrieval / linear-probe evaluations on features whose answers are known."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minivl.clip as clip
from minivl.clip import CLIP, CLIPConfig, clip_loss
from minivl.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only oversubscribe the cores

PAD, EOS = 0, 5  # ids used by the hand-made token batches below


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return CLIP(CLIPConfig.preset("tiny", pad_id=PAD, **overrides))


def token_batch(lengths, T=12, vocab=512, seed=0):
    """Right-padded random token rows ending in EOS, with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(EOS + 1, vocab, (len(lengths), T), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, n - 1], ids[i, n:], mask[i, n:] = EOS, PAD, 0
    return ids, mask


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["a red circle", "a large blue square", "there is one object: a green triangle",
             "an orange diamond on the left", "a small gray cross"] * 4
    return Tokenizer.train(texts, vocab_size=300)


# ---------------------------------------------------------------------------- the loss
def test_loss_is_log_b_when_all_logits_are_equal():
    B = 6
    same = torch.randn(1, 16).expand(B, 16)  # every cosine is 1: every logit equal
    assert clip_loss(same, same.clone(), temperature=0.07).item() == pytest.approx(math.log(B), abs=1e-5)


def test_loss_is_near_zero_for_aligned_features_at_low_temperature():
    feats = torch.eye(8, 16) * torch.arange(1, 9)[:, None]  # orthogonal, unnormalised
    assert clip_loss(feats, feats.clone(), temperature=0.01).item() < 1e-6
    # the same features paired wrongly (a rotation of the batch) must cost a lot
    assert clip_loss(feats, feats.roll(1, 0), temperature=0.01).item() > 50


def test_loss_is_symmetric_in_image_and_text():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(7, 10, generator=g), torch.randn(7, 10, generator=g)
    a, b = clip_loss(img, txt, 0.1), clip_loss(txt, img, 0.1)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert a.item() != pytest.approx(clip_loss(img, txt.flip(0), 0.1).item(), abs=1e-3)


def test_loss_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(torch.randn(4, 8), torch.randn(5, 8))


def test_gradients_reach_the_learnable_temperature():
    t = torch.tensor(0.07, requires_grad=True)
    clip_loss(torch.randn(5, 8), torch.randn(5, 8), temperature=t).backward()
    assert t.grad is not None and t.grad.abs().item() > 0
    model = tiny_model()
    ids, mask = token_batch([12, 5, 8, 3])
    loss, logs = model.loss({"image": torch.randn(4, 3, 32, 32), "input_ids": ids, "attention_mask": mask})
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
    assert logs["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_loss_falls_on_a_fixed_batch():
    model = tiny_model()
    ids, mask = token_batch([12, 5, 8, 3, 10, 7, 6, 9], seed=3)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
             "input_ids": ids, "attention_mask": mask}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        loss, _ = model.loss(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # untrained: far from solved (not exactly log(8): random towers at logit scale 1/0.07 give uneven logits)
    assert first > 0.75 * math.log(8)
    assert loss.item() < 0.25 * first


def test_logit_scale_stays_clamped():
    model = tiny_model()
    ids, mask = token_batch([12, 5, 8, 3])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    logits, _ = model(images, {"input_ids": ids, "attention_mask": mask})
    assert logits.abs().max().item() <= 100.0 + 1e-4
    assert model.scale().item() == pytest.approx(100.0)
    # training with a huge learning rate on the scale alone: the parameter never ends above ln(100)
    opt = torch.optim.SGD([model.logit_scale], lr=1e4)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(90.0))
    for _ in range(3):
        loss, logs = model.loss({"image": images, "input_ids": ids, "attention_mask": mask})
        assert logs["logit_scale"] <= 100.0 + 1e-4
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
        assert model.logit_scale.item() <= math.log(100.0) + 1e-6


# ---------------------------------------------------------------------------- the model
def test_forward_matches_openai_conventions():
    model = tiny_model().eval()
    ids, mask = token_batch([12, 5, 8])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        per_image, per_text = model(images, {"input_ids": ids, "attention_mask": mask})
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(ids), dim=-1)  # bare ids: mask from config.pad_id
    assert per_image.shape == (2, 3) and per_text.shape == (3, 2)
    torch.testing.assert_close(per_text, per_image.T)
    torch.testing.assert_close(per_image, model.scale() * img @ txt.T, atol=1e-5, rtol=1e-5)


def test_pooled_shortcut_equals_the_full_towers():
    model = tiny_model().eval()
    ids, mask = token_batch([12, 5, 8, 3])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full_image = model.visual_projection(model.visual(images).pooled)
        full_text = model.text_projection(model.text(ids, mask).pooled)
        torch.testing.assert_close(model.encode_image(images), full_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text({"input_ids": ids, "attention_mask": mask}), full_text,
                                   atol=1e-5, rtol=1e-5)


def test_text_embedding_ignores_extra_padding_and_rejects_left_padding():
    model = tiny_model().eval()
    ids, mask = token_batch([7, 4], T=8)
    longer = torch.cat([ids, torch.full((2, 6), PAD)], 1)
    with torch.no_grad():
        a = model.encode_text({"input_ids": ids, "attention_mask": mask})
        b = model.encode_text({"input_ids": longer, "attention_mask": (longer != PAD).long()})
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="right-padded"):
        model.encode_text({"input_ids": ids, "attention_mask": mask.flip(1)})


def test_hf_parity():
    transformers = pytest.importorskip("transformers")
    from minivl.clip.convert import from_transformers, hf_config_from
    config = CLIPConfig.preset("tiny", pad_id=PAD)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids, mask = token_batch([12, 7, 3, 9])
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        hf = transformers.CLIPModel(hf_config_from(config, eos_token_id=EOS, pad_token_id=PAD,
                                                   attn_implementation=impl)).eval()
        with torch.no_grad():  # move norms and biases off their 1 / 0 init so every tensor matters
            for p in hf.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ours = from_transformers(hf, pad_id=PAD).eval()
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask, pixel_values=images)
            per_image, per_text = ours(images, {"input_ids": ids, "attention_mask": mask})
            img_ref = hf.get_image_features(pixel_values=images)
            txt_ref = hf.get_text_features(input_ids=ids, attention_mask=mask)
            img_ref = getattr(img_ref, "pooler_output", img_ref)
            txt_ref = getattr(txt_ref, "pooler_output", txt_ref)
            torch.testing.assert_close(ours.encode_image(images), img_ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(ours.encode_text({"input_ids": ids, "attention_mask": mask}), txt_ref,
                                       atol=1e-5, rtol=0)
        torch.testing.assert_close(per_image, out.logits_per_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(per_text, out.logits_per_text, atol=1e-5, rtol=0)


def test_converter_names_every_tensor():
    pytest.importorskip("transformers")
    import transformers
    from minivl.clip.convert import hf_config_from, state_dict_from_hf
    config = CLIPConfig.preset("tiny")
    hf = transformers.CLIPModel(hf_config_from(config, eos_token_id=EOS))
    ported = state_dict_from_hf(hf.state_dict())
    assert set(ported) == set(CLIP(config).state_dict())


# ---------------------------------------------------------------------------- openai/clip-style API
def test_tokenize_overflow_raises_unless_truncate(tokenizer):
    long_text = "a red circle and a blue square and a green triangle and a gray cross " * 3
    with pytest.raises(ValueError, match="context_length"):
        clip.tokenize([long_text], context_length=16, tokenizer=tokenizer)
    ids = clip.tokenize([long_text, "a red circle"], context_length=16, truncate=True, tokenizer=tokenizer)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert ids[0, -1].item() == tokenizer.eos_id
    assert ids[1, -1].item() == tokenizer.pad_id


def test_save_load_roundtrip_and_unknown_name_lists_available(tokenizer):
    model = tiny_model(vision={}, text={"vocab_size": tokenizer.vocab_size}).eval()
    model.config.pad_id = tokenizer.pad_id
    clip.save(model, clip.checkpoints_dir() / "clip-test", tokenizer=tokenizer)
    assert "clip-test" in clip.available_models()
    with pytest.raises(ValueError, match="clip-test"):
        clip.load("clip-nonexistent")
    loaded, preprocess = clip.load("clip-test", device="cpu")
    assert not loaded.training and loaded.tokenizer is not None
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    text = loaded.tokenize(["a red circle", "a small gray cross"])
    x = preprocess(image).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, text)[0], model(x, text)[0])


def test_preprocess_accepts_pil_numpy_and_tensors():
    from PIL import Image
    pre = clip.Preprocess(32)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ref = torch.from_numpy(img).permute(2, 0, 1).float() / 255 * 2 - 1
    for x in (img, Image.fromarray(img), torch.from_numpy(img), torch.from_numpy(img).permute(2, 0, 1),
              torch.from_numpy(img).permute(2, 0, 1).float() / 255):
        torch.testing.assert_close(pre(x), ref, atol=1e-6, rtol=0)
    ramp = np.linspace(0, 255, 64)
    smooth = np.stack([ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1), 255 - ramp[None, :].repeat(64, 0)],
                      -1).astype(np.uint8)  # 64 x 64, resized down to 32 x 32
    small = torch.from_numpy(smooth[1::2, 1::2].astype(np.float32)).permute(2, 0, 1) / 255 * 2 - 1
    assert pre(smooth).shape == (3, 32, 32) and (pre(smooth) - small).abs().max() < 0.05
    with pytest.raises(ValueError):
        pre(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(TypeError):
        pre([[1, 2, 3]])


# ---------------------------------------------------------------------------- evaluation on known features
def test_zero_shot_on_hand_built_features():
    E = 4
    # three classes, two templates each; class c's templates sit near axis c
    text = torch.zeros(3, 2, E)
    for c in range(3):
        text[c, 0, c], text[c, 0, 3] = 1.0, 0.3
        text[c, 1, c], text[c, 1, 3] = 2.0, -0.6  # another norm: normalisation must come first
    classes = clip.ensemble_class_embeddings(text)
    torch.testing.assert_close(classes, torch.eye(3, E))  # the +-0.3 parts cancel after normalising
    images = torch.tensor([[1.0, 0.1, 0, 0], [0, 0.1, 1.0, 0], [0.2, 1.0, 0, 0], [0.9, 0.0, 0.8, 0]])
    labels = torch.tensor([0, 2, 1, 2])  # the last image is closer to class 0: one error
    out = clip.zero_shot_eval(images, labels, classes, ks=(1, 2))
    assert out["top1"] == pytest.approx(0.75) and out["top2"] == pytest.approx(1.0)
    assert out["confusion"][2, 0].item() == 1 and out["confusion"].trace().item() == 3
    probs = clip.zero_shot_predict(images, classes)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert probs[0].argmax().item() == 0 and probs[0, 0] > 0.99


def test_retrieval_on_hand_built_features_with_repeated_captions():
    # images 0 and 1 are both "a red circle": text 0 describes both, so either counts as a hit
    images = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]])
    texts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.2, 1.0]])
    positives = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    out = clip.retrieval_eval(images, texts, positives, ks=(1, 2))
    assert out["i2t_R@1"] == pytest.approx(1.0)
    # text 2 ("blue") ranks image 3 first; text 1 ranks image 2 first; text 0 ranks image 0 first
    assert out["t2i_R@1"] == pytest.approx(1.0)
    swapped = clip.retrieval_eval(images, texts[[1, 0, 2]], positives, ks=(1, 2))
    assert swapped["i2t_R@1"] == pytest.approx(0.25) and swapped["i2t_median_rank"] > 1


def test_zero_shot_classifier_uses_the_model(tokenizer):
    model = tiny_model(text={"vocab_size": tokenizer.vocab_size}).eval()
    zs = clip.ZeroShotClassifier(model, ["red circle", "orange square"], tokenizer=tokenizer)
    assert zs.prompts[1][0] == "an orange square"
    probs = zs(torch.randn(5, 3, 32, 32))
    assert probs.shape == (5, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 4
    y = torch.arange(200) % 4
    x = centers[y] + torch.randn(200, 8, generator=g)
    out = clip.linear_probe(x[:150], y[:150], x[150:], y[150:])
    assert out["test_acc"] > 0.95
    shuffled = clip.linear_probe(x[:150], y[:150][torch.randperm(150, generator=g)], x[150:], y[150:])
    assert shuffled["test_acc"] < 0.6


def test_fresh_preset_model_reads_clip_tokenize_output():
    """A model built from a preset (not loaded) takes `clip.tokenize` ids: the presets carry the shared pad id."""
    from minivl.data import world_tokenizer
    model = CLIP(CLIPConfig.preset("tiny")).eval()
    assert model.config.pad_id == world_tokenizer().pad_id
    ids = clip.tokenize(["a red circle", "there is one object: a large blue square"])
    with torch.no_grad():
        logits_per_image, logits_per_text = model(torch.zeros(1, 3, 32, 32), ids)
        masked = model.encode_text({"input_ids": ids, "attention_mask": (ids != world_tokenizer().pad_id).long()})
    assert logits_per_image.shape == (1, 2) and logits_per_text.shape == (2, 1)
    torch.testing.assert_close(model.encode_text(ids), masked)


# ---------------------------------------------------------------------------- batches cut for accumulation / DDP
def pair_batch(B=5, seed=0):
    """B image-text pairs whose positives mask has off-diagonal entries (repeated captions)."""
    ids, mask = token_batch([12, 5, 8, 3, 9, 4, 7, 6][:B], seed=seed)
    positives = torch.eye(B, dtype=torch.bool)
    positives[0, 2] = positives[2, 0] = positives[1, B - 1] = True  # one pair inside chunk 0, one across chunks
    return {"image": torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed)), "input_ids": ids,
            "attention_mask": mask, "positives": positives}


def test_split_batch_takes_the_square_block_of_positives():
    batch = pair_batch(5)
    first, second = tiny_model().split_batch(batch, 2)  # rows 0..2 and 3..4, as torch.tensor_split
    assert torch.equal(first["image"], batch["image"][:3]) and torch.equal(second["input_ids"], batch["input_ids"][3:])
    assert torch.equal(first["positives"], batch["positives"][:3, :3]) and first["positives"][0, 2]
    assert torch.equal(second["positives"], torch.eye(2, dtype=torch.bool))  # the (1, 4) pair spans both: gone
    assert "global_rows" not in first  # micro-batches need no more
    # DDP shares (ranks=True) also keep their rows of the whole mask and their places in the batch
    shares = tiny_model().split_batch(pair_batch(4), 2, ranks=True)
    assert [s["global_rows"].tolist() for s in shares] == [[0, 1], [2, 3]]
    assert torch.equal(shares[0]["global_positives"], pair_batch(4)["positives"][:2])  # (b, B) = (2, 4)
    micro = tiny_model().split_batch(shares[1], 2)  # a share cut again: the global fields follow their rows
    assert [m["global_rows"].tolist() for m in micro] == [[2], [3]]
    assert micro[0]["global_positives"].tolist() == [[True, False, True, False]]  # row 2 pairs with row 0, on rank 0
    with pytest.raises(ValueError, match="5 rows cannot make 2"):
        tiny_model().split_batch(batch, 2, ranks=True)  # all_gather needs equal shares
    with pytest.raises(ValueError, match=r"positives must be \(5, 5\)"):
        tiny_model().split_batch({**batch, "positives": batch["positives"][:4]}, 2)
    with pytest.raises(TypeError, match="dict batch"):
        tiny_model().split_batch([batch["image"]], 2)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        tiny_model().split_batch(batch, 0, ranks=True)


def test_accumulation_with_positives_trains_each_micro_batch_as_its_own_contrastive_batch():
    from minivl.train import TrainConfig, Trainer
    batch = pair_batch(5)
    config = TrainConfig(steps=1, warmup_steps=0, grad_clip=None, log_every=1, progress=False, accumulation_steps=2)
    trainer = Trainer(tiny_model(), lambda step: batch, config, device="cpu")
    history = trainer.fit()
    # by hand: the row-weighted sum of the two chunks' losses, each with its square block of positives
    ref = tiny_model()
    chunks = ref.split_batch(batch, 2)
    loss = sum(ref.loss(c)[0] * (c["image"].shape[0] / 5) for c in chunks)
    loss.backward()
    assert history.train[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    whole = ref.loss(batch)[0].item()
    assert history.train[0]["loss"] != pytest.approx(whole, rel=1e-3)  # fewer negatives: a different loss
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)  # the update's gradient


# ---------------------------------------------------------------------------- validation where data enters
def test_text_without_mask_takes_it_from_pad_id_instead_of_pooling_a_pad():
    model = tiny_model().eval()
    ids, mask = token_batch([4, 12, 7])
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        with_mask, _ = model.loss({"image": images, "input_ids": ids, "attention_mask": mask})
        without, _ = model.loss({"image": images, "input_ids": ids})
    torch.testing.assert_close(without, with_mask)
    with pytest.raises(ValueError, match="pad_id"):
        CLIP(CLIPConfig.preset("tiny", pad_id=None)).encode_text({"input_ids": ids})
    with pytest.raises(ValueError, match=r"must match the ids' shape"):  # batch 1 mask, batch 3 ids
        model.encode_text({"input_ids": ids, "attention_mask": mask[:1]})


@pytest.mark.parametrize("temperature", [torch.tensor(0.0), torch.tensor(-0.1), torch.tensor(float("nan")),
                                         float("nan"), 0.0])
def test_clip_loss_rejects_a_non_positive_or_nan_temperature(temperature):
    f = torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        clip_loss(f, f, temperature=temperature)


def test_zero_shot_helpers_reject_bad_scales_empty_templates_and_labels():
    f = torch.randn(3, 8)
    for scale in (-1.0, float("nan"), True):
        with pytest.raises((ValueError, TypeError), match="scale"):
            clip.zero_shot_logits(f, f, scale)
    with pytest.raises(ValueError, match="empty"):
        clip.ensemble_class_embeddings(torch.randn(3, 0, 8))
    with pytest.raises(ValueError, match="templates"):
        clip.ZeroShotClassifier(tiny_model(), ["red circle"], templates=[])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        clip.zero_shot_eval(f, [0, 1, 5], f)
    with pytest.raises(ValueError, match="train_labels"):
        clip.linear_probe(f, [0, 1], f, [0, 1, 2])


def test_preprocess_rejects_nan_pixels_which_pass_a_range_test():
    with pytest.raises(ValueError, match="finite"):
        clip.Preprocess(32)(torch.full((3, 32, 32), float("nan")))
    with pytest.raises(TypeError, match="image_size"):
        clip.Preprocess(True)
