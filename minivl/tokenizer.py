"""Byte-level BPE tokenizer, trained from scratch on a text corpus.

Byte-pair encoding (Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words
with Subword Units") starts from single symbols and repeatedly merges the most frequent
adjacent pair into a new symbol. GPT-2 (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners") runs BPE on UTF-8 *bytes* instead of characters and first
splits text into pre-tokens (words with their leading space, numbers, punctuation,
whitespace) so that merges never cross a word boundary.

The one idea to take away: with the 256 bytes as the base vocabulary every string has an
encoding (no unknown token, exact round trip), and the merges learned from the corpus just
make frequent byte sequences short.

Choices made here:
- Pre-tokeniser: Python `re` (no `regex` dependency), GPT-2 style. `[^\\W\\d_]` stands in for
  `\\p{L}` (it is "word characters that are not digits or underscore"). A single leading space
  attaches to the next word, number or punctuation run; a whitespace run leaves its last space
  for the following word. Every character falls in exactly one class, so the pieces always
  concatenate back to the input.
- Ids: 0..255 are the bytes, 256.. the merges in training order, then the special tokens
  (`<|pad|>` first, so `pad_id == vocab_size - len(SPECIAL_TOKENS)`).
- Special tokens: `encode(text)` treats "<|eos|>" in plain text as ordinary text (a user can
  not inject control tokens). `encode(text, allow_special=True)` splits on the special
  strings and maps each to its single id; chat templates use that.
- `train` stops early (with a warning) when the corpus has no adjacent pair left to merge;
  then `vocab_size` is smaller than asked. Otherwise `vocab_size` is exactly what was asked:
  256 bytes + merges + specials.
- Ties between equally frequent pairs go to the smallest (left id, right id): deterministic.
"""
from __future__ import annotations

import heapq
import json
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable

import torch

PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
N_BYTES = 256
_CACHE_LIMIT = 200_000  # pre-tokens cached per tokenizer before the cache is cleared


def _check_text(text, name="text") -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")


def _check_flag(name: str, v) -> None:
    if not isinstance(v, bool):  # a "False" string is truthy: it would silently mean True
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")


