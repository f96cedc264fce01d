"""Tests for the byte-level BPE tokenizer (minivl/tokenizer.py)."""
from __future__ import annotations

import json
import random
import re
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivl.tokenizer import PATTERN, Tokenizer

COLORS = "red green blue yellow purple orange cyan gray".split()
SHAPES = "circle square triangle star diamond hexagon".split()


def captions(n: int, seed: int = 0) -> list[str]:
    """Shapes-World-like captions (the real generator lives in minivl.world)."""
    rng = random.Random(seed)

    def obj():
        return f"a {rng.choice(['small', 'large'])} {rng.choice(COLORS)} {rng.choice(SHAPES)}"
    rel = ["to the left of", "to the right of", "above", "below"]
    return [rng.choice([f"{obj()}.", f"There is {obj()} {rng.choice(rel)} {obj()}.",
                        f"{rng.randint(1, 5)} objects: {obj()} and {obj()}."]) for _ in range(n)]


# A corpus with multi-byte characters so that merges build partial UTF-8 tokens too.
MIXED = captions(300) + ["naïve café — 東京タワー 🙂🙂 👩‍👩‍👧 ümlaut ümlaut", "日本語の文章です。日本語!"] * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(MIXED, 400)


def reference_encode(tok: Tokenizer, text: str) -> list[int]:
    """Independent slow encoder: apply every merge, in training order, to each pre-token."""
    out = []
    for piece in re.findall(PATTERN, text):
        ids = list(piece.encode("utf-8"))
        for rank, (a, b) in enumerate(tok.merges):
            merged, j = [], 0
            while j < len(ids):
                if j + 1 < len(ids) and (ids[j], ids[j + 1]) == (a, b):
                    merged.append(256 + rank)
                    j += 2
                else:
                    merged.append(ids[j])
                    j += 1
            ids = merged
        out += ids
    return out


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_random_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.pad_id for i in ids)  # plain text never yields a special id
    assert "".join(re.findall(PATTERN, text)) == text  # pre-tokeniser drops nothing


FUZZ_ALPHABET = (list("abc XYZ019_-.,!?'\"") + ["\n", "\r\n", "\t", "   ", "\x00", "\x07", "\x1b",
                 "\u0301", "\u0308", "e\u0301", "東", "京", "语", "🙂", "👩‍👩‍👧", "🇯🇵", "\u200b",
                 "\ufeff", "\u00a0", "ß", "Ω", "<|eos|>", "<|pad|>", "²", "٣"])


def test_roundtrip_seeded_fuzz(tok):
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 30)))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == reference_encode(tok, text)  # rank-order encoding == training-order merges
        assert tok.decode(tok.encode(text, allow_special=True), skip_special_tokens=False) == text


def test_encode_matches_training_order_reference(tok):
    for text in MIXED[::7] + captions(100, seed=5) + ["unseen wörds: rectangles, 12345"]:
        assert tok.encode(text) == reference_encode(tok, text)


def test_lone_surrogate_rejected(tok):
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("a\ud800b")


def test_first_merge_hand_checked():
    # Pre-tokens: "ab", " ab", " ab", " cd" -> pairs (a,b) x3, (' ',a) x2, (' ',c) x1, (c,d) x1.
    t = Tokenizer.train(["ab ab ab cd"], 256 + 2 + len(Tokenizer.SPECIAL_TOKENS))
    assert t.merges[0] == (ord("a"), ord("b"))
    assert t.merge_counts[0] == 3
    # After it: (' ', 'ab') x2 is the most frequent.
    assert t.merges[1] == (ord(" "), 256)
    assert t.encode(" ab") == [257]
    assert t.id_to_token(257) == "▁ab"


def test_ties_broken_by_smallest_ids():
    t = Tokenizer.train(["xy", "ab"], 256 + 1 + len(Tokenizer.SPECIAL_TOKENS))
    assert t.merges == [(ord("a"), ord("b"))]


def test_training_deterministic_and_order_independent():
    corpus = captions(2000, seed=3)
    shuffled = corpus[:]
    random.Random(0).shuffle(shuffled)
    a = Tokenizer.train(corpus, 330)
    b = Tokenizer.train(corpus, 330)
    c = Tokenizer.train(shuffled, 330)
    assert a.merges == b.merges == c.merges
    assert a.merge_counts == c.merge_counts
    # Counts never increase: BPE merges the most frequent pair first.
    assert all(x >= y for x, y in zip(a.merge_counts, a.merge_counts[1:]))


@pytest.mark.parametrize("vocab_size", [264, 300, 333])
def test_vocab_size_exact(vocab_size):
    t = Tokenizer.train(MIXED, vocab_size)
    assert len(t) == t.vocab_size == vocab_size == 256 + len(t.merges) + len(Tokenizer.SPECIAL_TOKENS)
    ids = t("a red circle 🙂")["input_ids"]
    assert int(ids.max()) < vocab_size


def test_small_corpus_stops_early_with_warning():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        t = Tokenizer.train(["abc abc"], 1000)
    assert len(t) == 256 + len(t.merges) + len(Tokenizer.SPECIAL_TOKENS) < 1000
    assert len(t.merges) == 3  # ab, abc, " abc": then every pre-token is a single token
    assert t.encode("abc abc") == [257, 258]


def test_train_validates_input():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], 100)
    with pytest.raises(TypeError, match="str"):
        Tokenizer.train("just a string", 300)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        Tokenizer.train(["ok", 3], 300)


