"""The decoding engine: every strategy checked against a slow, exhaustive or hand-computed reference,
on minivl's causal LM and on a hand-made decoder whose next-token probabilities are known."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minivl import generation
from minivl.generation import apply_repetition_penalty, continuation_logprob, generate, top_k_filter, top_p_filter
from minivl.lm import CausalLM, LMConfig

EOS, PAD = 290, 292  # ids in the tiny vocabulary (300) that the tests treat as special


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


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


def _left(ids, mask):
    """The same prompts, left-padded."""
    shift = [int((m == 0).sum()) for m in mask]
    return (torch.stack([r.roll(s) for r, s in zip(ids, shift)]), torch.stack([m.roll(s) for m, s in zip(mask, shift)]))


def _slow_greedy(lm, prompt, n):
    """Recompute the whole sequence every step, no cache: the definition of greedy decoding."""
    seq, out = prompt, []
    for _ in range(n):
        logits = lm(seq)[:, -1]
        logits[:, PAD] = float("-inf")
        out.append(int(logits.argmax(-1)))
        if out[-1] == EOS:
            break
        seq = torch.cat([seq, torch.tensor([[out[-1]]])], 1)
    return out


def _score(lm, prompt, new, length_penalty=1.0):
    s, n = lm.continuation_logprob(prompt, new, eos_id=EOS)
    return (s / n.float() ** length_penalty).item()


BOS, A, B_, END, NONE = range(5)  # the toy's vocabulary: bos, a, b, eos, pad


class Bigram(nn.Module):
    """A hand-made decoder: the next token depends only on the last one, with probabilities set
    below. It follows the engine's protocol without a KV cache (the engine then recomputes)."""

    def __init__(self, pad_id=NONE):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=5, context_length=16, eos_id=END, pad_id=pad_id)
        table = torch.full((5, 5), 0.2)  # row = previous token; eos and pad rows are uniform
        table[BOS] = torch.tensor([0.0, 0.6, 0.4, 0.0, 0.0])  # a is likelier first...
        table[A] = torch.tensor([0.0, 0.36, 0.34, 0.30, 0.0])  # ...but after a nothing is sure,
        table[B_] = torch.tensor([0.0, 0.06, 0.04, 0.90, 0.0])  # while b is almost surely complete
        self.register_buffer("logp", table.clamp(min=1e-12).log())  # finite: one-hot @ -inf would be NaN

    def embed(self, input_ids=None, inputs_embeds=None):
        parts = [] if inputs_embeds is None else [inputs_embeds]
        if input_ids is not None:
            parts.append(F.one_hot(input_ids, 5).float())  # (B, T, 5)
        return torch.cat(parts, 1)  # (B, P + T, 5)

    def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None):
        return self.embed(input_ids, inputs_embeds) @ self.logp  # (B, N, 5): log p(next | last)


# ---------------------------------------------------------------- greedy, the cache, batching
def test_greedy_with_the_kv_cache_equals_recomputing_the_whole_sequence():
    lm = _lm()
    for prompt in _rows(*_prompts()):
        cached = lm.generate(prompt, max_new_tokens=12)
        assert cached.tolist()[0] == _slow_greedy(lm, prompt, 12)
        assert torch.equal(lm.generate(prompt, max_new_tokens=12, use_cache=False), cached)
    ids, mask = _prompts()
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=8, num_beams=3, use_cache=False),
                       lm.generate(ids, mask, max_new_tokens=8, num_beams=3))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_prompts_of_different_lengths_equal_each_alone(num_beams):
    lm = _lm()
    ids, mask = _prompts()
    wide = (F.pad(ids, (0, 20), value=PAD), F.pad(mask, (0, 20)))  # padded past the context: still fine
    for batch_ids, batch_mask in ((ids, mask), _left(ids, mask), wide):
        out = lm.generate(batch_ids, batch_mask, max_new_tokens=8, num_beams=num_beams)
        for i, row in enumerate(_rows(ids, mask)):
            alone = lm.generate(row, max_new_tokens=8, num_beams=num_beams)[0]
            assert out[i, :len(alone)].tolist() == alone.tolist()
            assert (out[i, len(alone):] == PAD).all()


