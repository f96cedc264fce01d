"""Grounding (OWL-ViT on CLIP's towers): the box bias, the class head, matching, the set loss,
parity with transformers' OwlViTForObjectDetection, the Grounding-DINO / transformers calls, the
training targets, the evaluation on known answers, and every bad input of the issue."""
import numpy as np
import pytest
import torch

from minivl.grounding import (OWLViT, OWLViTConfig, box_bias, ground, hungarian_match, make_batch, parse_phrase,
                              post_process_object_detection, predict, precision_recall_curve, sigmoid_focal_loss,
                              split_caption)
from minivl.grounding.loss import dense_box_loss
from minivl.grounding.matcher import patch_centres
from minivl.grounding.predict import annotate, image_guided_detection, paste_crop
from minivl.grounding.targets import boxes_to_targets, matches
from minivl.metrics.boxes import box_convert
from minivl.world import World

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only oversubscribe the cores

PAD, EOS = 0, 500  # hand-made token rows: ids below EOS, so transformers' argmax pooling finds the EOS


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    from minivl.data import world_tokenizer
    model = OWLViT(OWLViTConfig.preset("tiny", pad_id=world_tokenizer().pad_id, **overrides)).eval()
    return model


@pytest.fixture(scope="module")
def world():
    return World(image_size=32)


@pytest.fixture(scope="module")
def tokenizer():
    from minivl.data import world_tokenizer
    return world_tokenizer()


def token_rows(lengths, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, EOS, (len(lengths), T), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, n - 1], ids[i, n:], mask[i, n:] = EOS, PAD, 0
    return ids, mask


# ---------------------------------------------------------------------------- the model
def test_box_bias_puts_one_patch_sized_box_on_every_patch():
    model = tiny()
    for p in model.box_head.dense2.parameters():
        torch.nn.init.zeros_(p)  # no offsets: the bias alone
    out = model(torch.zeros(1, 3, 32, 32))
    g = model.config.grid
    centres = (torch.arange(g) + 0.5) / g
    boxes = out.pred_boxes[0].reshape(g, g, 4)  # (row, col, cxcywh)
    torch.testing.assert_close(boxes[0, :, 0], centres, atol=1e-3, rtol=0)  # x runs along a row
    torch.testing.assert_close(boxes[:, 0, 1], centres, atol=1e-3, rtol=0)  # y down a column
    torch.testing.assert_close(boxes[..., 2:], torch.full((g, g, 2), 1 / g), atol=1e-3, rtol=0)
    corner = box_bias(g, "corner").sigmoid()
    assert torch.allclose(corner[0, :2], torch.tensor([1 / g, 1 / g]), atol=1e-3)


def test_shapes_and_shared_queries_equal_per_image_queries():
    model = tiny()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ids, mask = token_rows([8, 5, 3])
    shared = model(images, ids, mask)
    per_image = model(images, ids[None].expand(2, -1, -1), mask[None].expand(2, -1, -1))
    assert shared.logits.shape == (2, 16, 3) and shared.pred_boxes.shape == (2, 16, 4)
    assert shared.image_embeds.shape == (2, 4, 4, 32) and shared.class_embeds.shape == (2, 16, 32)
    torch.testing.assert_close(shared.logits, per_image.logits)
    assert ((shared.pred_boxes >= 0) & (shared.pred_boxes <= 1)).all()


def test_query_and_text_padding_change_no_real_logit():
    model = tiny()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ids, mask = token_rows([6, 4])
    base = model(images, ids, mask).logits
    longer = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1), torch.cat([mask, torch.zeros(2, 5).long()], 1)
    torch.testing.assert_close(model(images, *longer).logits, base, atol=1e-5, rtol=0)
    q = model.embed_text(ids, mask)
    padded = torch.cat([q, torch.randn(1, q.shape[1])])[None].expand(2, -1, -1)
    out = model(images, query_embeds=padded, query_mask=torch.tensor([[True, True, False]] * 2))
    torch.testing.assert_close(out.logits[..., :2], base, atol=1e-5, rtol=0)
    assert (out.logits[..., 2] == torch.finfo(out.logits.dtype).min).all()


