"""The causal LM: no look-ahead, padding and prefix invariance, cache == recomputation, the loss,
and the decoding paths only it exercises (prefix embeddings, memory). The decoding engine itself
is tested in test_generation.py."""
import pytest
import torch

from minivl.lm import CausalLM, LMConfig, positions_from_mask

EOS, PAD = 290, 292  # ids in the tiny vocabulary (300) that the tests treat as special


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def _lm(seed=0, **overrides):
    torch.manual_seed(seed)
    return CausalLM(LMConfig.preset("tiny", eos_id=EOS, pad_id=PAD, **overrides)).eval()


def _slow_greedy(lm, prompt, n, memory=None):
    """Recompute the whole sequence every step, no cache: the definition of greedy decoding."""
    seq, out = prompt, []
    for _ in range(n):
        logits = lm(seq, memory=memory)[:, -1]
        logits[:, PAD] = float("-inf")
        nxt = logits.argmax(-1)
        out.append(int(nxt))
        if out[-1] == EOS:
            break
        seq = torch.cat([seq, nxt[:, None]], 1)
    return out


# ---------------------------------------------------------------- the model
def test_presets_and_validation():
    assert LMConfig.preset("cpu").width > LMConfig.preset("tiny").width
    with pytest.raises(ValueError, match="unknown LM preset"):
        LMConfig.preset("huge")
    lm = _lm()
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        lm(torch.tensor([[1, 300]]))
    with pytest.raises(TypeError, match="integer"):
        lm(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="context length"):
        lm(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="cross_attention=False"):
        lm(torch.zeros(1, 3, dtype=torch.long), memory=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="context length 32"):  # 30 cached + 3 new positions
        cache = lm.new_cache()
        lm(torch.zeros(1, 30, dtype=torch.long), cache=cache)
        lm(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 32\)"):
        lm(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.tensor([[0, 1, 32]]))


