"""The text encoder is checked for shapes, for pooling at the last real token, for the two
properties causal attention gives it (right padding and later tokens never change earlier
features), with the package's own tokenizer, and for its input checks."""
import pytest
import torch

from minivl.text import TextConfig, TextEncoder, check_tokens
from minivl.tokenizer import Tokenizer


def _encoder(**overrides) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TextConfig.preset("tiny", **overrides)).eval()


def _ids(B, T, vocab, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_output_shapes():
    enc = _encoder()
    c = enc.config
    ids = _ids(3, 10, c.vocab_size)
    out = enc(ids, torch.ones_like(ids), need_weights=True, output_hidden_states=True)
    assert out.tokens.shape == (3, 10, c.width)
    assert out.pooled.shape == (3, c.width)
    assert len(out.hidden_states) == c.depth + 1 and len(out.attentions) == c.depth
    assert all(a.shape == (3, c.heads, 10, 10) for a in out.attentions)
    # causal: each query's weights on later keys are exactly zero
    future = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    assert all((a[..., future] == 0).all() for a in out.attentions)


def test_pooled_is_the_token_at_the_last_real_position():
    enc = _encoder()
    ids = _ids(3, 8, enc.config.vocab_size)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5, [1] + [0] * 7])
    out = enc(ids, mask)
    for row, last in enumerate([7, 2, 0]):
        torch.testing.assert_close(out.pooled[row], out.tokens[row, last])
    # no mask means every position is real
    out = enc(ids)
    torch.testing.assert_close(out.pooled, out.tokens[:, -1])


def test_right_padding_with_junk_ids_changes_nothing():
    enc = _encoder()
    V = enc.config.vocab_size
    lengths = [5, 2, 9]
    texts = [_ids(1, n, V, seed=n)[0] for n in lengths]
    alone = [enc(t[None]) for t in texts]
    T = 12
    ids = _ids(3, T, V, seed=99)  # junk everywhere, then the real tokens on the left
    mask = torch.zeros(3, T, dtype=torch.long)
    for row, t in enumerate(texts):
        ids[row, :len(t)] = t
        mask[row, :len(t)] = 1
    batch = enc(ids, mask)
    for row, (t, ref) in enumerate(zip(texts, alone)):
        torch.testing.assert_close(batch.pooled[row], ref.pooled[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.tokens[row, :len(t)], ref.tokens[0], atol=1e-5, rtol=1e-5)
    # different junk in the padding: same features again
    ids2 = ids.clone()
    ids2[mask == 0] = (ids2[mask == 0] + 1) % V
    torch.testing.assert_close(enc(ids2, mask).pooled, batch.pooled, atol=1e-5, rtol=1e-5)


def test_later_tokens_never_change_earlier_features():
    enc = _encoder()
    ids = _ids(2, 10, enc.config.vocab_size)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % enc.config.vocab_size
    a, b = enc(ids).tokens, enc(changed).tokens
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_with_the_tokenizer_each_text_pools_as_if_alone():
    tok = Tokenizer.train(["a red circle", "a big blue square left of a green triangle"] * 3, vocab_size=280)
    enc = _encoder(vocab_size=tok.vocab_size, context_length=32)
    texts = ["a red circle", "a big blue square left of a green triangle", "green"]
    batch = tok(texts, context_length=32)
    pooled = enc(**batch).pooled
    for i, text in enumerate(texts):
        single = tok([text])  # padded to its own length only: no padding at all
        assert single["attention_mask"].all()
        torch.testing.assert_close(pooled[i], enc(**single).pooled[0], atol=1e-5, rtol=1e-5)
    # pooling lands on the eos token the tokenizer put last
    last = batch["attention_mask"].sum(1) - 1
    assert (batch["input_ids"][torch.arange(3), last] == tok.eos_id).all()


def test_gradients_reach_the_token_embedding():
    enc = _encoder()
    ids = _ids(2, 6, enc.config.vocab_size)
    enc(ids).pooled.pow(2).sum().backward()
    grad = enc.token_embedding.weight.grad
    assert grad[ids.unique()].abs().sum() > 0
    unused = torch.ones(enc.config.vocab_size, dtype=torch.bool)
    unused[ids.unique()] = False
    assert (grad[unused] == 0).all()  # only the rows that were looked up learn
    assert enc.pos_embed.grad[:6].abs().sum() > 0 and (enc.pos_embed.grad[6:] == 0).all()


def test_context_length_overflow_raises():
    enc = _encoder()
    L = enc.config.context_length
    enc(_ids(1, L, enc.config.vocab_size))  # exactly the limit is fine
    with pytest.raises(ValueError, match=f"{L + 1} tokens exceeds the context length {L}"):
        enc(_ids(1, L + 1, enc.config.vocab_size))


@pytest.mark.parametrize("bad, error, match", [
    (torch.tensor([[1, 2, -1]]), ValueError, r"\[0, 300\)"),
    (torch.tensor([[1, 2, 300]]), ValueError, r"\[0, 300\)"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
    (torch.tensor([1, 2, 3]), ValueError, r"\(B, T\)"),
    ([[1, 2, 3]], ValueError, r"\(B, T\) tensor"),
])
def test_bad_ids_raise(bad, error, match):
    enc = _encoder()
    assert enc.config.vocab_size == 300
    with pytest.raises(error, match=match):
        enc(bad)


def test_empty_text_row_raises():
    enc = _encoder()
    ids = _ids(2, 4, enc.config.vocab_size)
    with pytest.raises(ValueError, match="at least one real token"):
        enc(ids, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))


def test_unknown_preset_raises_and_save_load_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="unknown text preset"):
        TextConfig.preset("huge")
    enc = _encoder()
    enc.save(tmp_path / "text")
    loaded = TextEncoder.load(tmp_path / "text").eval()
    assert loaded.config == enc.config
    ids = _ids(2, 5, enc.config.vocab_size)
    torch.testing.assert_close(loaded(ids).pooled, enc(ids).pooled)