def test_save_load_round_trip(tmp_path, tokenizer):
    model = tiny()
    model.save(tmp_path / "g", tokenizer)
    back = OWLViT.load(tmp_path / "g")
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    ids, mask = token_rows([4])
    torch.testing.assert_close(back(images, ids, mask).logits, model(images, ids, mask).logits)
    assert back.tokenizer is not None and back.config == model.config


# ---------------------------------------------------------------------------- parity with transformers
def test_hf_parity_logits_and_boxes():
    transformers = pytest.importorskip("transformers")
    from minivl.grounding.convert import from_transformers, hf_config_from, state_dict_from_hf
    config = OWLViTConfig.preset("tiny", pad_id=PAD)
    torch.manual_seed(0)
    hf = transformers.OwlViTForObjectDetection(hf_config_from(config, eos_token_id=EOS, pad_token_id=PAD)).eval()
    with torch.no_grad():  # move norms and biases off their 1 / 0 init so every tensor matters
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert set(state_dict_from_hf(hf.state_dict())) == set(OWLViT(config).state_dict())  # every tensor named
    ours = from_transformers(hf, pad_id=PAD).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-3, 3)
    ids, mask = token_rows([8, 5, 3, 7, 2, 6])  # 2 images x 3 queries each
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images, attention_mask=mask)
        out = ours(images, ids.reshape(2, 3, -1), mask.reshape(2, 3, -1))
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-5, rtol=0)
    unit = out.class_embeds / (out.class_embeds.norm(dim=-1, keepdim=True) + 1e-6)  # HF returns them normalised
    torch.testing.assert_close(unit, ref.class_embeds, atol=1e-5, rtol=0)
    for extra in (dict(class_positions=True), dict(box_detail=True), dict(fusion_depth=1)):
        with pytest.raises(ValueError, match=next(iter(extra))):  # options transformers lacks are refused
            hf_config_from(OWLViTConfig.preset("tiny", pad_id=PAD, **extra), eos_token_id=EOS, pad_token_id=PAD)


# ---------------------------------------------------------------------------- matching and loss
def test_focal_loss_reduces_to_bce_and_fades_easy_pairs():
    logits, targets = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0), bce)
    focal = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0)
    p_t = torch.tensor([torch.sigmoid(torch.tensor(2.0)), 1 - torch.sigmoid(torch.tensor(-1.0)),
                        1 - torch.sigmoid(torch.tensor(0.5))])
    torch.testing.assert_close(focal, bce * (1 - p_t) ** 2)
    assert (focal < bce).all()


def test_hungarian_is_one_to_one_where_greedy_is_not():
    # patch 0 is the cheapest for both objects; the least total cost gives object 0 to patch 1
    cost = torch.tensor([[[1.0, 0.0], [2.0, 9.0], [9.0, 9.0]]])  # (B=1, N=3, G=2)
    (rows, cols), = hungarian_match(cost, torch.tensor([[True, True]]))
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]
    (rows, cols), = hungarian_match(cost, torch.tensor([[False, True]]))  # padding targets are left out
    assert rows.tolist() == [0] and cols.tolist() == [1]


def test_dense_box_loss_reaches_the_patches_inside_objects():
    centres = patch_centres(16)
    assert torch.allclose(centres[1], torch.tensor([0.375, 0.125]))
    target = torch.tensor([[[0.25, 0.25, 0.5, 0.5]]])  # the top-left quarter: 4 patch centres of 16
    pred = torch.full((1, 16, 4), 0.5, requires_grad=True)
    loss = dense_box_loss(pred, target, torch.tensor([[True]]), OWLViTConfig())
    loss.backward()
    touched = (pred.grad.abs().sum(-1) > 0).reshape(4, 4)
    assert touched[:2, :2].all() and touched.sum() == 4