def test_special_tokens_single_ids_and_not_injectable(tok):
    ids = [tok.token_to_id(s) for s in Tokenizer.SPECIAL_TOKENS]
    assert ids == list(range(len(tok) - len(ids), len(tok)))  # at the end, pad first
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == tuple(ids[:3])
    text = "a red circle <|eos|> then <|image|>"
    plain = tok.encode(text)
    assert not set(plain) & set(ids)
    assert tok.decode(plain) == text
    allowed = tok.encode(text, allow_special=True)
    assert allowed.count(tok.eos_id) == 1 and allowed.count(tok.token_to_id("<|image|>")) == 1
    assert tok.decode(allowed, skip_special_tokens=False) == text
    assert tok.decode(allowed) == "a red circle  then "
    with_bos = tok.encode("hi", add_special_tokens=True)
    assert with_bos[0] == tok.bos_id and with_bos[-1] == tok.eos_id
    assert tok.decode(with_bos) == "hi"


def test_batch_padding_and_mask(tok):
    texts = ["a red circle.", "There is a small blue square to the left of a large red star.", ""]
    lengths = [len(tok.encode(t)) + 2 for t in texts]
    out = tok(texts)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (3, max(lengths))
    assert mask.sum(1).tolist() == lengths
    for row, m, n in zip(ids, mask, lengths):
        assert m[:n].eq(1).all() and m[n:].eq(0).all()
        assert row[n:].eq(tok.pad_id).all()
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
    assert tok.batch_decode(ids) == texts
    fixed = tok(texts, context_length=32)
    assert fixed["input_ids"].shape == (3, 32)
    assert torch.equal(fixed["input_ids"][:, :ids.shape[1]], ids)
    single = tok("a red circle.", context_length=20, add_special_tokens=False)
    assert single["input_ids"].shape == (1, 20)
    assert single["input_ids"][0, :lengths[0] - 2].tolist() == tok.encode("a red circle.")


def test_overflow_raises_with_index_length_limit(tok):
    long = "a small red circle to the left of a large blue square"
    n = len(tok.encode(long)) + 2
    with pytest.raises(ValueError, match=rf"text 1 has {n} tokens.*context_length=8"):
        tok(["a", long], context_length=8)


def test_truncate_keeps_eos_last(tok):
    long = "a small red circle to the left of a large blue square"
    full = tok.encode(long, add_special_tokens=True)
    out = tok(["a", long], context_length=8, truncate=True)
    row = out["input_ids"][1].tolist()
    assert row == full[:7] + [tok.eos_id]
    assert out["attention_mask"][1].tolist() == [1] * 8
    assert out["input_ids"][0].tolist()[:3] == tok.encode("a", add_special_tokens=True)
    raw = tok(long, context_length=5, truncate=True, add_special_tokens=False)
    assert raw["input_ids"][0].tolist() == tok.encode(long)[:5]


def test_padding_longest_pads_to_the_batch_and_truncates_at_the_context(tok):
    """Training batches: pad to the longest text, never past the context (cut there, eos last)."""
    short = ["a", "a red circle"]
    out = tok(short, context_length=32, padding="longest")
    assert torch.equal(out["input_ids"], tok(short)["input_ids"])  # no pads past the longest text
    long = "a small red circle to the left of a large blue square"
    cut = tok(["a", long], context_length=8, truncate=True, padding="longest")
    assert cut["input_ids"].shape == (2, 8) and cut["input_ids"][1, -1] == tok.eos_id
    assert torch.equal(cut["input_ids"], tok(["a", long], context_length=8, truncate=True)["input_ids"])
    with pytest.raises(ValueError, match="padding must be"):
        tok("a", padding="right")


def test_call_validates_input(tok):
    with pytest.raises(TypeError):
        tok([1, 2])
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="context_length"):
        tok("a", context_length=0)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([len(tok)])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_decode_partial_utf8_replaces(tok):
    ids = tok.encode("🙂")
    assert tok.decode(["🙂".encode()[0]]) == "\ufffd"  # the first of its 4 bytes alone
    assert tok.decode(ids) == "🙂"
    assert tok.decode(torch.tensor(ids)) == "🙂"


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    assert json.loads(path.read_text())["format"] == "minivl-bpe"
    loaded = Tokenizer.load(path)
    assert loaded.merges == tok.merges and len(loaded) == len(tok)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    texts = MIXED[:50] + ["unseen wörds 🚀 <|user|>"]
    for t in texts:
        assert loaded.encode(t) == tok.encode(t)
    assert torch.equal(loaded(texts)["input_ids"], tok(texts)["input_ids"])
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="minivl"):
        Tokenizer.load(path)


def test_readable_tokens(tok):
    for i in range(len(tok)):
        s = tok.id_to_token(i)
        assert isinstance(s, str) and s and " " not in s
    space_word = next(i for i in range(256, len(tok) - 8) if tok.decode([i]).startswith(" ")
                      and tok.decode([i]).strip().isalpha())
    assert tok.id_to_token(space_word).startswith("▁")
    assert tok.token_to_id(tok.id_to_token(space_word)) == space_word
    assert tok.token_to_id(tok.decode([space_word])) == space_word
    with pytest.raises(ValueError, match="not a single token"):
        tok.token_to_id("definitely not one token")


def test_batch_encode_speed_and_cache():
    corpus = captions(5000, seed=7)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a caption corpus runs out of merges before 512
        t = Tokenizer.train(corpus, 512)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = t(corpus, context_length=32)
    enc_s = time.perf_counter() - t0
    print(f"\ntrain 5k captions: {train_s:.3f}s; batch encode: {len(corpus) / enc_s:,.0f} captions/s")
    assert out["input_ids"].shape == (5000, 32)
    assert t.batch_decode(out["input_ids"][:100]) == corpus[:100]
    assert 0 < len(t._cache) < 100  # each distinct word is encoded once, then looked up
    fresh = Tokenizer(t.merges)
    assert [fresh.encode(c) for c in corpus[:200]] == [t.encode(c) for c in corpus[:200]]
