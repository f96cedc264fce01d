"""BLIP captioner: losses at known points, overfitting, padding and cache invariance, save/load,
parity with transformers' BLIP at random init, hard negatives, own data, and every bad input."""
import json

import numpy as np
import pytest
import torch

from minivl.captioner import Captioner, CaptionerConfig, Processor, hard_negatives
from minivl.captioner import data as own_data
from minivl.data import world_tokenizer
from minivl.transformer import Block

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only oversubscribe the cores


@pytest.fixture(scope="module")
def tok():
    return world_tokenizer()


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return Captioner(CaptionerConfig.preset("tiny", **overrides)).eval()


def batch(tok, texts=("a red circle", "a large blue square and a small green cross"), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(len(texts), 3, 32, 32, generator=g) * 2 - 1,
            **tok(list(texts), context_length=40, padding="longest")}


# ---------------------------------------------------------------------------- losses
def test_every_objective_is_logged_and_the_total_is_their_sum(tok):
    m = tiny()
    loss, logs = m.loss(batch(tok))
    assert {"itc", "itm", "lm", "itm_acc", "temp"} <= set(logs)
    assert loss.item() == pytest.approx((logs["itc"] + logs["itm"] + logs["lm"]).item(), rel=1e-5)
    _, logs = tiny(objectives=("lm",)).loss(batch(tok))
    assert "itc" not in logs and "itm" not in logs


def test_lm_finetune_schedule_switches_to_lm_alone_at_its_share(tok):
    """BLIP's two stages in one run: all objectives, then the last share of steps on the LM loss alone."""
    import dataclasses
    from minivl.recipes.captioner import RECIPES, finetune_schedule
    recipe = dataclasses.replace(RECIPES["tiny"], steps=10, lm_finetune_share=0.3)
    stage, m = finetune_schedule(recipe), tiny()
    seen = []
    for step in range(10):  # the Trainer calls it with the index of the next step (and the recipe before a resume)
        stage(m, step)
        seen.append(set(m.loss(batch(tok))[1]) & {"itc", "itm", "lm"})
    assert seen[:7] == [{"itc", "itm", "lm"}] * 7 and seen[7:] == [{"lm"}] * 3
    stage(m, 0)  # a run resumed before the switch is back on all three
    assert m.config.objectives == tuple(recipe.objectives)
    never = finetune_schedule(dataclasses.replace(recipe, lm_finetune_share=0.0))
    never(m, 9)
    assert m.config.objectives == tuple(recipe.objectives)
    weighted = finetune_schedule(dataclasses.replace(recipe, finetune_matching_weight=0.25), matching_weight=1.0)
    weighted(m, 8)  # the fine-tune keeps ITC + ITM, at their fine-tune weight: the total says so
    loss, logs = m.loss(batch(tok))
    assert m.config.objectives == tuple(recipe.objectives) and m.config.matching_weight == 0.25
    assert loss.item() == pytest.approx((logs["lm"] + 0.25 * (logs["itc"] + logs["itm"])).item(), rel=1e-5)
    weighted(m, 0)
    assert m.config.matching_weight == 1.0
    with pytest.raises(ValueError, match="lm_finetune_share"):
        finetune_schedule(dataclasses.replace(recipe, lm_finetune_share=1.5))
    with pytest.raises(ValueError, match="finetune_matching_weight"):
        finetune_schedule(dataclasses.replace(recipe, finetune_matching_weight=-1.0))


def test_losses_at_known_points(tok):
    m = tiny()
    with torch.no_grad():  # a zero LM transform and head: uniform next-token logits, zero ITM logits
        m.text.head_ln.weight.zero_(), m.text.head_ln.bias.zero_(), m.text.head_bias.zero_()
        m.itm_head.weight.zero_(), m.itm_head.bias.zero_()
        m.vision_proj.weight.zero_(), m.vision_proj.bias.fill_(1.0)  # every image feature the same
    _, logs = m.loss(batch(tok))
    assert logs["lm"].item() == pytest.approx(np.log(m.config.text.vocab_size), abs=1e-4)  # smoothing changes nothing
    assert logs["itm"].item() == pytest.approx(np.log(2), abs=1e-5)
    assert logs["itc"].item() == pytest.approx(np.log(2), abs=1e-4)  # B = 2, all image features equal