def test_beam_search_with_one_beam_is_greedy():
    lm = _lm()
    for prompt in _rows(*_prompts()):
        x, mask, _ = generation._prepare_prompt(lm, prompt, None, None)
        rows = generation._Rows(lm, x, mask, torch.zeros(1, 300, dtype=torch.bool), {}, use_cache=True)
        beam = generation._beam_search(rows, generation._Rules(eos=EOS, pad=PAD), 1, 10, length_penalty=0.0)
        assert torch.equal(beam, lm.generate(prompt, max_new_tokens=10))


# ---------------------------------------------------------------- beam search
def test_beam_search_syncs_with_the_host_once_per_step(monkeypatch):
    """On a GPU every read of a device value into Python waits for the device: beam search's bookkeeping
    stays in tensors, so its own code reads one value per step (are all prompts done?), not one per
    prompt or hypothesis."""
    import sys
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if sys._getframe(1).f_code.co_filename == generation.__file__:
                reads.append(1)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    lm, (ids, mask) = _lm(), _left(*_prompts())
    x, mask, _ = generation._prepare_prompt(lm, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), None)
    rows = generation._Rows(lm, x, mask, torch.zeros(12, 300, dtype=torch.bool), {}, use_cache=True)
    reads.clear()  # the prompt's checks above read values too: count the search alone
    out = generation._beam_search(rows, generation._Rules(eos=EOS, pad=PAD), 4, 10, length_penalty=1.0)
    assert out.shape[0] == 3 and 0 < len(reads) <= 10 + 1  # 10 steps, and the output's length


def test_beam_search_finds_the_sequence_greedy_misses_on_a_known_decoder():
    toy, bos = Bigram(), torch.tensor([[BOS]])
    assert generate(toy, bos, max_new_tokens=2).tolist() == [[A, A]]  # p = 0.6 * 0.36 = 0.216
    for length_penalty in (0.0, 1.0):  # b eos: p = 0.4 * 0.9 = 0.36, better both as a sum and per token
        beam = generate(toy, bos, max_new_tokens=2, num_beams=2, length_penalty=length_penalty)
        assert beam.tolist() == [[B_, END]]
    logp, n = continuation_logprob(toy, bos, torch.tensor([[B_, END]]))
    assert logp.item() == pytest.approx(math.log(0.36)) and n.item() == 2
    logp, n = continuation_logprob(toy, bos, torch.tensor([[A, A]]))
    assert logp.item() == pytest.approx(math.log(0.216)) and n.item() == 2


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


# ---------------------------------------------------------------- sampling and filters
def test_sampling_follows_the_distribution_temperature_and_nucleus():
    toy, bos = Bigram(), torch.full((4000, 1), BOS)
    g = torch.Generator().manual_seed(0)
    share_a = lambda **kw: (generate(toy, bos, max_new_tokens=1, do_sample=True, generator=g, **kw) == A)  # noqa: E731
    assert share_a().float().mean().item() == pytest.approx(0.6, abs=0.03)
    assert share_a(temperature=0.5).float().mean().item() == pytest.approx(0.36 / 0.52, abs=0.03)  # p^2, renormed
    assert share_a(top_p=0.5).all()  # a alone reaches 0.5: the nucleus is {a}
    assert share_a(top_k=1).all()


