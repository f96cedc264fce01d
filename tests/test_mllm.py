"""The LLaVA-style multimodal LLM: bridge, chat template, processor, generation, parity, training."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minivl import mllm
from minivl.mllm import chat
from minivl.mllm.data import (collate_chats, load_llava_json, pack_chats, question_chat, single_turns, world_batches,
                              write_llava_folder)
from minivl.mllm.eval import parse_box
from minivl.world import World

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only oversubscribe the cores


@pytest.fixture(scope="module")
def world():
    return World(image_size=32)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = mllm.LlavaModel(mllm.MLLMConfig.preset("tiny")).eval()
    return model, mllm.LlavaProcessor.from_model(model)


def _images(world, n, split="test"):
    return [world.scene(i, split).image for i in range(n)]


# ---------------------------------------------------------------- the bridge
def test_image_tokens_are_penultimate_patches_projected(tiny, world):
    model, processor = tiny
    pixels = processor(text="<image>", images=_images(world, 1))["pixel_values"]
    feats = model.get_image_features(pixels)
    assert feats.shape == (1, model.config.num_image_tokens, model.config.lm.width) == (1, 16, 32)
    hidden = model.vision(pixels, output_hidden_states=True).hidden_states  # depth + 1 states
    by_hand = model.projector(hidden[len(hidden) - 2][:, 1:])  # penultimate layer, class token dropped
    torch.testing.assert_close(feats, by_hand)
    lin1, lin2 = model.projector.layers
    torch.testing.assert_close(feats, lin2(torch.nn.functional.gelu(lin1(hidden[-2][:, 1:]))))


def test_pixel_shuffle_regroups_neighbours():
    x = torch.arange(16).float().reshape(1, 16, 1)  # a 4 x 4 grid of patch ids, row-major
    y = mllm.pixel_shuffle(x, 2)  # (1, 4, 4): one token per 2 x 2 block
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [0, 1, 4, 5] and y[0, 3].tolist() == [10, 11, 14, 15]
    cfg = mllm.MLLMConfig.preset("tiny", pixel_shuffle=2)
    assert cfg.num_image_tokens == mllm.MLLMConfig.preset("tiny").num_image_tokens // 4
    model = mllm.LlavaModel(cfg)
    assert model.get_image_features(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 32)
    with pytest.raises(ValueError, match="divide the patch grid"):
        mllm.MLLMConfig.preset("tiny", pixel_shuffle=3)


def test_vision_is_frozen_and_stage_freezing(tiny):
    model = mllm.LlavaModel(mllm.MLLMConfig.preset("tiny"))
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.train()
    assert not model.vision.training and model.lm.training


# ---------------------------------------------------------------- chat template and processor
def test_chat_template_and_readable_spelling(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": "<image>\nWhat is in this image?"}, {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "Sure?"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|user|><image>\nWhat is in this image?<|end|><|assistant|>A cat.<|end|><|user|>Sure?<|end|><|assistant|>"
    readable = "USER: <image>\nWhat is in this image?\nASSISTANT: A cat.\nUSER: Sure?\nASSISTANT:"
    assert chat.normalize(readable) == text
    assert processor.encode(readable) == processor.encode(text)
    llava = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yes"}]
    assert chat.apply_chat_template(llava) == "<|user|><image>\nhi<|end|><|assistant|>yes<|end|>"


def test_loss_mask_is_assistant_tokens_only(tiny):
    _, processor = tiny
    conv = [{"from": "human", "value": "<image>\nIs there a square?"}, {"from": "gpt", "value": "no"},
            {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "There are 2 objects."}]
    ids, labels = processor.encode_conversation(conv)
    tok = processor.tokenizer
    kept = [i for i, lab in zip(ids, labels) if lab != chat.IGNORE]
    assert tok.decode(kept, skip_special_tokens=False) == "no<|end|>There are 2 objects.<|end|>"
    assert all(lab == chat.IGNORE for i, lab in zip(ids, labels) if i == processor.image_token_id)
    assert ids.count(processor.image_token_id) == processor.num_image_tokens


def test_image_expansion_and_left_padding(tiny, world):
    _, processor = tiny
    out = processor(text=["<image>\nhi", "a <image> b <image>"], images=[[_images(world, 1)[0]], _images(world, 2)])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    assert (ids == processor.image_token_id).sum(1).tolist() == [16, 32]
    assert mask[0, 0] == 0 and mask[:, -1].tolist() == [1, 1]  # left padding: the ends line up
    assert (ids[mask == 0] == processor.pad_id).all()


def test_training_chats_give_one_answer_per_question(world):
    """The world's turns and the question types must not teach two answers to one question (the world's
    "How many objects are there?" -> "There are 3 objects." beside the count type's "3")."""
    for i in range(40):
        conv = question_chat(world, world.scene(i, "train"), np.random.default_rng(i), 8, True)
        assert conv[0]["value"].startswith(chat.IMAGE + "\n")
        asked = {}
        for user, reply in zip(conv[::2], conv[1::2]):
            q = user["value"].removeprefix(chat.IMAGE + "\n")
            assert asked.setdefault(q, reply["value"]) == reply["value"], (q, asked[q], reply["value"])


