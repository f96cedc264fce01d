"""The causal LM: no look-ahead, padding and prefix invariance, cache == recomputation, and every
decoding strategy checked against a slow or exhaustive reference."""
import itertools

import pytest
import torch

from minivl.lm import CausalLM, LMConfig, positions_from_mask, repetition_penalty_, top_k_filter, top_p_filter

EOS, PAD = 290, 292  # ids in the tiny vocabulary (300) that the tests treat as special


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads
    per process oversubscribe the cores (measured: 36 s vs 8 s for this file); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lm(seed=0, **overrides):
    torch.manual_seed(seed)
    return CausalLM(LMConfig.preset("tiny", eos_id=EOS, pad_id=PAD, **overrides)).eval()


def _prompts():
    """Three prompts of lengths 5, 3, 1, right-padded like the tokenizer makes them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    return ids.masked_fill(mask == 0, PAD), mask


def _rows(ids, mask):
    return [ids[i:i + 1, :int(mask[i].sum())] for i in range(len(ids))]


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


def _score(lm, prompt, new, length_penalty=1.0):
    s, n = lm.continuation_logprob(prompt, new, eos_id=EOS)
    return (s / n.float() ** length_penalty).item()


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
    assert logs["ppl"] == pytest.approx(loss.exp().item(), rel=1e-5)
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


# ---------------------------------------------------------------- decoding
def test_generate_with_cache_equals_slow_greedy_reference():
    lm = _lm()
    for prompt in _rows(*_prompts()):
        assert lm.generate(prompt, max_new_tokens=12).tolist()[0] == _slow_greedy(lm, prompt, 12)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_prompts_of_different_lengths_equal_each_alone(num_beams):
    lm = _lm()
    ids, mask = _prompts()
    left_ids = torch.stack([row.roll(int((m == 0).sum())) for row, m in zip(ids, mask)])
    left_mask = torch.stack([m.roll(int((m == 0).sum())) for m in mask])
    for batch_ids, batch_mask in ((ids, mask), (left_ids, left_mask)):
        out = lm.generate(batch_ids, batch_mask, max_new_tokens=8, num_beams=num_beams)
        for i, row in enumerate(_rows(ids, mask)):
            alone = lm.generate(row, max_new_tokens=8, num_beams=num_beams)[0]
            assert out[i, :len(alone)].tolist() == alone.tolist()
            assert (out[i, len(alone):] == PAD).all()


def _greedy_via_beam(lm, prompt, n, length_penalty):
    x, mask, ids = lm._prepare_prompt(prompt, None, None)
    seen = torch.zeros(1, lm.config.vocab_size, dtype=torch.bool)
    return lm._beam_search(x, mask, None, None, seen, 1, n, length_penalty, min_new=0, eos=EOS, pad=PAD,
                           penalty=1.0)


def test_beam_search_with_one_beam_is_greedy():
    lm = _lm()
    for prompt in _rows(*_prompts()):
        assert torch.equal(_greedy_via_beam(lm, prompt, 10, 0.0), lm.generate(prompt, max_new_tokens=10))


def test_wide_beam_search_finds_the_best_sequence_by_exhaustive_search():
    # vocabulary 0..4, eos 3, pad 4: three free tokens, so 27 beams hold every running hypothesis
    # of 3 tokens and the search over 4 new tokens is exhaustive
    torch.manual_seed(3)
    lm = CausalLM(LMConfig.preset("tiny", vocab_size=5, eos_id=3, pad_id=4, tie_embeddings=False)).eval()
    with torch.no_grad():  # large random weights: peaked, context-dependent next-token distributions
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    prompt = torch.tensor([[0, 1]])
    free = [list(p) for n in range(4) for p in itertools.product(range(3), repeat=n)]
    candidates = [p + [3] for p in free] + [p + [c] for p in free if len(p) == 3 for c in range(3)]
    padded = torch.tensor([c + [4] * (4 - len(c)) for c in candidates])  # (N, 4), pads after eos
    logp, n = lm.continuation_logprob(prompt.expand(len(candidates), 2), padded, eos_id=3)
    greedy = lm.generate(prompt, max_new_tokens=4)[0].tolist()
    beaten = 0
    for length_penalty in (0.0, 1.0, 2.0):
        scores = logp / n.float() ** length_penalty
        best = candidates[int(scores.argmax())]
        beam = lm.generate(prompt, max_new_tokens=4, num_beams=27, length_penalty=length_penalty)
        assert beam[0].tolist() == best, (length_penalty, beam, best)
        beaten += best != greedy[:len(best)]
    assert beaten >= 2  # the search matters: greedy is not the best sequence here


def test_beam_search_scores_at_least_as_well_as_greedy():
    lm = _lm()
    for prompt in _rows(*_prompts()):
        greedy = lm.generate(prompt, max_new_tokens=10)
        beam = lm.generate(prompt, max_new_tokens=10, num_beams=4)
        assert _score(lm, prompt, beam) >= _score(lm, prompt, greedy) - 1e-5


def test_top_k_one_and_near_zero_temperature_sampling_are_greedy():
    lm = _lm()
    ids, mask = _prompts()
    greedy = lm.generate(ids, mask, max_new_tokens=10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=10, do_sample=True, top_k=1, generator=g), greedy)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=1e-4, generator=g),
                       greedy)
    hot = lm.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=5.0, generator=g)
    assert not torch.equal(hot, greedy)  # a hot sample of an untrained model wanders off
    again = lm.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=5.0,
                        generator=torch.Generator().manual_seed(0))
    first = lm.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=5.0,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, first)  # a seeded generator makes sampling repeatable


def test_top_p_keeps_the_minimal_nucleus_and_top_k_the_k_best():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_p_filter(logits, 0.75)) == [1, 3]  # 0.5 + 0.3 reaches 0.75; 0.5 alone does not
    assert kept(top_p_filter(logits, 0.85)) == [0, 1, 3]
    assert kept(top_p_filter(logits, 0.4)) == [1]  # the top token always stays
    assert kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(top_p_filter(logits, 0.75)[0, [1, 3]], logits[0, [1, 3]])
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    with pytest.raises(ValueError):
        top_p_filter(logits, 0.0)


def test_repetition_penalty_is_ctrl():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert repetition_penalty_(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    lm = _lm()
    prompt = _rows(*_prompts())[0]
    plain = lm.generate(prompt, max_new_tokens=12)[0].tolist()
    assert len(set(plain)) < len(plain)  # the untrained model repeats itself...
    penalised = lm.generate(prompt, max_new_tokens=12, repetition_penalty=1e4)[0].tolist()
    assert len(set(penalised)) == 12 and not set(penalised) & set(prompt[0].tolist())  # ...unless penalised


def test_stops_at_eos_pads_after_and_min_new_tokens_suppresses_eos():
    lm = _lm()
    ids, mask = _prompts()
    free = lm.generate(ids, mask, max_new_tokens=10, eos_id=299)  # 299 is never chosen here
    eos = int(free[0, 2])  # declare the third token of row 0 the end of text
    out = lm.generate(ids, mask, max_new_tokens=10, eos_id=eos)
    for row, ref in zip(out.tolist(), free.tolist()):
        stop = ref.index(eos) + 1 if eos in ref else len(ref)
        assert row[:stop] == ref[:stop] and all(t == PAD for t in row[stop:])
    first = int(free[0, 0])
    assert lm.generate(ids[:1], mask[:1], max_new_tokens=10, eos_id=first).tolist() == [[first]]
    late = lm.generate(ids, mask, max_new_tokens=10, eos_id=first, min_new_tokens=4)
    assert (late[:, :4] != first).all() and late.shape[1] >= 4


def test_generate_checks_context_length_and_keeps_the_training_mode():
    lm = _lm().train()
    ids = torch.randint(0, 256, (1, 30))
    with pytest.raises(ValueError, match="context length 32"):
        lm.generate(ids, max_new_tokens=3)
    lm.generate(ids, max_new_tokens=2)
    assert lm.training
    with pytest.raises(ValueError, match="eos_id and pad_id"):
        CausalLM(LMConfig.preset("tiny")).generate(ids, max_new_tokens=2)


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
    assert RECIPES["cpu"]["steps"] > RECIPES["tiny"]["steps"]
