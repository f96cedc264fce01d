"""OpenAI CLIP's tokenizer, written from scratch: the byte-level BPE every OpenAI CLIP model reads.

Follows the tokenizer of "Learning Transferable Visual Models From Natural Language Supervision"
(Radford et al., 2021), which is GPT-2's byte-level BPE (Radford et al., 2019) with three changes:
text is cleaned and lowercased first, every word's last symbol carries an end-of-word marker `</w>`
(so "dog" at the end of a word and "dog" inside "doghouse" are different tokens), and a text is
framed as <start_of_text> ... <end_of_text>, zero-padded to 77 ids. The vocabulary is 256 byte
symbols, the same 256 with `</w>`, 48,894 merges and the two special tokens: 49,408 ids.

The merges are data, not code: they ship as `bpe_simple_vocab_16e6.txt.gz` inside the
`open_clip_torch` and `openai-clip` PyPI packages (`pip install --no-deps open_clip_torch` is
enough), and this module reads them from there - nothing is downloaded, nothing is copied into
minivl. `$MINIVL_CLIP_BPE` may name the file instead.

Cleaning, exactly as OpenAI's: `ftfy.fix_text` (mojibake and odd Unicode repaired) when the `ftfy`
package is installed - without it that step is skipped (with a warning, once), which changes texts
ftfy would have repaired: plain text is unaffected, ligatures and odd Unicode forms are not -, HTML
entities unescaped twice, whitespace runs collapsed to one space, lowercase.
Like OpenAI's (and open_clip's) tokenizer, the literal strings "<start_of_text>" and "<end_of_text>"
in a text become the special ids; a text then ends at its first <end_of_text>, as OpenAI's model
reads it (it pools at the first end id).

The one idea to take away: BPE is a lookup table of merges applied greedily by rank. Text -> bytes
-> printable symbols -> repeatedly fuse the adjacent pair that was most frequent in training.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import warnings
from pathlib import Path

import torch

CONTEXT_LENGTH = 77  # every OpenAI CLIP model reads 77 token positions
N_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges of the file
SOT, EOT = "<start_of_text>", "<end_of_text>"  # open_clip's spelling of OpenAI's two special tokens
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_WARNED = False  # the missing-ftfy warning is given once per process
# OpenAI's pre-tokenizer: special tokens, English contractions, letter runs, single digits, and runs
# of everything else (punctuation, symbols, emoji); whitespace separates but is never a token.
PATTERN = SOT + "|" + EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bpe_path() -> Path:
    """The merges file: $MINIVL_CLIP_BPE, else the copy inside open_clip_torch or openai-clip."""
    env = os.environ.get("MINIVL_CLIP_BPE")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"$MINIVL_CLIP_BPE names {env}, which is not a file")
        return Path(env)
    for package in ("open_clip", "clip"):
        try:  # find_spec locates a package without importing it (open_clip's __init__ needs torchvision)
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / BPE_FILE).is_file():
                return Path(folder) / BPE_FILE
    raise FileNotFoundError(
        f"OpenAI's BPE merges ({BPE_FILE}) ship inside the open_clip_torch package: "
        "pip install --no-deps open_clip_torch (or openai-clip), or set $MINIVL_CLIP_BPE to the file")


def bytes_to_symbols() -> list[str]:
    """The 256 byte values -> 256 printable characters (index = byte), OpenAI's and GPT-2's table.

    Why: BPE merges strings, and whitespace or control characters in a merges file would be
    unreadable. Printable Latin-1 bytes stand for themselves; the others (0-32, 127-160, 173) are
    moved, in order, to code points 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, moved = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return [table[b] for b in range(256)]