# ---------------------------------------------------------------- the model
def test_loss_at_uniform_logits_is_log_vocab(tiny, world):
    model, processor = tiny
    pixels = processor(text=["<image>"] * 2, images=_images(world, 2))["pixel_values"]
    batch = collate_chats(processor, pixels, [question_chat(world, world.scene(i, "train"), np.random.default_rng(i), 2,
                                                            False) for i in range(2)])
    m = mllm.LlavaModel(model.config)
    with torch.no_grad():
        m.lm.ln_final.weight.zero_()
        m.lm.ln_final.bias.zero_()  # every logit 0: the loss is exactly log V
    loss, logs = m.loss(batch)
    assert loss.item() == pytest.approx(math.log(model.config.lm.vocab_size), abs=1e-5)
    assert 0 <= logs["token_acc"] <= 1


def test_packed_chats_score_each_segment_as_if_alone(tiny, world):
    """pack_chats puts a scene's exchanges behind one image: each segment's logits and loss must be those
    of its own single-exchange chat (no segment reads another, positions restart after the image)."""
    model, processor = tiny
    scenes = [world.scene(i, "train") for i in range(2)]
    pixels = processor(text=["<image>"] * 2, images=[s.image for s in scenes])["pixel_values"]
    chats = [single_turns(question_chat(world, s, np.random.default_rng(i), 3, True)) for i, s in enumerate(scenes)]
    assert all(len(c) >= 3 for c in chats)
    packed = pack_chats(processor, pixels, chats)
    assert packed["segment_ids"][0, 0] == -1 and packed["segment_ids"][0].max() == len(chats[0]) - 1
    logits = model(packed["input_ids"], packed["attention_mask"], pixels, position_ids=packed["position_ids"],
                   segment_ids=packed["segment_ids"])  # (B, T, V)
    total, n = 0.0, 0
    for b, row in enumerate(chats):
        for k, one in enumerate(row):
            alone = collate_chats(processor, pixels[b:b + 1], [one])
            ref = model(alone["input_ids"], alone["attention_mask"], pixels[b:b + 1])[0]  # (T1, V)
            where = (packed["segment_ids"][b] == k) | (packed["segment_ids"][b] == -1)
            torch.testing.assert_close(logits[b, where], ref[:int(where.sum())], atol=1e-5, rtol=1e-5)
            scored = alone["labels"][0, 1:] != chat.IGNORE
            total += torch.nn.functional.cross_entropy(ref[:-1][scored], alone["labels"][0, 1:][scored],
                                                       reduction="sum").item()
            n += int(scored.sum())
    loss, _ = model.loss(packed)  # the mean over every segment's answer tokens
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    # the leak the packing removes: without the segment mask the later segments read the earlier ones
    leaky = model(packed["input_ids"], packed["attention_mask"], pixels, position_ids=packed["position_ids"])
    assert not torch.allclose(leaky[packed["segment_ids"] == 1], logits[packed["segment_ids"] == 1], atol=1e-3)
    with pytest.raises(ValueError, match="need position_ids"):
        model(packed["input_ids"], packed["attention_mask"], pixels, segment_ids=packed["segment_ids"])
    with pytest.raises(ValueError, match="segment_ids must be"):
        model(packed["input_ids"], packed["attention_mask"], pixels, position_ids=packed["position_ids"],
              segment_ids=packed["segment_ids"][:, :-1])
    with pytest.raises(ValueError, match="one list of chats per image"):
        pack_chats(processor, pixels, chats[:1])
    # world_batches(pack=True): a batch's rows all carry the world's turns (describe, ...) or none does, so that
    # no batch pads its question rows to a describe row's length; both kinds occur
    from minivl.world_text import DESCRIBE
    kinds = []
    for step in range(8):
        batch = world_batches(world, processor, 3, 2, n_questions=2, world_turns=0.5, pack=True)(step)
        rows = [processor.decode(r, skip_special_tokens=False) for r in batch["input_ids"].tolist()]
        described = {any(d in r for d in DESCRIBE) for r in rows}
        assert len(described) == 1, rows
        kinds.append(described.pop())
    assert set(kinds) == {True, False}