def test_tied_embeddings_share_storage_and_survive_a_checkpoint(tmp_path):
    lm = _lm()
    assert lm.lm_head.weight is lm.token_embedding.weight
    assert lm.lm_head.weight.data_ptr() == lm.token_embedding.weight.data_ptr()
    lm(torch.tensor([[1, 2, 3]]))[0, -1, 5].backward()  # the output layer alone touches row 5
    assert lm.token_embedding.weight.grad[5].abs().sum() > 0
    lm.save(tmp_path / "lm")
    again = CausalLM.load(tmp_path / "lm")
    assert again.lm_head.weight is again.token_embedding.weight
    torch.testing.assert_close(again.token_embedding.weight, lm.token_embedding.weight)
    untied = _lm(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.token_embedding.weight.data_ptr()


def test_changing_future_tokens_does_not_change_earlier_logits():
    lm = _lm()
    ids = torch.randint(0, 256, (2, 10))
    other = ids.clone()
    other[:, 6:] = torch.randint(0, 256, (2, 4))
    a, b = lm(ids), lm(other)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_padding_on_either_side_does_not_change_real_logits():
    lm = _lm()
    ids = torch.randint(0, 256, (1, 6))
    alone = lm(ids)
    right = lm(torch.cat([ids, torch.full((1, 3), PAD)], 1), torch.tensor([[1] * 6 + [0] * 3]))
    left = lm(torch.cat([torch.full((1, 3), PAD), ids], 1), torch.tensor([[0] * 3 + [1] * 6]))
    torch.testing.assert_close(right[:, :6], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left[:, 3:], alone, atol=1e-5, rtol=1e-5)  # positions come from the mask
    assert positions_from_mask(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


@pytest.mark.parametrize("cross", [False, True])
def test_incremental_decoding_with_cache_equals_full_recomputation(cross):
    lm = _lm(cross_attention=cross, memory_dim=24 if cross else None)
    ids = torch.randint(0, 256, (2, 9))
    mem = torch.randn(2, 5, 24) if cross else None
    full = lm(ids, memory=mem)
    cache = lm.transformer.new_cache()
    steps = [lm(ids[:, :4], memory=mem, cache=cache)]
    for t in range(4, 9):
        steps.append(lm(ids[:, t:t + 1], memory=mem, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_prefix_equals_the_same_tokens():
    lm = _lm()
    ids = torch.randint(0, 256, (2, 8))
    prefix = lm.token_embedding(ids[:, :3])  # (B, 3, D)
    torch.testing.assert_close(lm(ids[:, 3:], inputs_embeds=prefix), lm(ids), atol=1e-6, rtol=1e-6)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])  # a tokens-only mask: the prefix counts as real
    torch.testing.assert_close(lm(ids[:, 3:], mask, inputs_embeds=prefix)[1, :6], lm(ids[1:, :6])[0],
                               atol=1e-5, rtol=1e-5)
    gen_tokens = lm.generate(ids, max_new_tokens=6)
    gen_prefix = lm.generate(ids[:, 3:], inputs_embeds=prefix, max_new_tokens=6)
    assert torch.equal(gen_tokens, gen_prefix)


def test_cross_attention_reads_memory_and_ignores_its_padding():
    lm = _lm(cross_attention=True, memory_dim=24)
    ids = torch.randint(0, 256, (1, 6))
    mem = torch.randn(1, 4, 24)
    base = lm(ids, memory=mem)
    assert not torch.allclose(base, lm(ids, memory=torch.randn(1, 4, 24)))
    padded = torch.cat([mem, 100 * torch.randn(1, 3, 24)], 1)
    torch.testing.assert_close(lm(ids, memory=padded, memory_mask=torch.tensor([[1] * 4 + [0] * 3])), base,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pass memory"):
        lm(ids)
    assert lm.generate(ids, max_new_tokens=5, memory=mem).tolist()[0] == _slow_greedy(lm, ids, 5, mem)


def test_loss_ignores_padding_and_labels():
    lm = _lm()
    ids = torch.randint(0, 256, (2, 7))
    mask = torch.ones_like(ids)
    loss, logs = lm.loss({"input_ids": ids, "attention_mask": mask})
    padded = {"input_ids": torch.cat([ids, torch.full((2, 4), PAD)], 1),
              "attention_mask": torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], 1)}
    torch.testing.assert_close(lm.loss(padded)[0], loss)
    assert isinstance(logs["ppl"], torch.Tensor) and not logs["ppl"].requires_grad  # no .item(): no sync
    assert logs["ppl"].item() == pytest.approx(loss.exp().item(), rel=1e-5)
    labels = ids.clone()
    labels[:, :3] = -100  # no loss on the prompt: the mean over the last 3 targets only
    logp = lm(ids).log_softmax(-1)[:, 2:-1].gather(-1, ids[:, 3:, None])
    torch.testing.assert_close(lm.loss({"input_ids": ids, "attention_mask": mask, "labels": labels})[0],
                               -logp.mean(), atol=1e-5, rtol=1e-5)


def test_overfits_one_batch():
    torch.manual_seed(0)
    lm = CausalLM(LMConfig.preset("tiny", context_length=16))
    ids = torch.randint(0, 256, (8, 12))
    ids[:, 0] = torch.arange(8)  # a distinct first token makes every later token predictable
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(300):
        loss, _ = lm.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"


# ---------------------------------------------------------------- the recipe
def test_caption_grammar_accepts_every_world_caption_and_rejects_broken_ones():
    from minivl.recipes.lm import is_caption
    from minivl.world import World
    world = World()
    captions = [c for i in range(40) for split in ("train", "val") for c in world.captions(world.scene(i, split))]
    assert all(is_caption(c, world) for c in captions)
    for broken in ["an small red circle", "a red circle, and a blue square", "there are two objects: a red circle",
                   "two red circle", "a red circle red", "a red circle on the left, a blue cross at the top"]:
        assert not is_caption(broken, world), broken


def test_recipe_trains_saves_and_reports(tmp_path):
    from minivl.recipes.lm import RECIPES, run
    steps = 3
    result = run("tiny", steps=steps, out=tmp_path / "run", checkpoint=tmp_path / "ckpt", progress=False)
    assert result["steps"] == steps and result["val_ppl"] > 1
    assert len(result["greedy_samples"]) == len(result["beam_samples"]) > 0
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "loss.png").is_file()
    lm = CausalLM.load(tmp_path / "ckpt")
    assert lm.config.eos_id is not None and (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert RECIPES["cpu"].steps > RECIPES["tiny"].steps


# ---------------------------------------------------------------------------- validation where data enters
def test_mask_values_other_than_0_1_are_rejected_not_counted_twice():
    lm, ids = _lm(), torch.randint(0, 280, (2, 5))
    with pytest.raises(ValueError, match="only 0 and 1"):  # positions_from_mask's cumsum would skip a position
        lm(ids, torch.tensor([[1, 2, 1, 1, 1], [1, 1, 1, 1, 1]]))


def test_lm_config_ids_must_lie_in_the_vocabulary():
    with pytest.raises(ValueError, match=r"LMConfig.eos_id must be a token id in \[0, 300\)"):
        LMConfig.preset("tiny", eos_id=300)
    with pytest.raises(TypeError, match="pad_id"):
        LMConfig.preset("tiny", pad_id=True)
    with pytest.raises(ValueError, match="divisible"):
        LMConfig.preset("tiny", heads=5)


def test_loss_checks_labels_and_length():
    lm, ids = _lm(), torch.randint(0, 280, (2, 5))
    with pytest.raises(ValueError, match=r"labels.*\[0, 300\) or -100"):
        lm.loss({"input_ids": ids, "labels": ids + 300})
    with pytest.raises(ValueError, match=">= 2 tokens"):
        lm.loss({"input_ids": ids[:, :1]})
    with pytest.raises(ValueError, match="no target"):  # the mean of nothing would be NaN
        lm.loss({"input_ids": ids, "labels": torch.full_like(ids, -100)})
    loss, _ = lm.loss({"input_ids": ids.int(), "labels": ids.int()})  # int32 ids and labels work
    assert torch.isfinite(loss)