def test_loss_overfits_one_batch(world, tokenizer):
    model = tiny(dense_boxes=1.0, logit_scale_init=10.0).train()
    batch = make_batch(world, [world.scene(i) for i in range(4)], tokenizer, 40, np.random.default_rng(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, logs = model.loss(batch)
        first = first if first is not None else (loss.item(), logs["matched_giou"].item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first[0]
    assert logs["matched_giou"].item() > max(0.6, first[1])


# ---------------------------------------------------------------------------- targets
def test_phrase_reading_agrees_with_the_worlds_detection_boxes(world):
    for i in range(40):
        scene = world.scene(i, "train")
        for q in world.detection(scene):
            for k, phrase in enumerate(q.phrases):
                mine = sorted(o.box for o in scene.objects if matches(o, parse_phrase(world, phrase)))
                assert mine == sorted(b for b, lab in zip(q.boxes, q.labels) if lab == k)


def test_training_batches_never_query_a_heldout_pair(world, tokenizer):
    batch = make_batch(world, [world.scene(i) for i in range(16)], tokenizer, 40, np.random.default_rng(0))
    texts = [tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    held = [f"{c} {s}" for c, s in world.config.heldout]
    assert not any(h in t for t in texts for h in held)
    assert batch["target_labels"].shape[:2] == batch["target_boxes"].shape[:2]
    assert (batch["target_labels"].sum(-1)[batch["target_mask"]] > 0).all()  # every object answers a query


def test_queries_are_read_with_an_article_in_training_and_in_the_calls(world, tokenizer):
    from minivl.grounding.targets import query_text
    assert query_text("circle") == "a circle" and query_text(" orange  object") == "an orange object"
    assert query_text("the object left of the red circle") == "the object left of the red circle"
    with pytest.raises(ValueError, match="non-empty"):
        query_text("  ")
    model = tiny()
    model.tokenizer = tokenizer
    ids = model.tokenize(["circle", "the leftmost object"])["input_ids"]
    want = tokenizer(["a circle", "the leftmost object"], context_length=40, padding="longest")["input_ids"]
    torch.testing.assert_close(ids, want)
    batch = make_batch(world, [world.scene(0)], tokenizer, 40)  # training reads the same texts
    texts = {tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"])}
    assert "a circle" in texts and "circle" not in texts


# ---------------------------------------------------------------------------- the calls users know
def test_predict_agrees_with_post_process_and_batches(world):
    model = tiny()
    images = [world.scene(i, "test").image for i in range(3)]
    caption = "circle . red square"
    single = predict(model, images[0], caption, box_threshold=0.0, text_threshold=0.0)
    batched = predict(model, images, caption, box_threshold=0.0, text_threshold=0.0)
    assert len(batched) == 3
    torch.testing.assert_close(batched[0][0], single[0])
    boxes, logits, phrases = single
    assert boxes.shape == (16, 4) and logits.shape == (16,) and all(p for p in phrases)
    assert all(" . " not in p or set(p.split(" . ")) <= {"circle", "red square"} for p in phrases)
    from minivl.grounding.predict import as_images
    out = model(as_images(model, images[0])[0], **model.tokenize(split_caption(caption)))
    post = post_process_object_detection(out, threshold=0.0, target_sizes=[(32, 32)])[0]
    torch.testing.assert_close(box_convert(boxes, "cxcywh", "xyxy") * 32, post["boxes"])
    torch.testing.assert_close(logits, post["scores"])
    assert set(post["labels"].tolist()) <= {0, 1}
    keep = predict(model, images[0], caption, box_threshold=0.99)[0]
    assert len(keep) == len(post_process_object_detection(out, 0.99)[0]["boxes"])


def test_predict_phrases_are_those_above_text_threshold_best_first(world):
    model = tiny()
    image = world.scene(0, "test").image
    caption = "circle . square . red square . blue circle . triangle"
    phrases = split_caption(caption)
    from minivl.grounding.predict import as_images
    with torch.no_grad():
        scores = model(as_images(model, image)[0], **model.tokenize(phrases)).logits[0].sigmoid()  # (N, Q)
    # thresholds between the scores, so some patches name several phrases, some one, some none
    text_threshold = float(scores.median())
    boxes, logits, names = predict(model, image, caption, box_threshold=0.0, text_threshold=text_threshold)
    assert len(names) == scores.shape[0]
    counts = set()
    for row, got in zip(scores, names):
        want = [phrases[q] for q in row.argsort(descending=True).tolist() if row[q] > text_threshold]
        assert got == " . ".join(want)
        counts.add(len(want))
    assert len(counts) >= 2  # the check saw patches with different numbers of phrases


def test_split_caption_never_merges_across_separators():
    assert split_caption("circle . red  square .") == ["circle", "red square"]
    assert split_caption("circle") == ["circle"]


def test_ground_annotate_and_image_guided_queries(world):
    model = tiny()
    scene = world.scene(0, "test")
    box, score = ground(model, scene.image, "the leftmost object")
    assert box.shape == (4,) and 0 < score < 1 and (box[2:] >= box[:2]).all()
    boxes, logits, phrases = predict(model, scene.image, "circle . square", box_threshold=0.0)
    picture = annotate(scene.image, boxes[:3], logits[:3], phrases[:3])
    assert picture.dtype == np.uint8 and picture.shape == (128, 128, 3)
    x1, y1, x2, y2 = scene.objects[0].box
    canvas, where = paste_crop(model, scene.image[y1:y2, x1:x2])
    assert canvas.shape == (32, 32, 3) and (where[2] - where[0], where[3] - where[1]) == (x2 - x1, y2 - y1)
    found, scores = image_guided_detection(model, scene.image, scene.image[y1:y2, x1:x2], threshold=0.0)
    assert found.shape == (16, 4) and scores.shape == (16,)


# ---------------------------------------------------------------------------- evaluation on known answers
def test_precision_recall_curve_on_hand_built_detections():
    gts = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 0])}]
    preds = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]),
              "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 0, 0])}]
    curve = precision_recall_curve(preds, gts)
    np.testing.assert_allclose(curve["precision"], [1.0, 0.5, 2 / 3])  # the duplicate is a false positive
    np.testing.assert_allclose(curve["recall"], [0.5, 0.5, 1.0])