def test_region_supervision_reads_the_lm_states_at_the_image_tokens(world):
    """MLLMConfig.patch_classes: the loss adds patch_loss x the region cross-entropy; with a zero head every class
    is equally likely, so that term is exactly sum(log classes) (one per attribute); wrong labels are refused."""
    from minivl.world import region_attributes
    classes = tuple(len(c) + 1 for c in region_attributes(world).values())
    torch.manual_seed(0)
    model = mllm.LlavaModel(mllm.MLLMConfig.preset("tiny", patch_classes=classes, patch_loss=0.5))
    processor = mllm.LlavaProcessor.from_model(model)
    grid = model.config.vision.grid // model.config.pixel_shuffle
    batch = world_batches(world, processor, 2, 2, n_questions=2, world_turns=0.0, pack=True, region_grid=grid)(0)
    assert batch["patch_labels"].shape == (2, model.config.num_image_tokens, 3)
    plain, _ = model.loss({k: v for k, v in batch.items() if k != "patch_labels"})
    with torch.no_grad():
        model.patch_head.weight.zero_()
        model.patch_head.bias.zero_()
    loss, logs = model.loss(batch)
    assert logs["patch_loss"].item() == pytest.approx(sum(math.log(k) for k in classes), rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 0.5 * logs["patch_loss"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="patch_labels must be"):
        model.loss({**batch, "patch_labels": batch["patch_labels"][:, :3]})
    with pytest.raises(ValueError, match="patch_classes"):
        mllm.MLLMConfig.preset("tiny", patch_classes=(1,))


def test_overfits_one_batch(world):
    torch.manual_seed(0)
    model = mllm.LlavaModel(mllm.MLLMConfig.preset("tiny"))
    processor = mllm.LlavaProcessor.from_model(model)
    batch = world_batches(world, processor, 2, 2, n_questions=2, world_turns=0.0)(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(80):
        loss, _ = model.loss(batch)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 < first


def test_batched_generation_equals_alone_and_cache(tiny, world):
    model, processor = tiny
    prompts = ["USER: <image>\nWhat is in this image?\nASSISTANT:", "USER: <image>\nHow many?\nASSISTANT: There"]
    images = _images(world, 2)
    batch = processor(text=prompts, images=images)
    together = model.generate(**batch, max_new_tokens=6)
    no_cache = model.generate(**batch, max_new_tokens=6, use_cache=False)
    assert torch.equal(together, no_cache)
    for i in range(2):
        alone = model.generate(**processor(text=prompts[i], images=images[i]), max_new_tokens=6)
        assert torch.equal(alone[0], together[i, :alone.shape[1]])
    texts = processor.batch_decode(together, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    sampled = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5,
                             generator=torch.Generator().manual_seed(0))
    assert sampled.shape[0] == 2


def test_save_load_round_trip(tiny, world, tmp_path):
    model, processor = tiny
    model.save(tmp_path / "m")
    back = mllm.LlavaModel.load(tmp_path / "m").eval()
    batch = processor(text="USER: <image>\nhi\nASSISTANT:", images=_images(world, 1))
    torch.testing.assert_close(back(**batch), model(**batch), rtol=0, atol=0)
    assert back.tokenizer is not None and back.config == model.config


# ---------------------------------------------------------------- parity with transformers
def test_full_logits_parity_with_transformers_llava(world):
    pytest.importorskip("transformers")
    from transformers import LlavaForConditionalGeneration

    from minivl.mllm import convert
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(convert.hf_config_from(mllm.MLLMConfig.preset("tiny"),
                                                              attn_implementation="eager")).eval()
    with torch.no_grad():  # larger weights than HF's std 0.02, so a wrong name or layout shows clearly
        for p in hf.parameters():
            p.mul_(5.0 if p.dim() > 1 else 1.0)
    ours = convert.from_transformers(hf).eval()
    processor = mllm.LlavaProcessor.from_model(ours)
    images = _images(world, 3)
    batch = processor(text=["USER: <image>\nWhat is this?\nASSISTANT: a red", "USER: <image> and <image>\nSame?\nASSISTANT:"],
                      images=[[images[0]], images[1:]], padding_side="right")  # HF's positions ignore the mask
    with torch.no_grad():
        theirs = hf(**batch).logits
        mine = ours(**batch)
        real = batch["attention_mask"].bool()
        assert mine.abs().max() > 1.0
        torch.testing.assert_close(mine[real], theirs[real], rtol=0, atol=1e-5)
        hf_feats = hf.model.get_image_features(batch["pixel_values"]).pooler_output
        torch.testing.assert_close(ours.get_image_features(batch["pixel_values"]), torch.stack(list(hf_feats)),
                                   rtol=0, atol=1e-5)
    back = convert.to_transformers(ours)  # and the way back (the bench races this one)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits[real], mine[real], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- bad input (one test each)
def test_more_or_fewer_images_than_placeholders(tiny, world):
    model, processor = tiny
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*2 image\(s\)"):
        processor(text="USER: <image>\nhi", images=_images(world, 2))
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*1 image\(s\)"):
        processor(text="<image> <image>", images=_images(world, 1))
    batch = processor(text="<image> x", images=_images(world, 1))
    with pytest.raises(ValueError, match="16 image tokens, but 2 image"):
        model(batch["input_ids"], batch["attention_mask"], torch.cat([batch["pixel_values"]] * 2))


def test_prompt_over_context_after_expansion(tiny, world):
    _, processor = tiny
    n = processor.context_length // processor.num_image_tokens + 1  # fits as words, not as image tokens
    with pytest.raises(ValueError, match="after expanding .* more than the context length 192"):
        processor(text="<image>" * n, images=_images(world, n))


def test_unknown_role(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="unknown role 'system'"):
        processor.apply_chat_template([{"role": "system", "content": "be nice"}])
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        processor.encode_conversation([{"from": "human", "value": "<image>"}, {"from": "bot", "value": "x"}])


def test_generation_with_no_room_left(tiny, world):
    model, processor = tiny
    batch = processor(text="USER: <image>\nhi\nASSISTANT:", images=_images(world, 1))
    T = batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match=f"no room left to generate: the prompt is {T} tokens"):
        model.generate(**batch, max_new_tokens=model.config.lm.context_length - T + 1)


# ---------------------------------------------------------------- data, evaluation, recipe
def test_llava_json_folder_round_trip(world, tmp_path, tiny):
    _, processor = tiny
    path = write_llava_folder(world, tmp_path / "ds", 3)
    records = load_llava_json(path)
    assert len(records) == 3 and records[0]["conversations"][0]["from"] == "human"
    from minivl.mllm.data import folder_batches
    batch = folder_batches(records, processor, 2)(0)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert (batch["labels"] != chat.IGNORE).any()


def test_parse_box():
    assert parse_box("The red circle is at [0.12, 0.30, 0.41, 0.62].") == (0.12, 0.30, 0.41, 0.62)
    assert parse_box("somewhere") is None


def test_recipe_two_stages_freeze_and_load(tmp_path):
    from minivl.recipes import mllm as recipe
    m = recipe.run("tiny", steps=6, out=tmp_path / "run", checkpoint=tmp_path / "ckpt", progress=False)
    assert set(m["stages"]) == {1, 2} and m["stages"][1]["steps"] == 1 and m["stages"][2]["steps"] == 5
    for split in ("test", "heldout"):
        assert set(m[split]) == {"questions", "captions", "boxes", "pope"}
        assert 0 <= m[split]["pope"]["yes_ratio"] <= 1
    assert "eval" in m["stages"][1]
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "chats.png").is_file()
    assert mllm.LlavaModel.load(tmp_path / "ckpt").tokenizer is not None
    with pytest.raises(ValueError, match="stage must be one of"):
        recipe.run("tiny", stage="3", out=tmp_path / "x", checkpoint=tmp_path / "y")