def test_top_k_one_and_near_zero_temperature_sampling_are_greedy_and_a_generator_repeats():
    lm = _lm()
    ids, mask = _prompts()
    greedy = lm.generate(ids, mask, max_new_tokens=10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=10, do_sample=True, top_k=1, generator=g), greedy)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=1e-4, generator=g),
                       greedy)
    hot = lm.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=5.0, generator=g)
    assert not torch.equal(hot, greedy)  # a hot sample of an untrained model wanders off
    first, again = (lm.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=5.0,
                                generator=torch.Generator().manual_seed(0)) for _ in range(2))
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
    assert kept(top_k_filter(logits, 9)) == [0, 1, 2, 3, 4]
    for bad in (lambda: top_p_filter(logits, 0.0), lambda: top_k_filter(logits, 0),
                lambda: generate(_lm(), torch.tensor([[1]]), max_new_tokens=2, do_sample=True, top_p=1.5)):
        with pytest.raises(ValueError):
            bad()


def test_repetition_penalty_is_ctrl_and_reduces_repeats():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert logits.tolist() == [[2.0, -2.0, 2.0, -2.0]]  # a new tensor: the input is untouched
    lm = _lm()
    prompt = _rows(*_prompts())[0]
    plain = lm.generate(prompt, max_new_tokens=12)[0].tolist()
    assert len(set(plain)) < len(plain)  # the untrained model repeats itself...
    penalised = lm.generate(prompt, max_new_tokens=12, repetition_penalty=1e4)[0].tolist()
    assert len(set(penalised)) == 12 and not set(penalised) & set(prompt[0].tolist())  # ...unless penalised
    beam = lm.generate(prompt, max_new_tokens=12, num_beams=3, repetition_penalty=1e4)[0].tolist()
    assert len(set(beam)) == len(beam)


# ---------------------------------------------------------------- eos, pad, lengths
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
    toy, after_b = Bigram(), torch.tensor([[BOS, B_]])
    assert generate(toy, after_b, max_new_tokens=4).tolist() == [[END]]  # eos is 90 % likely after b
    assert generate(toy, after_b, max_new_tokens=4, min_new_tokens=2).tolist() == [[A, A, A, A]]
    assert END not in generate(toy, after_b, max_new_tokens=4, min_new_tokens=2, num_beams=2)[0, :2].tolist()


def test_pad_may_double_as_eos_and_transformers_names_are_accepted():
    toy = Bigram(pad_id=END)  # as GPT-2 setups often do: pad = eos is then generated, and stops
    assert generate(toy, torch.tensor([[BOS, B_], [BOS, A]]), max_new_tokens=3).tolist() == [[END, END, END],
                                                                                          [A, A, A]]
    lm, prompt = _lm(), _rows(*_prompts())[1]
    ours = lm.generate(prompt, max_new_tokens=6, eos_id=7, pad_id=PAD)
    assert torch.equal(lm.generate(prompt, max_new_tokens=6, eos_token_id=7, pad_token_id=PAD), ours)
    with pytest.raises(ValueError, match="disagree"):
        lm.generate(prompt, max_new_tokens=6, eos_id=7, eos_token_id=8)