def test_lm_labels_ignore_decoder_token_prompt_and_padding(tok):
    m = tiny()
    b = batch(tok)
    ids, mask, labels = m.lm_inputs(b["input_ids"], b["attention_mask"])
    P = 1 + len(tok.encode("a picture of"))
    assert (ids[:, 0] == m.config.dec_id).all() and (labels[:, :P] == -100).all()
    assert (labels[mask == 0] == -100).all() and (labels[:, P:][mask[:, P:] == 1] >= 0).all()
    assert tok.decode(ids[0, 1:P].tolist()) == "a picture of"


def test_overfits_one_batch_and_captions_it(tok):
    m = tiny(objectives=("lm",), label_smoothing=0.0)
    m.train()
    b = batch(tok, ("a red circle", "two blue squares"))
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    for _ in range(50):
        loss, _ = m.loss(b)
        opt.zero_grad(), loss.backward(), opt.step()
    m.eval()
    assert loss.item() < 0.1  # from log(514) = 6.2
    assert m.decode(m.generate(b["image"], max_new_tokens=8)) == ["a red circle", "two blue squares"]


# ---------------------------------------------------------------------------- invariances
def test_padding_changes_no_real_position(tok):
    m = tiny()
    b = batch(tok)
    short = tok(["a red circle"], context_length=40, padding="longest")  # no padding at all
    img = b["image"][:1]
    ids, mask, _ = m.lm_inputs(b["input_ids"], b["attention_mask"])
    ids1, mask1, _ = m.lm_inputs(short["input_ids"], short["attention_mask"])
    n = mask1.shape[1]
    with torch.no_grad():
        both = m.text(ids, mask, memory=m.image_tokens(b["image"]))[0, :n]
        alone = m.text(ids1, mask1, memory=m.image_tokens(img))[0]
        assert torch.allclose(both, alone, atol=1e-5)
        f_both = m.text_features(b["input_ids"], b["attention_mask"])[0]
        f_alone = m.text_features(short["input_ids"], short["attention_mask"])[0]
        assert torch.allclose(f_both, f_alone, atol=1e-5)


def test_decoder_self_attention_serves_the_decoder_alone(tok):
    m = tiny(text=dict(decoder_self_attention=True))
    b = batch(tok)
    ids, mask, _ = m.lm_inputs(b["input_ids"], b["attention_mask"])
    with torch.no_grad():
        tokens = m.image_tokens(b["image"])
        before = (m.text(ids, mask, memory=tokens), m.text_features(b["input_ids"], b["attention_mask"]))
        for block in m.text.transformer.blocks:  # the decoder's own self-attention changes: only LM logits move
            block.dec_attn.v_proj.weight.mul_(3.0)
        after = (m.text(ids, mask, memory=tokens), m.text_features(b["input_ids"], b["attention_mask"]))
        assert not torch.allclose(before[0], after[0], atol=1e-4) and torch.equal(before[1], after[1])
        for block in m.text.transformer.blocks:  # the encoder's changes: only the encoder features move
            block.attn.v_proj.weight.mul_(3.0)
        again = (m.text(ids, mask, memory=tokens), m.text_features(b["input_ids"], b["attention_mask"]))
        assert torch.equal(after[0], again[0]) and not torch.allclose(after[1], again[1], atol=1e-4)
    assert {"attn", "dec_attn", "ln_1", "ln_dec"} <= {n for n, _ in m.text.transformer.blocks[0].named_children()}


@pytest.mark.parametrize("layer", [-1, -2, -3])
def test_memory_layer_reads_that_hidden_state_and_the_class_token_stays_clips(layer):
    m = tiny(memory_layer=layer)
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        memory, cls = m.encode_image(px)
        full = m.vision(px, output_hidden_states=True)
        want = full.tokens if layer == -1 else m.ln_memory(full.hidden_states[layer])
        assert torch.allclose(memory, want, atol=1e-5)
        assert torch.allclose(cls, full.tokens[:, 0], atol=1e-5)  # the pooled path = the full tower's class token
        assert m.encode_image(px, pooled=False)[1] is None or layer == -1
    with pytest.raises(ValueError, match="memory_layer"):
        tiny(memory_layer=0)