def test_stage1_trains_projector_alone_stage2_adds_the_lm(world, tmp_path):
    from minivl.data import world_tokenizer
    from minivl.recipes import mllm as recipe
    r = recipe.RECIPES["tiny"]
    model = recipe.build(r, world_tokenizer())
    processor = mllm.LlavaProcessor.from_model(model)
    snap = lambda: {k: v.clone() for k, v in model.state_dict().items()}  # noqa: E731
    changed = lambda a, b, part: any(not torch.equal(a[k], b[k]) for k in a if k.startswith(part))  # noqa: E731
    kw = dict(seed=0, progress=False, bf16=False, device="cpu", run_dir=tmp_path, resume=False, force=True)
    before = snap()
    recipe._fit_stage(model, world_batches(world, processor, 2, 1), r, 1, 2, **kw)
    after1 = snap()
    assert changed(before, after1, "projector")
    assert not changed(before, after1, "lm") and not changed(before, after1, "vision")
    recipe._fit_stage(model, world_batches(world, processor, 2, 2, n_questions=1), r, 2, 2, **kw)
    after2 = snap()
    assert changed(after1, after2, "lm") and changed(after1, after2, "projector")
    assert not changed(after1, after2, "vision")
    assert (tmp_path / "stage1" / "history.json").is_file() and (tmp_path / "stage2" / "history.json").is_file()