def _merge(ids: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every non-overlapping (a, b), left to right, by new_id."""
    out, j, n = [], 0, len(ids)
    while j < n:
        if j + 1 < n and ids[j] == a and ids[j + 1] == b:
            out.append(new_id)
            j += 2
        else:
            out.append(ids[j])
            j += 1
    return out


class Tokenizer:
    """Byte-level BPE. Build with `Tokenizer.train(texts, vocab_size)` or `Tokenizer.load(path)`."""

    SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|image|>", "<|system|>", "<|user|>",
                      "<|assistant|>", "<|end|>"]

    def __init__(self, merges: Iterable[tuple[int, int]] = (), pattern: str = PATTERN,
                 merge_counts: list[int] | None = None):
        self.merges: list[tuple[int, int]] = []
        self._bytes: list[bytes] = [bytes([b]) for b in range(N_BYTES)]  # id -> its bytes
        for pair in merges:
            a, b = (int(x) for x in pair)
            if not (0 <= a < len(self._bytes) and 0 <= b < len(self._bytes)):
                raise ValueError(f"merge {len(self.merges)} = {pair} refers to an id not yet "
                                 f"defined (expected ids < {len(self._bytes)})")
            self.merges.append((a, b))
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self.merge_counts = list(merge_counts) if merge_counts is not None else None
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._bytes_to_id = {bs: i for i, bs in enumerate(self._bytes)}  # last merge wins on dupes
        self.pattern = pattern
        self._split = re.compile(pattern).findall
        n = len(self._bytes)
        self._special = {tok: n + i for i, tok in enumerate(self.SPECIAL_TOKENS)}
        self._special_by_id = {i: tok for tok, i in self._special.items()}
        self._special_split = re.compile("(" + "|".join(map(re.escape, self.SPECIAL_TOKENS)) + ")")
        self._cache: dict[str, tuple[int, ...]] = {}

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, verbose: bool = False) -> "Tokenizer":
        """Learn `vocab_size - 256 - len(SPECIAL_TOKENS)` merges from `texts`."""
        if isinstance(texts, str) or not isinstance(texts, Iterable):
            raise TypeError(f"texts must be an iterable of str (not a str), got {type(texts).__name__}")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        n_min = N_BYTES + len(cls.SPECIAL_TOKENS)
        if vocab_size < n_min:
            raise ValueError(f"vocab_size must be >= {n_min} (256 bytes + specials), got {vocab_size}")
        split = re.compile(PATTERN).findall
        freq: Counter[str] = Counter()
        for i, text in enumerate(texts):
            _check_text(text, f"texts[{i}]")
            freq.update(split(text))
        # Train on unique pre-tokens weighted by count: a caption corpus repeats few words.
        try:
            words = [list(w.encode("utf-8")) for w in freq]
        except UnicodeEncodeError as e:
            raise ValueError(f"texts contain a lone surrogate (not valid Unicode): {e.object!r}") from None
        counts = list(freq.values())
        pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> word indices
        for i, (w, c) in enumerate(zip(words, counts)):
            for p in zip(w, w[1:]):
                pair_counts[p] += c
                where[p].add(i)
        # Max-heap via negated counts; stale entries are skipped when popped. (count, a, b)
        # ordering breaks ties by the smallest ids.
        heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
        heapq.heapify(heap)
        merges, merge_counts = [], []
        n_merges = vocab_size - n_min
        while len(merges) < n_merges:
            while heap and pair_counts.get((heap[0][1], heap[0][2]), 0) != -heap[0][0]:
                heapq.heappop(heap)
            if not heap:
                warnings.warn(f"corpus ran out of pairs after {len(merges)} merges; vocab_size "
                              f"is {n_min + len(merges)} instead of {vocab_size}", stacklevel=2)
                break
            neg, a, b = heapq.heappop(heap)
            new_id = N_BYTES + len(merges)
            merges.append((a, b))
            merge_counts.append(-neg)
            changed = set()
            for i in where.pop((a, b)):
                w, c = words[i], counts[i]
                for p in zip(w, w[1:]):  # take the word's pairs out, merge, put them back
                    pair_counts[p] -= c
                    changed.add(p)
                words[i] = out = _merge(w, a, b, new_id)
                for p in zip(out, out[1:]):
                    pair_counts[p] += c
                    where[p].add(i)
                    changed.add(p)
            pair_counts.pop((a, b), None)
            for p in changed:
                c = pair_counts.get(p, 0)
                if c > 0:
                    heapq.heappush(heap, (-c, p[0], p[1]))
                else:
                    pair_counts.pop(p, None)
            if verbose and len(merges) % 100 == 0:
                print(f"merge {len(merges):5d}/{n_merges}: pair count {-neg}")
        tok = cls(merges, merge_counts=merge_counts)
        if verbose:
            for k, (a, b) in enumerate(tok.merges[:10]):
                print(f"  {k}: {tok.id_to_token(a)!r} + {tok.id_to_token(b)!r} "
                      f"-> {tok.id_to_token(N_BYTES + k)!r} ({tok.merge_counts[k]}x)")
        return tok

    # ---------------------------------------------------------------- encode / decode
    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        try:
            ids = list(piece.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode (lone surrogate at {e.start}): {piece!r}") from None
        ranks = self._ranks
        while len(ids) > 1:
            # The lowest-rank pair present was learned first, so merging it first replays training.
            best = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 60))
            rank = ranks.get(best)
            if rank is None:
                break
            ids = _merge(ids, best[0], best[1], N_BYTES + rank)
        result = tuple(ids)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = result
        return result

    def _encode_plain(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._split(text):
            out.extend(self._encode_piece(piece))
        return out

    def encode(self, text: str, add_special_tokens: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; bos/eos around it when `add_special_tokens`.

        With `allow_special=False` (default) a literal "<|eos|>" in the text is encoded as
        ordinary bytes. With `allow_special=True` each special-token string becomes its id.
        """
        _check_text(text)
        _check_flag("add_special_tokens", add_special_tokens)
        _check_flag("allow_special", allow_special)
        if allow_special:
            ids = []
            for k, part in enumerate(self._special_split.split(text)):
                ids.extend([self._special[part]] if k % 2 else self._encode_plain(part))
        else:
            ids = self._encode_plain(text)
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids. Bytes that do not form valid UTF-8 (a cut-off
        character) become U+FFFD; ids from a full `encode` round-trip exactly."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be a sequence of ints, got {type(ids).__name__}")
        parts, buf, n = [], bytearray(), len(self)
        for i in ids:
            if isinstance(i, bool) or not hasattr(i, "__index__"):
                raise TypeError(f"ids must be ints, got {type(i).__name__}")
            i = i.__index__()
            if not 0 <= i < n:
                raise ValueError(f"id {i} out of range for vocab_size {n}")
            if i < len(self._bytes):
                buf += self._bytes[i]
            elif not skip_special_tokens:
                parts.append(buf.decode("utf-8", errors="replace"))
                parts.append(self._special_by_id[i])
                buf = bytearray()
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        """`decode` for each row of a (B, T) tensor or a list of id lists."""
        return [self.decode(row, skip_special_tokens) for row in batch]

    def __call__(self, texts: str | list[str], context_length: int | None = None,
                 truncate: bool = False, add_special_tokens: bool = True,
                 allow_special: bool = False, padding: str = "max_length") -> dict[str, torch.Tensor]:
        """Encode a batch, right-pad with `pad_id` to `context_length` (or the longest text).

        Returns dict(input_ids=LongTensor (B, T), attention_mask=LongTensor (B, T), 1 = real).
        A text longer than `context_length` raises ValueError unless `truncate`, which cuts
        it and (with `add_special_tokens`) keeps eos as the last token, as CLIP does.
        `padding="longest"` pads to the longest text of the batch even when `context_length`
        is given (it then only bounds the length): training batches skip the pads' compute.
        """
        for name, flag in (("truncate", truncate), ("add_special_tokens", add_special_tokens),
                           ("allow_special", allow_special)):
            _check_flag(name, flag)
        if not isinstance(padding, str) or padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is empty: expected at least one string")
        if context_length is not None and (not isinstance(context_length, int)
                                           or isinstance(context_length, bool) or context_length < 1):
            raise ValueError(f"context_length must be a positive int or None, got {context_length!r}")
        rows = []
        for i, text in enumerate(texts):
            _check_text(text, f"texts[{i}]")
            ids = self.encode(text, add_special_tokens, allow_special)
            if context_length is not None and len(ids) > context_length:
                if not truncate:
                    raise ValueError(f"text {i} has {len(ids)} tokens, more than context_length="
                                     f"{context_length}; pass truncate=True or a longer context_length")
                ids = ids[:context_length - 1] + [self.eos_id] if add_special_tokens else ids[:context_length]
            rows.append(ids)
        longest = padding == "longest" or context_length is None
        T = max(len(r) for r in rows) if longest else context_length
        pad = self.pad_id
        input_ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], dtype=torch.long)  # (B, T)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], dtype=torch.long)  # (B, T)
        return {"input_ids": input_ids.reshape(len(rows), T), "attention_mask": mask.reshape(len(rows), T)}

    # ---------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self._bytes) + len(self.SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        return self._special["<|pad|>"]

    @property
    def bos_id(self) -> int:
        return self._special["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self._special["<|eos|>"]

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special)

    def token_to_id(self, tok: str) -> int:
        """Id of a special-token string or of a string whose UTF-8 bytes are one token.
        The readable form from `id_to_token` (with '▁' for space) is accepted too."""
        _check_text(tok, "tok")
        if tok in self._special:
            return self._special[tok]
        for candidate in (tok, tok.replace("▁", " ")):
            i = self._bytes_to_id.get(candidate.encode("utf-8", "surrogatepass"))
            if i is not None:
                return i
        raise ValueError(f"{tok!r} is not a single token of this vocabulary")

    def id_to_token(self, i: int) -> str:
        """Readable form of one id: '▁' marks a space, other invisible bytes are escaped."""
        if not isinstance(i, int) or not 0 <= i < len(self):
            raise ValueError(f"id must be an int in [0, {len(self)}), got {i!r}")
        if i in self._special_by_id:
            return self._special_by_id[i]
        return self._readable(self._bytes[i])

    @staticmethod
    def _readable(bs: bytes) -> str:
        try:
            s = bs.decode("utf-8")
        except UnicodeDecodeError:  # part of a multi-byte character: show raw bytes
            return "".join("▁" if b == 32 else chr(b) if 33 <= b < 127 else f"<0x{b:02X}>" for b in bs)
        return "".join("▁" if ch == " " else ch if ch.isprintable()
                       else ch.encode("unicode_escape").decode("ascii") for ch in s)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"

    # ---------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """Write the tokenizer as JSON, atomically (temp file, fsync, rename: `minivl.atomic.write_json`)."""
        state = {"format": "minivl-bpe", "version": 1, "pattern": self.pattern,
                 "special_tokens": self.SPECIAL_TOKENS, "merges": [list(m) for m in self.merges],
                 "merge_counts": self.merge_counts}
        from minivl.atomic import write_json
        path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, state, indent=None)  # a kill mid-save leaves the old file, and no stray temp past the next

    @classmethod
    def load(cls, path) -> "Tokenizer":
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or state.get("format") != "minivl-bpe":
            raise ValueError(f"{path} is not a minivl tokenizer file (expected format 'minivl-bpe')")
        if state.get("special_tokens") != cls.SPECIAL_TOKENS:
            raise ValueError(f"{path} has special tokens {state.get('special_tokens')}, "
                             f"expected {cls.SPECIAL_TOKENS}")
        return cls([tuple(m) for m in state["merges"]], pattern=state["pattern"],
                   merge_counts=state.get("merge_counts"))