@pytest.mark.parametrize("layer", [-1, -2])
def test_memory_detail_adds_the_first_layer_neighbourhood_to_the_patches_only(tok, layer):
    from minivl.vit import neighbourhood
    plain, detail = tiny(memory_layer=layer), tiny(memory_layer=layer, memory_detail=True)
    assert plain.memory_detail is None and not any(k.startswith("memory_detail") for k in plain.state_dict())
    # with the option off every other weight starts as before: the same seed gives the same tower and text side
    shared = {k: v for k, v in detail.state_dict().items() if not k.startswith("memory_detail")}
    for k, v in shared.items():
        torch.testing.assert_close(v, plain.state_dict()[k])
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        (m0, c0), (m1, c1) = plain.encode_image(px), detail.encode_image(px)
        torch.testing.assert_close(c1, c0)  # the ITC summary does not read the detail
        torch.testing.assert_close(m1[:, 0], m0[:, 0])  # nor does the memory's class token
        v = detail.vision
        first = v.ln_pre(v.embed(px))[:, 1:]  # (B, N, Dv), hidden state 0
        want = m0[:, 1:] + torch.nn.functional.gelu(detail.memory_detail(neighbourhood(first, 4)))
        torch.testing.assert_close(m1[:, 1:], want)
    loss, _ = detail.train().loss(batch(tok))
    loss.backward()
    assert detail.memory_detail.weight.grad.abs().sum() > 0  # the captioning loss trains it
    with pytest.raises(TypeError, match="memory_detail"):
        tiny(memory_detail=1)


def test_memory_detail_drop_acts_in_training_only():
    on, dropped = tiny(memory_detail=True), tiny(memory_detail=True, memory_detail_drop=0.999)
    px = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(dropped.encode_image(px)[0], on.encode_image(px)[0])  # eval: the path is on
        torch.manual_seed(0)
        off = dropped.train().encode_image(px)[0]  # training: off for (almost surely) every image
        cut = on.memory_detail
        on.memory_detail = None
        torch.testing.assert_close(off, on.encode_image(px)[0])
        on.memory_detail = cut
    with pytest.raises(ValueError, match="memory_detail_drop"):
        tiny(memory_detail=True, memory_detail_drop=1.0)


@pytest.mark.parametrize("beams", [1, 3])
def test_kv_cache_gives_the_same_captions(tok, beams):
    m = tiny()
    img = batch(tok)["image"]
    a = m.generate(img, max_new_tokens=8, num_beams=beams)
    b = m.generate(img, max_new_tokens=8, num_beams=beams, use_cache=False)
    assert torch.equal(a, b)


def test_batched_generation_equals_one_image_at_a_time(tok):
    m = tiny()
    img = batch(tok)["image"]
    both = m.generate(img, max_new_tokens=6, num_beams=3)
    for i in range(2):
        one = m.generate(img[i:i + 1], max_new_tokens=6, num_beams=3)
        assert torch.equal(both[i, :one.shape[1]], one[0])


def test_save_load_round_trip(tok, tmp_path):
    m = tiny()
    m.tokenizer = tok
    m.save(tmp_path / "cap")
    back = Captioner.load(tmp_path / "cap").eval()
    b = batch(tok)
    with torch.no_grad():
        assert torch.equal(m(b["image"], *m.lm_inputs(b["input_ids"], b["attention_mask"])[:2]),
                           back(b["image"], *back.lm_inputs(b["input_ids"], b["attention_mask"])[:2]))
    assert back.tokenizer is not None and back.config == m.config


def test_post_norm_block_is_bert_order():
    torch.manual_seed(0)
    blk = Block(16, 2, post_norm=True).eval()
    x = torch.randn(2, 5, 16)
    a, _ = blk.attn(x)
    h = blk.ln_1(x + a)
    assert torch.allclose(blk(x)[0], blk.ln_2(h + blk.mlp(h)), atol=1e-6)