def test_lm_position_embeddings_grow_keeping_the_trained_ones():
    from minivl.lm import CausalLM, LMConfig
    lm, copy = CausalLM(LMConfig.preset("tiny")), CausalLM(LMConfig.preset("tiny"))
    with torch.no_grad():  # trained-like positions: far apart next to the 0.01 noise of "copy"
        lm.pos_embed.normal_(std=0.1)
        copy.pos_embed.copy_(lm.pos_embed)
    old = lm.pos_embed.detach().clone()
    lm.resize_position_embeddings(50, init="spread")
    assert lm.config.context_length == 50 and lm.pos_embed.shape == (50, old.shape[1])
    assert torch.equal(lm.pos_embed[:32], old)
    assert lm(torch.zeros(1, 50, dtype=torch.long)).shape == (1, 50, 300)
    new = lm.pos_embed[32:].detach()  # "spread": as far apart as the trained ones, not copies of the last
    step = (old[1:] - old[:-1]).norm(dim=-1).mean()
    assert (new[1:] - new[:-1]).norm(dim=-1).mean() > 0.5 * step
    copy.resize_position_embeddings(50)  # the default
    assert (copy.pos_embed[33:] - copy.pos_embed[32:-1]).norm(dim=-1).max() < 0.2 * step
    assert lm.resize_position_embeddings(20).pos_embed.shape[0] == 20 and torch.equal(lm.pos_embed, old[:20])
    with pytest.raises(ValueError):
        lm.resize_position_embeddings(0)
    with pytest.raises(ValueError, match="init"):
        lm.resize_position_embeddings(60, init="zeros")