def test_detection_eval_runs_on_a_tiny_model(world):
    from minivl.grounding import detection_eval, referring_eval
    model = tiny()
    r = detection_eval(model, world, "test", 6, "combos")
    assert 0 <= r["AP"] <= r["AP50"] <= 1
    ref = referring_eval(model, world, "test", 4)
    assert 0 <= ref["all"] <= 1


# ---------------------------------------------------------------------------- bad input (the list)
def test_empty_caption_raises(world):
    with pytest.raises(ValueError, match="empty"):
        predict(tiny(), world.scene(0).image, "   ")


def test_caption_of_only_separators_raises(world):
    with pytest.raises(ValueError, match="only separators"):
        predict(tiny(), world.scene(0).image, " . . ")


@pytest.mark.parametrize("kwargs", [dict(box_threshold=1.5), dict(box_threshold=-0.1), dict(text_threshold=2.0)])
def test_thresholds_outside_unit_interval_raise(world, kwargs):
    with pytest.raises(ValueError, match="threshold"):
        predict(tiny(), world.scene(0).image, "circle", **kwargs)


def test_inverted_training_box_raises(world, tokenizer):
    with pytest.raises(ValueError, match="x2 >= x1"):
        boxes_to_targets([[10, 5, 4, 20]], 32)
    model = tiny()
    batch = make_batch(world, [world.scene(0)], tokenizer, 40)
    batch["target_boxes"][0, 0, 2] = -0.1  # a negative width: x2 < x1 in cxcywh
    with pytest.raises(ValueError, match="x2 < x1"):
        model.loss(batch)


def test_image_of_wrong_shape_raises():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        predict(model, np.zeros((64, 64, 3), np.uint8), "circle")
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        predict(model, torch.zeros(3, 16, 16), "circle")


def test_every_parameter_but_clips_pooling_path_gets_a_gradient(world, tokenizer):
    model = tiny().train()
    loss, _ = model.loss(make_batch(world, [world.scene(i) for i in range(2)], tokenizer, 40))
    loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    # OWL-ViT reads every patch token, not CLIP's pooled image embedding, and has no contrastive temperature
    assert no_grad == {"clip.visual_projection.weight", "clip.logit_scale"}


