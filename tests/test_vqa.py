"""ViLT-style VQA: shapes, the loss, packing == one question at a time, padding, save/load, the
seed's three lines, parity with transformers, the data helpers, and every bad-input case."""
import json

import numpy as np
import pytest
import torch

from minivl.data import image_to_tensor, world_tokenizer
from minivl.vqa import (Packer, ViltConfig, ViltForQuestionAnswering, answer_vocabulary, check_records,
                        count_confusion, load_vqa_v2, predict_scenes, records_to_scenes, score, soft_scores,
                        world_scenes)
from minivl.vqa.processor import ViltProcessor
from minivl.world import World

ANSWERS = ("yes", "no", "2", "red", "left")


@pytest.fixture(scope="module")
def tok():
    return world_tokenizer()


@pytest.fixture(scope="module")
def world():
    return World(image_size=32, max_objects=3)


def tiny(seed=0, answers=ANSWERS, **kw):
    torch.manual_seed(seed)
    return ViltForQuestionAnswering(ViltConfig.preset("tiny", answers=tuple(answers), **kw)).eval()


def packed_batch(world, tok, model, n=2):
    scenes = world_scenes(world, "train", n)
    packer = Packer(tok, model.config.label2id, model.config.context_length)
    images = image_to_tensor(np.stack([s["image"] for s in scenes]))
    return scenes, packer(images, [s["questions"] for s in scenes], [s["answers"] for s in scenes])


# ---------------------------------------------------------------------------- model
def test_shapes_and_id2label(tok):
    m = tiny()
    enc = tok(["is there a circle?", "how many squares are there?"], padding="longest")
    out = m(enc["input_ids"], torch.zeros(2, 3, 32, 32), enc["attention_mask"])
    assert out.logits.shape == (2, 5) and out.pooled.shape == (2, 32)
    assert out.tokens.shape == (2, enc["input_ids"].shape[1] + 1 + 16, 32)
    assert m.config.id2label[3] == "red" and m.config.label2id["left"] == 4


def test_loss_at_init_is_answers_times_log2():
    m = tiny(answers=[str(i) for i in range(40)])
    torch.nn.init.zeros_(m.head[3].weight)
    torch.nn.init.zeros_(m.head[3].bias)
    targets = torch.zeros(3, 40)
    targets[:, 0] = 1
    batch = {"pixel_values": torch.zeros(3, 3, 32, 32), "input_ids": torch.randint(0, 500, (3, 6)),
             "attention_mask": torch.ones(3, 6), "targets": targets}
    loss, logs = m.loss(batch)
    assert loss.item() == pytest.approx(40 * np.log(2), rel=1e-5)
    assert set(logs) >= {"acc", "vqa_loss"}


def test_fan_in_init_scales_the_fusion_weights():
    torch.manual_seed(0)
    gpt2 = ViltForQuestionAnswering(ViltConfig.preset("tiny", answers=ANSWERS))
    fan = ViltForQuestionAnswering(ViltConfig.preset("tiny", answers=ANSWERS, fan_in_init=True))
    width, depth = fan.config.width, fan.config.depth
    block, block0 = fan.transformer.blocks[0], gpt2.transformer.blocks[0]
    assert block0.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.attn.q_proj.weight.std().item() == pytest.approx(width ** -0.5, rel=0.1)
    hidden = block.mlp.fc2.in_features  # residual outputs get a further 1 / sqrt(2 depth)
    assert block.mlp.fc2.weight.std().item() == pytest.approx(hidden ** -0.5 / (2 * depth) ** 0.5, rel=0.1)
    assert torch.equal(fan.head[3].bias, gpt2.head[3].bias)  # the answer prior is untouched
    with pytest.raises(TypeError, match="fan_in_init"):
        ViltConfig.preset("tiny", answers=ANSWERS, fan_in_init=1)


def test_packed_equals_one_question_at_a_time(world, tok):
    m = tiny(answers=world.answers, image_attends_text=False)
    scenes, batch = packed_batch(world, tok, m)
    logits = m.forward_packed(*(batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "question_index",
                                                   "position_ids", "question_starts")))
    for b, s in enumerate(scenes):
        enc = tok(s["questions"], padding="longest")
        single = m(enc["input_ids"], batch["pixel_values"][[b] * len(s["questions"])], enc["attention_mask"]).logits
        assert torch.allclose(logits[b, :len(s["questions"])], single, atol=1e-5)