def test_image_positions_add_a_table_to_the_image_tokens_only():
    from minivl.mllm import LlavaModel, MLLMConfig
    from minivl.vit import sincos_2d
    torch.manual_seed(0)
    plain = LlavaModel(MLLMConfig.preset("tiny"))
    torch.manual_seed(0)
    where = LlavaModel(MLLMConfig.preset("tiny", image_positions=0.5))
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    g = where.config.vision.grid // where.config.pixel_shuffle
    assert torch.allclose(where.image_pos, 0.5 * sincos_2d(g, where.config.lm.width))
    assert torch.allclose(where.get_image_features(px) - plain.get_image_features(px), where.image_pos.expand(2, -1, -1),
                          atol=1e-6)
    assert plain.image_pos is None
    with pytest.raises(ValueError, match="image_positions"):
        MLLMConfig.preset("tiny", image_positions=-1.0)
    pytest.importorskip("transformers")
    from minivl.mllm.convert import hf_config_from
    with pytest.raises(ValueError, match="image position"):  # transformers' LLaVA has none
        hf_config_from(where.config)


def test_projector_norm_option_normalises_features_first():
    torch.manual_seed(0)
    p = mllm.Projector(6, 4, depth=2, norm=True)
    x = 10 * torch.randn(2, 3, 6) + 5
    manual = p.layers[1](torch.nn.functional.gelu(p.layers[0](torch.nn.functional.layer_norm(x, (6,)))))
    assert torch.allclose(p(x), manual, atol=1e-6)
    assert mllm.Projector(6, 4).norm is None  # the default is LLaVA-1.5's: no norm
    cfg = mllm.MLLMConfig.preset("tiny", projector_norm=True)
    assert mllm.LlavaModel(cfg).projector.norm is not None
    with pytest.raises(TypeError):
        mllm.MLLMConfig.preset("tiny", projector_norm="yes")
    from minivl.mllm.convert import hf_config_from
    with pytest.raises(ValueError, match="no norm"):
        hf_config_from(cfg)


def test_stage1_train_option_unfreezes_lm_parts(world, tmp_path):
    import dataclasses

    from minivl.data import world_tokenizer
    from minivl.recipes import mllm as recipe
    kw = dict(seed=0, progress=False, bf16=False, device="cpu", run_dir=tmp_path, resume=False, force=True)
    for train, moved in ((("lm",), {"lm.transformer", "lm.token_embedding", "lm.pos_embed"}),
                         (("lm.pos_embed",), {"lm.pos_embed"})):
        r = dataclasses.replace(recipe.RECIPES["tiny"], stage1_train=train, vision_layer=-1)
        model = recipe.build(r, world_tokenizer())
        assert model.config.vision_layer == -1  # the recipe's override reaches the model config
        processor = mllm.LlavaProcessor.from_model(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        recipe._fit_stage(model, world_batches(world, processor, 2, 1), r, 1, 2, **kw)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
        lm_parts = {".".join(k.split(".")[:2]) for k in changed if k.startswith("lm.")}
        assert moved <= lm_parts and (train == ("lm",) or lm_parts == moved), (train, lm_parts)
        assert any(k.startswith("projector") for k in changed) and not any(k.startswith("vision") for k in changed)