# ---------------------------------------------------------------------------- options added later
def test_batched_pairwise_giou_equals_the_checked_per_image_call():
    from minivl.grounding.matcher import pairwise_giou
    from minivl.metrics.boxes import generalized_box_iou
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.rand(3, 16, 4, generator=g) * 0.5 + 0.05, torch.rand(3, 5, 4, generator=g) * 0.5 + 0.05
    tgt[1, 3:] = 0.0  # padding targets (zero boxes) stay finite
    xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    want = torch.stack([generalized_box_iou(xyxy(p), xyxy(t)) for p, t in zip(pred, tgt)])
    torch.testing.assert_close(pairwise_giou(pred, tgt), want, atol=1e-6, rtol=0)


def test_fusion_starts_as_plain_owlvit_and_then_depends_on_the_query(world, tokenizer):
    plain = tiny()
    fused = tiny(fusion_depth=1)
    fused.load_state_dict(plain.state_dict(), strict=False)  # the towers and heads; the enhancer keeps its init
    assert set(fused.state_dict()) - set(plain.state_dict()) == {k for k in fused.state_dict() if k.startswith("fusion.")}
    fused.tokenizer = plain.tokenizer = tokenizer
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    q = fused.tokenize(["the leftmost object", "the object left of the red circle", "the rightmost object"])
    torch.testing.assert_close(fused(images, **q, fuse=True).logits, plain(images, **q).logits, atol=1e-5, rtol=0)
    with torch.no_grad():  # a trained enhancer: every residual branch moved off zero
        for p in fused.fusion.parameters():
            p.add_(0.2 * torch.randn_like(p))
    out = fused(images, **q, fuse=True).logits
    assert not torch.allclose(out, plain(images, **q).logits, atol=1e-3)
    torch.testing.assert_close(fused(images, **q).logits, plain(images, **q).logits)  # fuse=False: plain OWL-ViT
    # one query at a time gives the same fused logits: the enhancer runs per (image, query)
    one = fused(images, **fused.tokenize(["the object left of the red circle"]), fuse=True).logits
    torch.testing.assert_close(one[..., 0], out[..., 1], atol=1e-5, rtol=0)
    box, score = ground(fused, world.scene(0, "test").image, "the leftmost object")
    assert box.shape == (4,) and 0 <= float(score) <= 1
    with pytest.raises(ValueError, match="fuse=True needs text queries"):
        fused(images, query_embeds=torch.randn(2, fused.config.clip.embed_dim), fuse=True)
    with pytest.raises(ValueError, match="fusion_depth"):
        OWLViTConfig(fusion_depth=-1)


def test_fusion_trains_on_the_referring_columns(world, tokenizer):
    model = tiny(fusion_depth=1).train()
    batch = make_batch(world, [world.scene(i) for i in range(4)], tokenizer, 40, np.random.default_rng(0))
    V = int((~batch["query_fused"]).sum())
    assert batch["query_fused"][V:].all() and (batch["query_index"][:, V:] >= 0).any()  # referring columns last
    loss, _ = model.loss(batch)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("fusion."))
    assert model.fusion.query_in.weight.grad.abs().sum() > 0
    plain_loss, _ = model.loss({k: v for k, v in batch.items() if k != "query_fused"})  # no flags: no fusion
    torch.testing.assert_close(plain_loss, loss, atol=1e-5, rtol=0)  # (the enhancer is still the identity)


def test_referring_eval_asks_each_scene_its_own_expressions(world, tokenizer):
    from minivl.grounding import referring_eval
    model = tiny()
    model.tokenizer = tokenizer
    res = referring_eval(model, world, "test", 4, batch_size=3)
    n = sum(len(world.referring(world.scene(i, "test"))) for i in range(4))
    assert sum(res[f"n_{k}"] for k in ("attribute", "relation", "extreme") if f"n_{k}" in res) == n
    scene = world.scene(0, "test")
    ref = world.referring(scene)[0]
    box, _ = ground(model, scene.image, ref.text)  # the first expression of scene 0, as ground finds it
    alone = referring_eval(model, world, "test", 1, batch_size=1)
    assert alone["all"] == referring_eval(model, world, "test", 1, batch_size=5)["all"]
    assert box.shape == (4,)