def test_context_length_overflow_raises_and_the_training_mode_is_kept():
    lm = _lm().train()
    ids = torch.randint(0, 256, (1, 30))
    with pytest.raises(ValueError, match="context length 32"):
        lm.generate(ids, max_new_tokens=3)
    lm.generate(ids, max_new_tokens=2)
    assert lm.training
    with pytest.raises(ValueError, match="eos_id and pad_id"):
        CausalLM(LMConfig.preset("tiny")).generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one real token"):
        lm.generate(ids[:, :3], torch.zeros(1, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids, max_new_tokens=0)


# ---------------------------------------------------------------- prefix embeddings and memory
def test_prefix_embeddings_decode_like_the_same_tokens_in_a_padded_batch():
    lm = _lm()
    ids, mask = _prompts()  # rows of 5, 3 and 1 real tokens
    prefix = lm.token_embedding(ids[:, :1])  # (B, 1, D): the first token, given as a vector
    for num_beams in (1, 3):
        as_tokens = lm.generate(ids, mask, max_new_tokens=6, num_beams=num_beams)
        rest, rest_mask = ids[:, 1:], mask[:, 1:]  # row 2 has no real token left: only its prefix
        as_prefix = lm.generate(rest, rest_mask, inputs_embeds=prefix, max_new_tokens=6, num_beams=num_beams)
        assert torch.equal(as_prefix, as_tokens)
    only = lm.generate(inputs_embeds=lm.token_embedding(ids[:1]), max_new_tokens=6)  # no ids at all
    assert torch.equal(only, lm.generate(ids[:1], max_new_tokens=6))


@torch.no_grad()
def test_beams_read_their_own_prompts_memory():
    """Beam search hands the decoder one memory row per prompt (memory_groups=K): the K beams of prompt b are
    rows b*K .. b*K + K - 1. With the cross-attention made to dominate the logits, each prompt decodes as it
    does alone, and the memories give different tokens (a mix-up between prompts would show)."""
    lm = _lm(cross_attention=True, memory_dim=24)
    for p in lm.parameters():
        p.mul_(8)  # at init (std 0.02) the logits are nearly flat and the memory hardly moves the argmax
    ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(2)).expand(5, -1)  # one prompt x 5
    mem = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(3))
    out = lm.generate(ids, memory=mem, max_new_tokens=6, num_beams=3)
    alone = [lm.generate(ids[:1], memory=mem[i:i + 1], max_new_tokens=6, num_beams=3)[0].tolist() for i in range(5)]
    assert [r[:len(a)] for r, a in zip(out.tolist(), alone)] == alone
    assert len({tuple(a) for a in alone}) >= 3  # the memory decides the tokens


@pytest.mark.parametrize("num_beams", [1, 3])
def test_memory_decoding_batched_equals_each_alone_and_reads_the_memory(num_beams):
    lm = _lm(cross_attention=True, memory_dim=24)
    ids, mask = _prompts()
    mem = torch.randn(3, 4, 24, generator=torch.Generator().manual_seed(0))
    mem_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    out = lm.generate(ids, mask, memory=mem, memory_mask=mem_mask, max_new_tokens=8, num_beams=num_beams)
    for i, row in enumerate(_rows(ids, mask)):
        n = int(mem_mask[i].sum())
        alone = lm.generate(row, memory=mem[i:i + 1, :n], max_new_tokens=8, num_beams=num_beams)[0]
        assert out[i, :len(alone)].tolist() == alone.tolist()
    other = lm.generate(ids, mask, memory=-mem, memory_mask=mem_mask, max_new_tokens=8, num_beams=num_beams)
    assert not torch.equal(other, out)  # the tokens depend on the memory
    with pytest.raises(ValueError, match="memory_mask given without memory"):
        _lm().generate(ids, mask, memory_mask=mem_mask, max_new_tokens=2)


# ---------------------------------------------------------------------------- every argument checked, every mode
@pytest.mark.parametrize("kwargs, error, match", [
    ({"repetition_penalty": float("nan")}, ValueError, "repetition_penalty"),
    ({"temperature": float("nan")}, ValueError, "temperature"),  # ignored by greedy, still a bug
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"top_k": 0, "num_beams": 2}, ValueError, "top_k"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens"),
    ({"pad_id": 300}, ValueError, r"pad_id must be a token id in \[0, 300\)"),
    ({"eos_id": -1}, ValueError, "eos_id"),
    ({"do_sample": "yes"}, TypeError, "do_sample"),
    ({"length_penalty": float("inf")}, ValueError, "length_penalty"),
])
def test_generation_arguments_are_checked_whatever_the_mode(kwargs, error, match):
    from minivl.lm import CausalLM, LMConfig
    torch.manual_seed(0)
    lm = CausalLM(LMConfig.preset("tiny", eos_id=1, pad_id=0))
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        lm.generate(torch.randint(3, 280, (2, 4)), **kwargs)