def test_left_padding_is_rejected_since_pooling_reads_the_last_real_token():
    enc = _encoder()
    with pytest.raises(ValueError, match="right-padded"):
        enc(_ids(1, 4, enc.config.vocab_size), torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="must match"):
        enc(_ids(1, 4, enc.config.vocab_size), torch.ones(1, 5))


def test_value_checks_run_where_data_enters_not_on_every_accelerator_forward():
    # On the meta device a tensor has a shape and a dtype but no values: reading one (min, max, any)
    # raises. check_tokens passing there proves an accelerator forward would not sync on them.
    ids, mask = torch.zeros(2, 5, dtype=torch.long, device="meta"), torch.ones(2, 5, device="meta")
    check_tokens(ids, 300, 16, mask, right_padded=True)
    with pytest.raises(TypeError, match="integer"):  # shapes and dtypes are still checked, for free
        check_tokens(ids.float(), 300, 16)
    with pytest.raises(ValueError, match="context length"):
        check_tokens(torch.zeros(1, 17, dtype=torch.long, device="meta"), 300, 16)
    with pytest.raises(ValueError, match=r"\[0, 300\)"):  # ...and values on the CPU, where batches come from
        check_tokens(torch.tensor([[1, 300]]), 300, 16)


# ---------------------------------------------------------------------------- validation where data enters
def test_masks_must_be_0_1_of_the_ids_exact_shape_and_ids_integer_non_empty():
    enc, ids = _encoder(), _ids(2, 4, 300)
    with pytest.raises(ValueError, match="only 0 and 1"):  # a 2 would count a position twice
        enc(ids, torch.tensor([[1, 2, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"must match the ids' shape \(2, 4\)"):  # no broadcasting of batch 1
        enc(ids, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids, got torch.bool"):
        enc(ids.bool())
    with pytest.raises(ValueError, match="empty"):
        enc(ids[:, :0])
    with pytest.raises(ValueError, match="empty"):
        enc(ids[:0])


def test_numpy_ids_are_accepted_as_the_same_tensor():
    enc, ids = _encoder(), _ids(2, 4, 300)
    with torch.no_grad():
        torch.testing.assert_close(enc(ids.numpy()).pooled, enc(ids).pooled)


@pytest.mark.parametrize("field, value, error", [
    ("heads", 3, ValueError), ("depth", -1, ValueError), ("vocab_size", 0, ValueError), ("width", "32", TypeError),
    ("context_length", True, TypeError), ("dropout", float("nan"), ValueError), ("activation", None, TypeError),
])
def test_text_config_rejects_bad_fields(field, value, error):
    with pytest.raises(error, match=field if field != "heads" else "divisible"):
        TextConfig.preset("tiny", **{field: value})