def test_position_every_layer_adds_the_positions_before_each_later_block(world, tok):
    m = tiny(answers=world.answers, image_attends_text=False, position_every_layer=True)
    scenes, batch = packed_batch(world, tok, m)  # packing still gives what one question at a time gives
    logits = m.forward_packed(*(batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "question_index",
                                                   "position_ids", "question_starts")))
    enc = tok(scenes[0]["questions"], padding="longest")
    single = m(enc["input_ids"], batch["pixel_values"][[0] * len(scenes[0]["questions"])], enc["attention_mask"])
    assert torch.allclose(logits[0, :len(scenes[0]["questions"])], single.logits, atol=1e-5)
    plain = tiny(answers=world.answers, image_attends_text=False)  # same seed, same weights: only the re-adding differs
    other = plain(enc["input_ids"], batch["pixel_values"][[0] * len(scenes[0]["questions"])], enc["attention_mask"])
    assert not torch.allclose(single.tokens, other.tokens, atol=1e-3)
    for attends in (True, False):  # non-square images use their own grid of positions
        w = tiny(position_every_layer=True, image_attends_text=attends)
        out = w(torch.randint(0, 500, (2, 5)), torch.zeros(2, 3, 32, 48))
        assert out.tokens.shape[1] == 5 + 1 + 4 * 6 and torch.isfinite(out.logits).all()
    with pytest.raises(TypeError, match="position_every_layer"):
        tiny(position_every_layer=1)
    pytest.importorskip("transformers")
    from minivl.vqa.convert import hf_config_from
    with pytest.raises(ValueError, match="position_every_layer"):  # transformers' ViLT adds them once
        hf_config_from(ViltConfig.preset("tiny", answers=ANSWERS, image_attends_text=True, position_every_layer=True))


def test_position_scale_sets_the_start_of_the_patch_positions():
    from minivl.vit import sincos_2d
    a, b = tiny(position_scale=0.1), tiny(position_scale=1.0)
    assert torch.allclose(b.image_pos[1:], 10 * a.image_pos[1:]) and torch.allclose(b.image_pos[1:], sincos_2d(4, 32))
    with pytest.raises(ValueError, match="position_scale"):
        tiny(position_scale=-0.5)


@pytest.mark.parametrize("attends", [True, False])
def test_padding_does_not_change_the_answer(tok, attends):
    m = tiny(image_attends_text=attends)
    short = tok(["is there a red circle?"])
    padded = tok(["is there a red circle?", "what shape is the object closest to the small blue square?"],
                 padding="longest")
    pix = torch.rand(2, 3, 32, 32) * 2 - 1
    a = m(short["input_ids"], pix[:1], short["attention_mask"]).logits
    b = m(padded["input_ids"], pix, padded["attention_mask"]).logits[:1]
    assert torch.allclose(a, b, atol=1e-5)


def test_other_image_sizes_interpolate_positions():
    m = tiny()
    ids = torch.randint(0, 500, (1, 5))
    out = m(ids, torch.zeros(1, 3, 48, 48))
    assert out.tokens.shape[1] == 5 + 1 + 36 and torch.isfinite(out.logits).all()