# ---------------------------------------------------------------------------- parity with transformers
@pytest.fixture(scope="module", params=[False, True], ids=["shared-self-attention", "decoder-self-attention"])
def blip(request):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BlipConfig(
        # BlipVisionConfig's initializer_range is 1e-10: at that init the tower's output is the same for every
        # image and a parity test would not see the vision side at all
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.02),
        text_config=dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24, bos_token_id=110, pad_token_id=0,
                         sep_token_id=102, eos_token_id=2, label_smoothing=0.1),
        image_text_hidden_size=16)
    hf, hr = tf.BlipForConditionalGeneration(cfg).eval(), tf.BlipForImageTextRetrieval(cfg).eval()
    from minivl.captioner.convert import from_transformers
    cap, mat = from_transformers(hf, hr, decoder_self_attention=request.param)
    px = torch.randn(2, 3, 32, 32).clamp(-2, 2)
    ids = torch.tensor([[110, 5, 6, 7, 8, 102], [110, 9, 10, 11, 102, 0]])
    mask = (ids != 0).long()
    return hf, hr, cap.eval(), mat.eval(), px, ids, mask


def test_parity_lm_logits_and_loss(blip):
    hf, _, cap, _, px, ids, mask = blip
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = hf(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
        ours = cap(px, ids, mask)
    real = mask.bool()  # a pad slot's logits are never read (its position differs: ours come from the mask)
    assert (out.logits - ours)[real].abs().max() < 1e-5
    lm = torch.nn.functional.cross_entropy(ours[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=0.1)
    assert lm.item() == pytest.approx(out.loss.item(), abs=1e-5)


def test_parity_greedy_caption(blip):
    hf, _, cap, _, px, _, _ = blip
    with torch.no_grad():
        theirs = hf.generate(pixel_values=px, max_new_tokens=10)[:, 1:]  # they return the [DEC] prompt too
        ours = cap.generate(px, max_new_tokens=10, prompt="")
    assert torch.equal(theirs, ours)


@torch.no_grad()
def test_parity_beam_caption(blip):
    """Beam search (the K beams of an image read its memory together, `memory_groups`) finds transformers'
    captions, batched, on weights scaled up so that each image gets its own caption (at N(0, 0.02) the text
    side's own logits decide and every image gets the same one)."""
    import copy

    from minivl.captioner.convert import from_transformers
    hf, _, cap, _, px, _, _ = blip
    hf = copy.deepcopy(hf)
    for p in hf.parameters():
        p.mul_(4)
    cap = from_transformers(hf, decoder_self_attention=cap.config.text.decoder_self_attention).eval()
    px = torch.cat([px, -px, px.flip(-1)])  # 6 images
    theirs = hf.generate(pixel_values=px, max_new_tokens=10, num_beams=3)[:, 1:]
    ours = cap.generate(px, max_new_tokens=10, prompt="", num_beams=3)
    assert theirs.shape == ours.shape and torch.equal(theirs, ours)
    assert len({tuple(r) for r in ours.tolist()}) >= 3  # the images decide the captions


def test_parity_itm_and_itc(blip):
    _, hr, _, mat, px, ids, mask = blip
    with torch.no_grad():
        itm = hr(input_ids=ids, pixel_values=px, attention_mask=mask).itm_score
        itc = hr(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        tokens, cls = mat.encode_image(px)
        assert (itm - mat.itm_logits(tokens, ids, mask)).abs().max() < 1e-5
        assert (itc - mat.image_features(cls) @ mat.text_features(ids, mask).T).abs().max() < 1e-5


# ---------------------------------------------------------------------------- hard negatives
def test_hard_negatives_are_never_positives_and_follow_similarity():
    B = 4
    pos = torch.eye(B, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True  # captions 0 and 1 are both true of images 0 and 1
    sim = torch.zeros(B, B)
    sim[:, 3] = 50.0  # caption 3 is by far the most similar one to every image
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t, i = hard_negatives(sim, pos, g)
        assert not pos[torch.arange(B), t].any() and not pos[i, torch.arange(B)].any()
        assert (t[:3] == 3).all()  # the most confusable wrong caption is drawn
    with pytest.raises(ValueError, match=">= 2"):
        hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))


# ---------------------------------------------------------------------------- own data
def test_coco_folder_and_in_memory_items_train(tok, tmp_path):
    import matplotlib.image as mpimg
    rng = np.random.default_rng(0)
    images = [(rng.random((40 + 10 * i, 50, 3)) * 255).astype(np.uint8) for i in range(3)]  # not 32 x 32
    for i, im in enumerate(images):
        mpimg.imsave(tmp_path / f"img{i}.png", im)
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"img{i}.png"} for i in range(3)],
        "annotations": [{"image_id": i, "caption": c} for i, c in [(0, "a red circle"), (0, "one red circle"),
                                                                     (1, "a blue square"), (2, "a green cross")]]}))
    items = own_data.load_coco_captions(tmp_path / "captions.json", tmp_path)
    assert [len(it["captions"]) for it in items] == [2, 1, 1]
    memory = [{"image": im, "captions": it["captions"]} for im, it in zip(images, items)]
    for source in (items, memory):
        get = own_data.item_batches(source, tok, 32, batch_size=4)
        b = get(0)
        assert b["image"].shape == (4, 3, 32, 32) and b["positives"].diagonal().all()
        loss, _ = tiny().train().loss(b)
        assert torch.isfinite(loss)
    pixels = own_data.item_pixels(items, 32)
    assert torch.allclose(pixels, own_data.item_pixels(memory, 32), atol=1 / 127)  # PNG round trip


