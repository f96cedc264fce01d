"""Attention is checked against the formula, against torch's own MultiheadAttention, and for the
three properties generation relies on: no causal leakage, padding invariance, cache == no cache;
the stack builds its masks once per forward, and its pooled last block equals the full stack."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minivl.transformer as tr
from minivl.transformer import Attention, Block, Transformer, build_mask, init_weights, segment_mask


def _explicit_attention(attn: Attention, x, memory=None, allowed=None):
    """softmax(Q K^T / sqrt(d)) V written out, heads handled by hand."""
    B, T, D = x.shape
    src = x if memory is None else memory
    H, Dh = attn.n_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
    k = attn.k_proj(src).view(B, src.shape[1], H, Dh).transpose(1, 2)
    v = attn.v_proj(src).view(B, src.shape[1], H, Dh).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return attn.out_proj(out.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_equals_formula(need_weights):
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 7, 32)
    out, w = attn(x, need_weights=need_weights)
    torch.testing.assert_close(out, _explicit_attention(attn, x), atol=1e-5, rtol=1e-5)
    if need_weights:
        assert w.shape == (2, 4, 7, 7)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 7))


def test_cross_attention_equals_formula():
    torch.manual_seed(0)
    attn = Attention(32, 4, memory_dim=24).eval()
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    out, _ = attn(x, mem)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out, _explicit_attention(attn, x, mem), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch_multihead_attention(causal):
    torch.manual_seed(0)
    D, H = 32, 4
    ours = Attention(D, H).eval()
    ref = nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(3, 6, D)
    pad = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    ref_causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1) if causal else None
    want, want_w = ref(x, x, x, key_padding_mask=pad == 0, attn_mask=ref_causal,
                       average_attn_weights=False)
    for need_weights in (False, True):
        mask = build_mask(pad, causal=causal, T=6, S=6, device=x.device)  # (3, 1, 6, 6)
        got, got_w = ours(x, mask=mask, need_weights=need_weights)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if need_weights:
            torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)


def _model(cross=False, depth=2):
    torch.manual_seed(0)
    model = Transformer(32, depth, 4, cross_attention=cross, memory_dim=16 if cross else None).eval()
    model.apply(init_weights)
    return model


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_no_leakage(need_weights):
    model = _model()
    x = torch.randn(2, 10, 32)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, 32)  # change the future only
    a = model(x, causal=True, need_weights=need_weights).last_hidden_state
    b = model(y, causal=True, need_weights=need_weights).last_hidden_state
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])  # the test can fail: the future did change


def test_gradient_does_not_flow_from_future():
    model = _model()
    x = torch.randn(1, 8, 32, requires_grad=True)
    model(x, causal=True).last_hidden_state[0, 3].sum().backward()
    assert x.grad[0, 4:].abs().max() == 0
    assert x.grad[0, :4].abs().max() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_padding_does_not_change_real_tokens(causal):
    model = _model()
    x = torch.randn(1, 5, 32)
    alone = model(x, causal=causal).last_hidden_state
    padded = torch.cat([x, torch.randn(1, 3, 32) * 10], dim=1)  # junk in the padded slots
    mask = torch.tensor([[1] * 5 + [0] * 3])
    for need_weights in (False, True):
        out = model(padded, attention_mask=mask, causal=causal, need_weights=need_weights)
        torch.testing.assert_close(out.last_hidden_state[:, :5], alone, atol=1e-5, rtol=1e-5)
        if need_weights:
            assert out.attentions[0][..., 5:].abs().max() == 0  # no weight lands on padding


def test_left_padding_with_causal_mask_is_finite_and_invariant():
    model = _model()
    x = torch.randn(1, 4, 32)
    alone = model(x, causal=True).last_hidden_state
    padded = torch.cat([torch.randn(1, 2, 32), x], dim=1)
    out = model(padded, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]), causal=True).last_hidden_state
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])  # decoding (a buffer written in place) / with autograd (concat)
@pytest.mark.parametrize("cross", [False, True])
def test_kv_cache_equals_full_recomputation(cross, grad):
    model = _model(cross=cross)
    x = torch.randn(2, 9, 32)
    mem = torch.randn(2, 6, 16) if cross else None
    full = model(x, causal=True, memory=mem).last_hidden_state
    cache = model.new_cache()
    with torch.set_grad_enabled(grad):
        steps = [model(x[:, :4], causal=True, memory=mem, cache=cache).last_hidden_state]  # prompt at once
        for t in range(4, 9):  # then one token at a time: the buffer grows 4 -> 8 -> 16 positions
            steps.append(model(x[:, t:t + 1], causal=True, memory=mem, cache=cache).last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert len(cache[0].self_attn) == 9 and cache[0].self_attn.k.shape[2] == 9
    if grad:
        torch.cat(steps, 1).sum().backward()  # the cache keeps the graph intact
        assert all(p.grad is not None for p in model.parameters())
    if cross:
        assert len(cache[0].cross_attn) == 6  # projected once, not re-appended every step


@torch.no_grad()
@pytest.mark.parametrize("post_norm", [False, True])
def test_grouped_memory_equals_the_memory_repeated_per_row(post_norm):
    """memory_groups=g: each memory row serves g consecutive rows (beam search's beams of one image), the same
    numbers as the memory repeated g times, the weights included; with a cache, step by step."""
    model = Transformer(32, 2, 4, cross_attention=True, memory_dim=16, post_norm=post_norm).eval()
    g, x = 3, torch.randn(6, 5, 32)
    mem, mem_mask = torch.randn(2, 7, 16), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    rep, rep_mask = mem.repeat_interleave(g, 0), mem_mask.repeat_interleave(g, 0)
    want = model(x, causal=True, memory=rep, memory_mask=rep_mask, need_weights=True)
    got = model(x, causal=True, memory=mem, memory_mask=mem_mask, memory_groups=g, need_weights=True)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.cross_attentions, want.cross_attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # (6, H, 5, 7): per row, as if repeated
    cache = model.new_cache()
    steps = [model(x[:, :3], causal=True, memory=mem, memory_mask=mem_mask, memory_groups=g,
                   cache=cache).last_hidden_state]
    steps += [model(x[:, t:t + 1], causal=True, memory=mem, memory_mask=mem_mask, memory_groups=g,
                    cache=cache).last_hidden_state for t in (3, 4)]
    torch.testing.assert_close(torch.cat(steps, 1), want.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert cache[0].cross_attn.k.shape[0] == 2  # the memory's keys: projected for 2 images, not 6 rows
    with pytest.raises(ValueError, match=r"memory must be \(B=2, S, memory_dim\) \(one row per 3 rows of x\)"):
        model(x, memory=rep, memory_groups=g)
    with pytest.raises(ValueError, match="memory_groups must be an int >= 1 dividing the batch 6"):
        model(x, memory=mem, memory_groups=4)
    with pytest.raises(ValueError, match="memory_groups"):
        model(x, memory=mem, memory_groups=0)
    with pytest.raises(ValueError, match=r"memory_mask must be \(2, 7\), one row per memory row"):
        model(x, memory=mem, memory_mask=rep_mask, memory_groups=g)


@torch.no_grad()
def test_kv_cache_reorder_follows_beams():
    model = _model()
    x = torch.randn(3, 7, 32)
    cache = model.new_cache()
    model(x[:, :4], causal=True, cache=cache)
    model(x[:, 4:5], causal=True, cache=cache)  # into a grown buffer: reorder moves its spare room too
    idx = torch.tensor([2, 0, 0])
    for layer in cache:
        layer.reorder(idx)
    steps = [model(x[idx, t:t + 1], causal=True, cache=cache).last_hidden_state for t in (5, 6)]
    full = model(x[idx], causal=True).last_hidden_state[:, 5:7]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_build_mask_is_bottom_right_aligned():
    m = build_mask(None, causal=True, T=2, S=4, device=torch.device("cpu"))[0, 0]
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_segment_mask_keeps_packed_segments_apart():
    g = torch.tensor([[-1, -1, 0, 0, 1, 1, -2]])  # a shared prefix, two segments, a pad
    m = segment_mask(g)[0, 0]
    assert m[2].tolist() == [True, True, True, True, False, False, False]  # segment 0: prefix + itself
    assert m[5].tolist() == [True, True, False, False, True, True, False]  # segment 1 never reads segment 0
    assert m[6].tolist() == [True, True, False, False, False, False, False]  # a pad reads the prefix only
    assert m[0].tolist() == [True, True, False, False, False, False, False]  # the prefix reads only itself
    torch.manual_seed(0)
    model = _model(depth=2).eval()
    x = torch.randn(1, 7, 32)
    packed = model(x, causal=True, segment_ids=g).last_hidden_state
    alone = model(x[:, [0, 1, 4, 5]], causal=True).last_hidden_state  # segment 1 right after the prefix
    torch.testing.assert_close(packed[0, 4:6], alone[0, 2:])  # positions are the caller's (none here): equal
    with pytest.raises(ValueError, match="segment_ids must be"):
        segment_mask(g.float())
    with pytest.raises(ValueError, match="-2 \\(pad\\)"):
        segment_mask(torch.tensor([[-3, 0]]))
    with pytest.raises(ValueError, match="no cache"):
        model(x[:, :1], causal=True, segment_ids=g[:, :1], cache=model.new_cache())


def test_outputs_hidden_states_and_attentions():
    model = _model(depth=3)
    out = model(torch.randn(2, 4, 32), output_hidden_states=True, need_weights=True)
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    assert out.attentions[0].shape == (2, 4, 4, 4)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


@torch.no_grad()
def test_kv_cache_reorders_step_after_step_like_recomputation():
    """Beam search reorders at every step: the cache gathers into a spare buffer and swaps (reused while the
    capacity stays), and each row's state is still its own history's."""
    model = _model()
    x = torch.randn(3, 9, 32)
    cache = model.new_cache()
    model(x[:, :4], causal=True, cache=cache)
    hist = x[:, :4]
    g = torch.Generator().manual_seed(0)
    for t in range(4, 9):  # capacity 4 -> 8 at t = 4, then 8 -> 16 at t = 8: the spare is reused in between
        idx = torch.randint(0, 3, (3,), generator=g)
        for layer in cache:
            layer.reorder(idx)
        hist = torch.cat([hist[idx], x[:, t:t + 1]], 1)
        step = model(x[:, t:t + 1], causal=True, cache=cache).last_hidden_state
        torch.testing.assert_close(step[:, 0], model(hist, causal=True).last_hidden_state[:, -1], atol=1e-5, rtol=1e-5)
    assert cache[0].self_attn._spare is not None


def test_bad_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        model(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randn(2, 4, 32), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="memory"):
        Block(32, 4, cross_attention=True)(torch.randn(1, 2, 32))
    with pytest.raises(ValueError, match="cross_attention=False"):
        model(torch.randn(2, 4, 32), memory=torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="pass memory"):
        _model(cross=True)(torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="not both"):
        Attention(32, 4)(torch.randn(1, 2, 32), mask=torch.ones(1, 1, 2, 2, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError):
        Block(32, 4, 4.0)  # everything after dim and n_heads is keyword-only
    with pytest.raises(ValueError, match="activation"):
        Block(32, 4, activation="relu6")


def test_masks_are_built_once_per_forward_not_once_per_layer(monkeypatch):
    calls = []
    real = tr.build_mask
    monkeypatch.setattr(tr, "build_mask", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = _model(cross=True, depth=4)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 3, 16)
    model(x, attention_mask=torch.ones(2, 5), causal=True, memory=mem, memory_mask=torch.ones(2, 3))
    assert len(calls) == 2  # the self-attention mask and the memory mask, shared by the 4 blocks


def test_fused_causal_kernel_without_padding_explicit_mask_with_it(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention
    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal", False)))
        return real(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _model()
    x = torch.randn(2, 6, 32)
    fused = model(x, causal=True).last_hidden_state
    assert seen == [(True, True)] * 2  # no mask tensor at all: SDPA's own causal mask
    seen.clear()
    masked = model(x, attention_mask=torch.ones(2, 6), causal=True).last_hidden_state
    assert seen == [(False, False)] * 2
    torch.testing.assert_close(fused, masked, atol=1e-5, rtol=1e-5)


def test_pooled_last_block_equals_the_full_stack_at_that_token():
    model = _model(depth=3)
    x = torch.randn(4, 7, 32)
    # causal text, right-padded: the pooled token is each row's last real one
    lengths = torch.tensor([7, 3, 5, 1])
    mask = (torch.arange(7)[None] < lengths[:, None]).long()  # (4, 7)
    full = model(x, attention_mask=mask, causal=True).last_hidden_state
    want = full[torch.arange(4), lengths - 1]  # (4, D)
    for m in (mask, None):  # without the mask too: under a causal mask real tokens never see right pads
        got = model(x, attention_mask=m, causal=True, pool_index=lengths - 1).last_hidden_state
        assert got.shape == (4, 32)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a ViT: bidirectional, the class token at index 0
    full = model(x).last_hidden_state
    torch.testing.assert_close(model(x, pool_index=0).last_hidden_state, full[:, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x, pool_index=1).last_hidden_state, full[:, 0])  # the index matters
    # cross-attention blocks pool too
    cross = _model(cross=True)
    mem = torch.randn(4, 3, 16)
    torch.testing.assert_close(cross(x, memory=mem, pool_index=2).last_hidden_state,
                               cross(x, memory=mem).last_hidden_state[:, 2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        model(x, pool_index=7)
    with pytest.raises(ValueError, match="need_weights"):
        model(x, pool_index=0, need_weights=True)
    with pytest.raises(TypeError, match="pool_index"):
        model(x, pool_index=0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_bf16_attention_runs_the_fused_kernel_in_fp32(monkeypatch, causal):
    """On the CPU the fused kernel is several times slower in bf16 than in fp32 (no bf16 instructions):
    under bf16 autocast it must get fp32 inputs, hand back bf16, and stay close to the fp32 formula."""
    seen = []
    real = F.scaled_dot_product_attention
    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 7, 32)
    allowed = build_mask(torch.tensor([[1] * 7, [1] * 5 + [0] * 2]), causal=causal, T=7, S=7, device=x.device)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attn(x, mask=allowed)
    assert seen == [(torch.float32,) * 3 + (False,)]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _explicit_attention(attn, x, allowed=allowed), atol=3e-2, rtol=3e-2)
    seen.clear()
    out32, _ = attn(x, mask=allowed)  # fp32 without autocast: the kernel as it was, autocast untouched
    assert seen == [(torch.float32,) * 3 + (False,)] and out32.dtype == torch.float32