@pytest.fixture
def one_thread():
    """Tiny steps are all overhead: one thread is faster than two fighting over a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_overfits_one_packed_batch(world, tok, one_thread):
    m = tiny(answers=world.answers, image_attends_text=False).train()
    scenes = world_scenes(world, "train", 2)
    packer = Packer(tok, m.config.label2id, m.config.context_length)
    batch = packer(image_to_tensor(np.stack([s["image"] for s in scenes])), [s["questions"][:5] for s in scenes],
                   [s["answers"][:5] for s in scenes])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = m.loss(batch)[0].item()
    for _ in range(150):
        loss, logs = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["acc"].item() >= 0.8 and loss.item() < first / 4  # these answers need the image: grounding is learned


def test_save_load_round_trip(tmp_path, tok):
    m = tiny(stem="conv", image_attends_text=False)
    m.save(tmp_path / "vqa", tok)
    back = ViltForQuestionAnswering.load(tmp_path / "vqa").eval()
    assert back.config == m.config and back.config.id2label == m.config.id2label
    ids, pix = torch.randint(0, 500, (2, 7)), torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(m(ids, pix).logits, back(ids, pix).logits)
    assert back.tokenizer is not None


def test_itm_head_trains():
    m = tiny(itm=True).train()
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "input_ids": torch.randint(0, 500, (2, 6)),
             "attention_mask": torch.ones(2, 6), "targets": torch.zeros(2, 5),
             "itm_pixel_values": torch.rand(2, 3, 32, 32), "itm_input_ids": torch.randint(0, 500, (2, 6)),
             "itm_attention_mask": torch.ones(2, 6), "itm_labels": torch.tensor([0, 1])}
    loss, logs = m.loss(batch)
    loss.backward()
    assert "itm_loss" in logs and m.itm_head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- the seed's three lines
def test_processor_model_id2label_three_lines(tok):
    model = tiny()
    model.tokenizer = tok
    processor = ViltProcessor.from_model(model)
    image = np.full((50, 70, 3), 200, np.uint8)  # any size: resized to the model's
    encoding = processor(image, "how many circles are there?", return_tensors="pt")
    assert set(encoding) == {"input_ids", "attention_mask", "pixel_values"}
    assert encoding["pixel_values"].shape == (1, 3, 32, 32)
    outputs = model(**encoding)
    assert model.config.id2label[outputs.logits.argmax(-1).item()] in ANSWERS


# ---------------------------------------------------------------------------- parity
def _random_hf(tiny_cfg=True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViltConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=32, patch_size=8, max_position_embeddings=16,
                                  max_image_length=-1, num_labels=5, id2label=dict(enumerate(ANSWERS)),
                                  label2id={a: i for i, a in enumerate(ANSWERS)})
    hf = transformers.ViltForQuestionAnswering(cfg).eval()
    with torch.no_grad():  # off the default init, so a swapped name cannot pass by luck
        for n, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def test_parity_with_transformers_vilt():
    from minivl.vqa.convert import from_transformers, to_transformers
    hf = _random_hf()
    m = from_transformers(hf)
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    pix = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = hf.vilt(input_ids=ids, attention_mask=mask, pixel_values=pix)
        ref_logits = hf(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        out = m(ids, pix, mask)
        back = to_transformers(m)(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
    assert torch.allclose(out.pooled, ref.pooler_output, atol=1e-5)
    assert torch.allclose(out.logits, ref_logits, atol=1e-5)
    assert torch.allclose(back, ref_logits, atol=1e-5)
    # every patch is kept (max_image_length=-1), only shuffled: the same set of patch tokens
    ours, theirs = out.tokens[:, 11:], ref.last_hidden_state[:, 11:]
    assert torch.allclose(ours.sort(1).values, theirs.sort(1).values, atol=1e-4)
    assert m.config.id2label == hf.config.id2label


# ---------------------------------------------------------------------------- data
def test_answer_vocabulary_most_frequent_first_normalised_and_capped():
    vocab = answer_vocabulary([["Two", "2", "2"], ["yes"], ["Yes!", "no"], ["a dog"]], max_size=3)
    assert vocab == ("2", "yes", "dog")


def test_soft_scores_follow_the_vqa_metric():
    s = soft_scores(["2"] * 3 + ["3"] * 7, {"2": 0, "3": 1, "4": 2})
    assert s.tolist() == pytest.approx([0.9, 1.0, 0.0])
    assert soft_scores(["red"], {"red": 0, "blue": 1}).tolist() == [1.0, 0.0]


def test_unseen_test_answers_count_wrong():
    scenes = [{"questions": ["q1", "q2"], "answers": [["purple"], ["yes"]], "types": ["color", "exists"]}]
    assert score(scenes, [["red", "yes"]]) == {"overall": 0.5, "color": 0.0, "exists": 1.0}


def test_count_confusion_rows_are_truth():
    scenes = [{"questions": ["a", "b", "c"], "answers": [["2"], ["1"], ["red"]], "types": ["count", "count", "color"]}]
    cm = count_confusion(scenes, [["2", "3", "red"]], max_count=4)
    assert cm[2, 2] == 1 and cm[1, 3] == 1 and cm.sum() == 2


def _write_vqa_folder(root, world, n=6):
    (root / "images").mkdir(parents=True)
    import matplotlib.image as mpimg
    qs, anns, qid = [], [], 0
    for i in range(n):
        s = world.scene(i, "train")
        mpimg.imsave(root / "images" / f"COCO_train2014_{i:012d}.png", s.image)
        for q in world.questions(s)[:4]:
            qs.append({"question_id": qid, "image_id": i, "question": q.question})
            anns.append({"question_id": qid, "image_id": i, "question_type": q.type,
                         "answers": [{"answer": q.answer, "answer_id": j} for j in range(10)]})
            qid += 1
    (root / "v2_OpenEnded_questions.json").write_text(json.dumps({"questions": qs}))
    (root / "v2_mscoco_annotations.json").write_text(json.dumps({"annotations": anns}))


def test_vqa_v2_files_train_and_evaluate(tmp_path, world):
    from minivl.recipes import vqa as recipe
    _write_vqa_folder(tmp_path / "vqa", world)
    records = load_vqa_v2(tmp_path / "vqa")
    assert len(records) == 24 and len(records[0]["answers"]) == 10 and records[0]["image"].endswith(".png")
    m = recipe.run("tiny", steps=2, data=tmp_path / "vqa", progress=False, out=tmp_path / "run",
                   checkpoint=tmp_path / "ckpt")
    assert m["data"] == "own" and 0 <= m["accuracy"]["test"]["overall"] <= 1
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "ckpt" / "config.json").is_file()


def test_in_memory_records_of_any_size(tmp_path, world):
    from minivl.recipes import vqa as recipe
    rng = np.random.default_rng(0)
    train = [{"image": rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8), "question": "is it red?",
              "answers": ["yes" if i % 2 else "no"]} for i in range(6)]
    m = recipe.run("tiny", steps=2, train=train, test=train[:2], progress=False, out=tmp_path / "r",
                   checkpoint=tmp_path / "c")
    assert m["answers"] == 2 and set(m["accuracy"]["test"]) == {"overall", "all"}


def test_shapes_world_scenes_predict_and_score(world, tok):
    m = tiny(answers=world.answers, image_attends_text=False)
    scenes = world_scenes(world, "test", 3)
    preds = predict_scenes(m, scenes, tok)
    assert [len(p) for p in preds] == [len(s["questions"]) for s in scenes]
    table = score(scenes, preds)
    assert set(table) >= {"overall", "count", "exists"}
    grouped = records_to_scenes([{"image": "a.png", "question": "q", "answers": ["x"]}] * 2)
    assert len(grouped) == 1 and len(grouped[0]["questions"]) == 2


def test_late_fusion_baseline_trains_on_frozen_clip(world, tok):
    from minivl.clip import CLIP, CLIPConfig
    from minivl.vqa.baseline import ClipFeatures, predict_late_fusion, train_late_fusion
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig.preset("tiny", pad_id=tok.pad_id))
    feats = ClipFeatures(clip, tok)
    scenes = world_scenes(world, "train", 4)
    mlp = train_late_fusion(feats, scenes, tuple(world.answers), steps=5, batch_size=16, hidden=16)
    preds = predict_late_fusion(mlp, feats, scenes)
    assert [len(p) for p in preds] == [len(s["questions"]) for s in scenes]
    assert all(p in world.answers for row in preds for p in row)


# ---------------------------------------------------------------------------- bad input
def test_question_longer_than_the_context_is_an_error_unless_truncated(tok):
    m = tiny()
    proc = ViltProcessor(tok, 32, m.config.context_length)
    long_q = "is there a red circle left of the blue square " * 6
    with pytest.raises(ValueError, match="longer than the text context"):
        proc(np.zeros((32, 32, 3), np.uint8), long_q)
    enc = proc(np.zeros((32, 32, 3), np.uint8), long_q, truncation=True)
    assert enc["input_ids"].shape[1] == m.config.context_length
    with pytest.raises(ValueError, match="longer than the model's text context"):
        m(torch.zeros(1, 40, dtype=torch.long), torch.zeros(1, 3, 32, 32))


def test_image_of_the_wrong_dtype(tok):
    with pytest.raises(ValueError, match="uint8"):
        ViltProcessor(tok, 32)(np.zeros((32, 32, 3), np.float32), "is there a circle?")


def test_image_with_the_wrong_channel_count(tok):
    with pytest.raises(ValueError, match="3 channels"):
        ViltProcessor(tok, 32)(np.zeros((32, 32, 4), np.uint8), "is there a circle?")
    with pytest.raises(ValueError, match="3 channels"):
        tiny()(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 1, 32, 32))


def test_empty_batch(tok):
    with pytest.raises(ValueError, match="empty batch"):
        ViltProcessor(tok, 32)([], [])
    with pytest.raises(ValueError, match="empty"):
        tiny()(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 3, 32, 32))


def test_answer_vocabulary_of_size_zero():
    with pytest.raises(ValueError, match="answer vocabulary is empty"):
        ViltConfig(answers=())
    with pytest.raises(ValueError, match="answer vocabulary is empty"):
        answer_vocabulary([[""], []])


def test_records_missing_a_field_name_the_record_and_field():
    good = {"image": np.zeros((8, 8, 3), np.uint8), "question": "q?", "answers": ["a"]}
    with pytest.raises(ValueError, match=r"records\[1\] is missing the field 'answers'"):
        check_records([good, {"image": good["image"], "question": "q?"}])
    with pytest.raises(ValueError, match="empty"):
        check_records([])


def test_question_only_baseline_answers_from_the_language_prior():
    from minivl.vqa.eval import question_only_predictions
    train = [{"questions": ["is there a cat?", "how many?"], "answers": [["yes"], ["2"]], "types": ["exists", "count"]},
             {"questions": ["is there a cat?"], "answers": [["yes"]], "types": ["exists"]}]
    test = [{"questions": ["is there a cat?", "how many dogs?"], "answers": [["no"], ["2"]], "types": ["exists", "count"]}]
    assert question_only_predictions(train, test) == [["yes", "2"]]


# ---------------------------------------------------------------------------- region supervision (option)
def test_patch_labels_follow_the_boxes():
    from minivl.vqa import patch_labels
    from minivl.world import SIZES, Obj
    att = {"color": ("red", "blue"), "shape": ("circle", "square"), "size": SIZES}
    objs = [Obj("square", "blue", "large", (0, 0, 16, 16)), Obj("circle", "red", "small", (20, 16, 30, 26))]
    lab = patch_labels(objs, 32, 4, att).reshape(4, 4, 3)  # 8-px patches
    assert lab[0, 0].tolist() == lab[1, 1].tolist() == [1, 1, 1]  # fully inside the blue large square
    assert lab[3, 0].tolist() == [2, 2, 2]  # no box touches it: "none" = the last class
    assert lab[2, 2].tolist() == [0, 0, 0]  # 4 of 8 columns x all 8 rows = 50% red circle
    assert lab[3, 3].tolist() == [-100] * 3  # 6 x 2 / 64 = 19%: grazed, ignored
    assert patch_labels([], 32, 4, att).tolist() == [[2, 2, 2]] * 16


def test_region_loss_is_off_by_default_and_adds_a_term_when_on(world, tok):
    from minivl.recipes.vqa import make_batches
    off = tiny(answers=world.answers)
    on = tiny(answers=world.answers, patch_classes=(len(world.config.colors) + 1, len(world.config.shapes) + 1, 3),
              patch_loss=0.5)
    assert off.patch_head is None
    for a, b in zip(off.state_dict().items(), on.state_dict().items()):  # the option off = the same weights
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    batch = make_batches(world, Packer(tok, off.config.label2id, off.config.context_length), 2, region_grid=4)(0)
    assert batch["patch_labels"].shape == (2, 16, 3)
    loss_off, logs_off = off.loss(batch)
    loss_on, logs_on = on.loss(batch)
    assert "patch_loss" not in logs_off and logs_on["patch_loss"] > 0
    assert torch.allclose(loss_on, logs_on["vqa_loss"] + 0.5 * logs_on["patch_loss"])
    assert torch.allclose(logs_on["vqa_loss"], logs_off["vqa_loss"])  # the head reads, never changes, the tokens
    loss_on.backward()
    assert on.patch_head.weight.grad.abs().sum() > 0 and on.transformer.blocks[0].attn.q_proj.weight.grad is not None
    with pytest.raises(ValueError, match="patch_labels must be"):
        on.loss({**batch, "patch_labels": batch["patch_labels"][:, :3]})
    with pytest.raises(ValueError, match="patch_classes"):
        ViltConfig.preset("tiny", answers=ANSWERS, patch_classes=(1,))
    assert "patch_labels" not in make_batches(world, Packer(tok, off.config.label2id, 24), 2)(0)


def test_region_loss_is_finite_when_an_attribute_has_no_label_in_the_batch():
    m = tiny(patch_classes=(3, 3))
    tokens = torch.randn(2, 5 + 1 + 16, 32)
    labels = torch.full((2, 16, 2), -100)
    labels[:, :, 0] = 1
    loss = m.region_loss(tokens, labels)
    first = torch.nn.functional.cross_entropy(m.patch_head(tokens[:, -16:])[..., :3].flatten(0, 1), labels[..., 0].flatten())
    assert torch.isfinite(loss) and torch.allclose(loss, first)  # the unlabelled attribute adds nothing