def test_own_data_bad_items(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        own_data.check_items([])
    with pytest.raises(ValueError, match="captions"):
        own_data.check_items([{"image": np.zeros((4, 4, 3), np.uint8), "captions": "a red circle"}])
    with pytest.raises(ValueError, match="uint8"):
        own_data.check_items([{"image": np.zeros((4, 4)), "captions": ["x"]}])
    with pytest.raises(ValueError, match="does not exist"):
        own_data.read_image(tmp_path / "missing.png")


def test_processor_resizes_and_decodes(tok):
    p = Processor(32, tok)
    out = p(images=[np.zeros((50, 70, 3), np.uint8)], text="a red circle")
    assert out["pixel_values"].shape == (1, 3, 32, 32) and out["input_ids"].shape[0] == 1
    ids = torch.tensor(tok.encode("a red circle") + [tok.eos_id, tok.pad_id, 513])
    assert p.decode(ids, skip_special_tokens=True) == "a red circle"


def test_itm_score_and_similarity_shapes(tok):
    m = tiny()
    img = batch(tok)["image"]
    assert m.itm_score(img, ["a red circle", "a blue square"]).shape == (2,)
    assert m.itm_score(img, "a red circle").shape == (2,)
    s = m.similarity(img, ["a", "b", "c"])
    assert s.shape == (2, 3) and (s.abs() <= 1 + 1e-5).all()
    maps = m.cross_attention_maps(img, torch.tensor([[m.config.dec_id, 5, 6]] * 2))
    assert maps.shape == (2, 2, 3, 4, 4) and torch.allclose(maps.sum((-1, -2)), torch.ones(2, 2, 3), atol=0.2)


# ---------------------------------------------------------------------------- bad input
def test_bad_image_shape(tok):
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tiny().generate(torch.zeros(2, 3, 16, 16))


def test_bad_image_dtype():
    with pytest.raises(ValueError, match="float"):
        tiny().generate(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        tiny().generate(torch.zeros(0, 3, 32, 32))


def test_prompt_longer_than_context():
    with pytest.raises(ValueError, match="context length"):
        tiny().generate(torch.zeros(1, 3, 32, 32), prompt="a picture of " * 20)


def test_num_beams_below_one():
    with pytest.raises(ValueError, match="num_beams"):
        tiny().generate(torch.zeros(1, 3, 32, 32), num_beams=0)


def test_min_longer_than_max():
    with pytest.raises(ValueError, match="min_new_tokens"):
        tiny().generate(torch.zeros(1, 3, 32, 32), max_new_tokens=3, min_new_tokens=5)