def test_class_positions_reach_the_class_head_not_the_boxes():
    from minivl.vit import sincos_2d
    plain, where = tiny(), tiny(class_positions=True)
    where.load_state_dict({**plain.state_dict(), "class_pos": where.class_pos.detach()})
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = torch.randint(0, 500, (3, 6))
    a, b = plain(img, ids), where(img, ids)
    assert torch.equal(a.pred_boxes, b.pred_boxes) and not torch.allclose(a.logits, b.logits)
    feats = plain.image_features(img)
    assert torch.allclose(b.class_embeds, plain.class_head.dense0(feats + sincos_2d(plain.config.grid, feats.shape[-1])),
                          atol=1e-6)
    with pytest.raises(TypeError, match="class_positions"):
        tiny(class_positions=1)


def test_neighbourhood_stacks_each_patch_3x3_block():
    from minivl.vit import neighbourhood
    g, D = 4, 2
    tokens = torch.randn(2, g * g, D)
    out = neighbourhood(tokens, g)  # (B, N, 9 D), channel-major: index d * 9 + (dy + 1) * 3 + (dx + 1)
    assert out.shape == (2, g * g, 9 * D)
    grid = tokens.reshape(2, g, g, D)
    for y, x in [(0, 0), (1, 2), (3, 3)]:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                k = (dy + 1) * 3 + (dx + 1)
                got = out[:, y * g + x, k::9]  # (B, D)
                inside = 0 <= y + dy < g and 0 <= x + dx < g
                want = grid[:, y + dy, x + dx] if inside else torch.zeros(2, D)
                torch.testing.assert_close(got, want)


def test_box_detail_reaches_the_boxes_not_the_class_head(world, tokenizer):
    plain, detail = tiny(), tiny(box_detail=True)
    shared = {k: v for k, v in plain.state_dict().items() if not k.startswith("box_head.")}
    missing = detail.load_state_dict(shared, strict=False).missing_keys
    assert missing and all(k.startswith(("box_head.", "box_detail.")) for k in missing)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = torch.randint(0, 500, (3, 6))
    a, b = plain(img, ids), detail(img, ids)
    torch.testing.assert_close(a.logits, b.logits)  # one tower pass, the same merged tokens and class head
    torch.testing.assert_close(a.image_embeds, b.image_embeds)
    feats, first = detail.encode_image(img)
    assert first.shape == (2, feats.shape[1], 9 * feats.shape[2])
    torch.testing.assert_close(detail.boxes(feats, first), b.pred_boxes)
    # the detail path carries the first layer: zeroing it moves the boxes
    assert not torch.allclose(detail.boxes(feats, torch.zeros_like(first)), b.pred_boxes)
    with pytest.raises(ValueError, match="box_detail"):
        detail.boxes(feats)
    with pytest.raises(TypeError, match="box_detail"):
        tiny(box_detail=1)
    loss, _ = detail.loss(make_batch(world, [world.scene(i) for i in range(2)], tokenizer, 40))
    loss.backward()
    assert detail.box_detail.weight.grad.abs().sum() > 0 and detail.clip.visual.patch_embed.weight.grad is not None


def test_recipe_head_lr_scale_reaches_the_heads_only():
    from minivl.recipes.grounding import HEADS, GroundingRecipe
    model = tiny(fusion_depth=1, class_positions=True, box_detail=True)
    names = [n for n, _ in model.named_parameters()]
    assert all(any(n.startswith(h) for n in names) for h in HEADS)  # every prefix names real parameters
    assert not any(n.startswith(h) for n in names if n.startswith("clip.") for h in HEADS)
    with pytest.raises(ValueError, match="head_lr_scale"):
        GroundingRecipe(steps=10, batch_size=2, lr=1e-3, warmup_steps=1, weight_decay=0.0, head_lr_scale=0.0)


def test_prefetched_batches_are_the_same_batches(world, tokenizer):
    from minivl.recipes.grounding import make_batches
    plain = make_batches(world, tokenizer, 3, 40, 2, seed=1)
    ahead = make_batches(world, tokenizer, 3, 40, 2, seed=1, prefetch=True)
    for step in (0, 1, 2, 7, 8, 3):  # in order, then a jump forward and one back (a resume)
        a, b = plain(step), ahead(step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