def clean(text: str) -> str:
    """OpenAI's cleaning: ftfy (when installed), HTML unescaped twice, whitespace collapsed, lowercased."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:  # optional: without it, texts ftfy would repair (ligatures, odd Unicode forms) differ
        global _WARNED
        if not _WARNED:
            _WARNED = True
            warnings.warn("ftfy is not installed: OpenAI's tokenizer repairs text with ftfy.fix_text first, so "
                          "texts with mojibake, ligatures or unusual Unicode forms tokenize differently "
                          "(pip install ftfy)", stacklevel=3)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class OpenAITokenizer:
    """Strings -> OpenAI CLIP ids; `tok(texts)` -> dict(input_ids (B, 77), attention_mask (B, 77)).

    The call has the signature of `minivl.tokenizer.Tokenizer.__call__` (context_length, truncate),
    so a model's `tokenize` works with either. The merges are read on first use.
    """

    vocab_size = 256 * 2 + N_MERGES + 2  # 49408
    sot_id, eot_id = vocab_size - 2, vocab_size - 1
    pad_id = 0  # OpenAI pads with id 0 (the symbol "!"): padding is found from eot, never from this id

    def __init__(self, path: str | Path | None = None) -> None:
        self._path = path
        self._ranks: dict[tuple[str, str], int] | None = None
        self._cache: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"OpenAITokenizer(vocab_size={self.vocab_size}, context_length={CONTEXT_LENGTH})"

    def _load(self) -> None:
        import regex  # \p{L} / \p{N}: Unicode classes the standard `re` lacks
        path = Path(self._path) if self._path is not None else bpe_path()
        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a readable gzip merges file ({type(e).__name__}: {e})") from e
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a version header
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} does not hold OpenAI's {N_MERGES} BPE merges (got {len(merges)} lines)")
        self._byte_symbol = bytes_to_symbols()  # byte -> symbol
        self._symbol_byte = {c: b for b, c in enumerate(self._byte_symbol)}
        base = sorted(self._byte_symbol)  # ids 0..255: the symbols in code-point order ("!" is 0)
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [SOT, EOT]
        self._ids = {tok: i for i, tok in enumerate(vocab)}
        self._tokens = vocab
        self._ranks = {m: r for r, m in enumerate(merges)}
        self._pattern = regex.compile(PATTERN, regex.IGNORECASE)

    def _bpe(self, piece: str) -> list[int]:
        """One pre-token (already mapped to byte symbols) -> its ids, by merging pairs in rank order."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]  # the end-of-word marker rides on the last symbol
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self._ranks.get(p, len(self._ranks)))
            if best not in self._ranks:
                break  # no pair left that training ever merged
            merged, i = [], 0
            while i < len(word):  # fuse every occurrence of the best pair, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self._ids[s] for s in word]
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """A string -> its ids without <start_of_text>/<end_of_text> framing."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._ranks is None:
            self._load()
        ids = []
        for piece in self._pattern.findall(clean(text)):
            if piece in (SOT, EOT):  # as OpenAI's: the literal strings are the special tokens
                ids.append(self._ids[piece])
                continue
            ids.extend(self._bpe("".join(self._byte_symbol[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids) -> str:
        """Ids -> text (lowercased and cleaned, as encoded); stops at <end_of_text>, skips <start_of_text>."""
        if self._ranks is None:
            self._load()
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        symbols = "".join(self._tokens[i] for i in ids if i != self.sot_id).replace("</w>", " ")
        data = bytes(self._symbol_byte[c] if c != " " else 32 for c in symbols)
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str], context_length: int | None = None,
                 truncate: bool = False) -> dict[str, torch.Tensor]:
        """-> dict(input_ids LongTensor (B, context_length) zero-padded, attention_mask (B, context_length)).

        A text longer than `context_length` (77 by default; special tokens included) raises
        ValueError unless `truncate=True`, which cuts it and keeps <end_of_text> last, as OpenAI's does.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not texts:
            raise TypeError(f"texts must be a str or a non-empty list of str, got {texts!r:.60}")
        context_length = CONTEXT_LENGTH if context_length is None else context_length
        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for start and end), got {context_length!r}")
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be a bool, got {type(truncate).__name__}")
        ids = torch.zeros(len(texts), context_length, dtype=torch.long)  # (B, T), OpenAI's zero padding
        mask = torch.zeros(len(texts), context_length, dtype=torch.long)  # (B, T)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
            row = [self.sot_id, *self.encode(text), self.eot_id]
            if len(row) > context_length:
                if not truncate:
                    raise ValueError(f"text {i} has {len(row)} tokens, more than context_length={context_length}; "
                                     f"pass truncate=True to cut it: {text[:60]!r}")
                row = row[:context_length - 1] + [self.eot_id]
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def openai_tokenizer() -> OpenAITokenizer:
    """The one shared OpenAI tokenizer (its merges read once, on first use)."""
    return OpenAITokenizer()


__all__ = ["CONTEXT_LENGTH", "OpenAITokenizer", "openai_tokenizer", "bpe_path", "bytes_to_symbols", "clean"]
