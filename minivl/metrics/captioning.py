"""Caption metrics: corpus BLEU-1..4 and CIDEr-D, as the COCO caption evaluation computes them.

Papers: BLEU (Papineni et al., 2002), CIDEr / CIDEr-D (Vedantam et al., 2015), evaluated as in
the COCO caption server (Chen et al., 2015, `pycocoevalcap`); the tests check equality with
pycocoevalcap's Bleu and Cider scorers.

The one idea: both metrics count n-grams (runs of n consecutive words) that a candidate shares
with several human references. BLEU asks "what fraction of my n-grams appear in some reference"
(precision, clipped so repeating a word does not pay) and punishes short candidates; CIDEr
weights each n-gram by tf-idf, so n-grams that every caption in the corpus uses ("a", "of a")
count little and the ones specific to this image count a lot.

Both take captions as strings, tokenized by `tokenize_caption`, or as lists of tokens. The n-gram
bookkeeping is vectorised with NumPy: every n-gram gets an integer id, and all counting, clipping
and tf-idf work is done on flat arrays of (sentence, n-gram id, count) entries.
"""
from __future__ import annotations

import re

import numpy as np

from minivl.metrics._checks import check_int, check_real, check_seq

MAX_N = 10  # longest n-gram order accepted: past it every score is 0 and the tables only grow
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def tokenize_caption(text: str) -> list[str]:
    """The simple tokenizer: lowercase; words are runs of letters and digits, keeping inner
    apostrophes and hyphens ("don't", "t-shirt"); every other character separates words.

    It agrees with COCO's PTB tokenizer + punctuation removal on plain captions ("A red circle,
    left of a blue square." -> a red circle left of a blue square); PTB also splits contractions
    ("do n't"), which this does not.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a caption string, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def _tokens(caption, where: str) -> list[str]:
    if isinstance(caption, str):
        return tokenize_caption(caption)
    if isinstance(caption, (list, tuple)) and all(isinstance(w, str) for w in caption):
        return list(caption)
    raise TypeError(f"{where} must be a string or a list of token strings, got {type(caption).__name__} "
                    f"{caption!r:.60}")


def _corpus(candidates, references) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Tokenize and validate: one candidate and a non-empty list of references per image."""
    # a string is iterable too: scoring its characters as captions would be silently wrong
    candidates, references = check_seq(candidates, "candidates"), check_seq(references, "references")
    if len(candidates) != len(references):
        raise ValueError(f"need one reference list per candidate, got {len(candidates)} candidates "
                         f"and {len(references)} reference lists")
    if len(candidates) == 0:
        raise ValueError("empty corpus: no candidates to score")
    cands = [_tokens(c, f"candidates[{i}]") for i, c in enumerate(candidates)]
    refs = []
    for i, rs in enumerate(references):
        if not isinstance(rs, (list, tuple)) or len(rs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {rs!r:.60}")
        refs.append([_tokens(r, f"references[{i}][{j}]") for j, r in enumerate(rs)])
    return cands, refs


def _ngram_counts(sentences: list[list[str]], n: int):
    """Count every 1..n-gram of every sentence.

    Returns four int64 arrays of equal length E: sentence s[e] contains n-gram g[e] (of order
    k[e] words) c[e] times. N-gram ids are shared by all sentences: equal ids, equal n-grams.
    An id for a k-gram is built from the id of its (k-1)-word prefix and its last word, so no
    tuple of words is ever hashed in Python.
    """
    vocab: dict[str, int] = {}
    words = np.array([vocab.setdefault(w, len(vocab)) for s in sentences for w in s], dtype=np.int64)
    lengths = np.array([len(s) for s in sentences], dtype=np.int64)
    sent_of = np.repeat(np.arange(len(sentences)), lengths)  # sentence of each word position
    end_of = np.cumsum(lengths)[sent_of]  # one past the sentence's last word
    pos = np.arange(len(words))
    s_all, g_all, k_all = [], [], []
    gram = words  # id of the k-gram starting at each position (meaningful where it fits)
    n_ids = 0
    for k in range(1, n + 1):
        if k > 1 and len(words):
            last = words[np.minimum(pos + k - 1, len(words) - 1)]
            _, gram = np.unique(gram * (len(vocab) + 1) + last, return_inverse=True)
            gram = gram.reshape(-1)
        fits = pos + k <= end_of  # the k-gram stays inside its sentence
        s_all.append(sent_of[fits])
        g_all.append(gram[fits] + n_ids)  # offset: ids of different orders never collide
        k_all.append(np.full(int(fits.sum()), k))
        n_ids += len(words) + 1
    s, g, k = np.concatenate(s_all), np.concatenate(g_all), np.concatenate(k_all)
    key, first, count = np.unique(s * n_ids + g, return_index=True, return_counts=True)
    return key // n_ids, key % n_ids, k[first], count


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[keys == q] for each query (keys sorted and unique), 0 where q is absent."""
    if len(keys) == 0:
        return np.zeros(len(queries), dtype=values.dtype)
    at = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[at] == queries, values[at], 0)


def _table(cands, refs, n):
    """N-gram table of candidates (sentences 0..N-1) then references, with image of each sentence.

    Also returns G, a bound on n-gram ids, so that image * G + gram keys an (image, n-gram) pair.
    """
    flat_refs = [r for rs in refs for r in rs]
    ref_img = np.repeat(np.arange(len(refs)), [len(rs) for rs in refs])
    sent, gram, order, count = _ngram_counts(cands + flat_refs, n)
    image = np.concatenate([np.arange(len(cands)), ref_img])[sent]
    lengths = np.array([len(s) for s in cands + flat_refs], dtype=np.int64)
    G = int(gram.max()) + 1 if len(gram) else 1
    return sent, gram, order, count, image, ref_img, lengths, G


def bleu(candidates, references, n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..n with several references per candidate, as in the COCO caption evaluation.

    p_k = sum_i sum_{g in k-grams(cand_i)} min(count_i(g), max_j count_ij(g)) / sum_i (len_i - k + 1)+
    BLEU-n = BP * exp((1/n) * sum_{k<=n} log p_k),   BP = min(1, exp(1 - r / c))
    with c the total candidate length and r the total "closest" reference length (per candidate,
    the reference length nearest to its length, the shorter one on ties). Counts are summed over
    the corpus before dividing (corpus BLEU, not a mean of sentence BLEUs).
    Defined values: BLEU-n = 0 when some p_k (k <= n) is 0. pycocoevalcap instead adds 1e-15 /
    1e-9 to every count, reporting a tiny positive number (~1e-4..1e-3 for BLEU-4) there.
    """
    n = check_int(n, "n", 1, MAX_N)
    cands, refs = _corpus(candidates, references)
    N = len(cands)
    sent, gram, order, count, image, ref_img, lengths, G = _table(cands, refs, n)
    cand_len, ref_len = lengths[:N], lengths[N:]

    # Clip: a candidate n-gram counts at most as often as in the reference that has it most.
    is_ref = sent >= N
    ref_key = image[is_ref] * G + gram[is_ref]
    keys, inverse = np.unique(ref_key, return_inverse=True)
    max_ref = np.zeros(len(keys), dtype=np.int64)
    np.maximum.at(max_ref, inverse.reshape(-1), count[is_ref])
    cand_key = image[~is_ref] * G + gram[~is_ref]
    clipped = np.minimum(count[~is_ref], _lookup(keys, max_ref, cand_key))
    correct = np.bincount(order[~is_ref] - 1, weights=clipped, minlength=n)  # (n,)
    guess = np.array([np.maximum(cand_len - k + 1, 0).sum() for k in range(1, n + 1)])  # (n,)

    # Brevity penalty with the closest reference length (ties -> shorter reference).
    gap = np.abs(ref_len - cand_len[ref_img])
    packed = gap * (ref_len.max() + 1) + ref_len  # order by (gap, length) in one integer
    best = np.full(N, packed.max() + 1)
    np.minimum.at(best, ref_img, packed)
    c, r = cand_len.sum(), (best % (ref_len.max() + 1)).sum()
    bp = 1.0 if c > r else (np.exp(1.0 - r / c) if c > 0 else 0.0)

    scores = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.log(correct / np.maximum(guess, 1))  # -inf where nothing matched
    for k in range(1, n + 1):
        ok = np.all(correct[:k] > 0)
        scores[f"BLEU-{k}"] = float(bp * np.exp(log_p[:k].mean())) if ok else 0.0
    return scores


def cider_d_scores(candidates, references, n: int = 4, sigma: float = 6.0) -> np.ndarray:
    """Per-image CIDEr-D (N,), as pycocoevalcap's Cider computes it.

    Each sentence becomes, per order k, a vector of tf-idf weights over k-grams:
        w(g) = count(g) * (log |I| - log max(1, df(g))),  df(g) = #images whose references contain g
    (idf comes from the references of the evaluated corpus itself). For candidate c and its
    references r_1..r_m:
        CIDEr-D = 10/m * sum_j (1/n) sum_k  <min(w_c, w_rj), w_rj> / (|w_c| |w_rj|) * exp(-(l_c - l_rj)^2 / (2 sigma^2))
    The "-D" parts: clipping the candidate weights at the reference's (min), and the Gaussian
    penalty on the length difference, both against gaming the metric. The cosine is 0 when
    either vector is zero (e.g. an empty caption).
    pycocoevalcap measures length as the number of bigrams (len - 1, or 0); the penalty differs
    only when a sentence is empty, where the cosine is 0 anyway, so the scores are equal.
    """
    n = check_int(n, "n", 1, MAX_N)
    if check_real(sigma, "sigma") <= 0:
        raise ValueError(f"sigma (the length penalty's width) must be > 0, got {sigma}")
    cands, refs = _corpus(candidates, references)
    N = len(cands)
    if N < 2:
        raise ValueError("CIDEr-D needs a corpus of at least 2 images: with one image every "
                         "idf is log(1) - log(1) = 0")
    sent, gram, order, count, image, ref_img, lengths, G = _table(cands, refs, n)
    is_ref = sent >= N

    # Document frequency: in how many images' reference sets each n-gram occurs.
    img_gram = np.unique(image[is_ref] * G + gram[is_ref])
    df = np.bincount(img_gram % G, minlength=G)
    weight = count * (np.log(N) - np.log(np.maximum(df[gram], 1)))  # tf-idf of each entry

    n_sent = len(lengths)
    norm = np.sqrt(np.bincount(sent * n + order - 1, weights=weight**2, minlength=n_sent * n))
    norm = norm.reshape(n_sent, n)  # (sentences, n)

    # <min(w_c, w_r), w_r>: only n-grams present in both the candidate and the reference count.
    cand_key = image[~is_ref] * G + gram[~is_ref]  # sorted: entries are by sentence
    ref_key = image[is_ref] * G + gram[is_ref]
    w_cand = _lookup(cand_key, weight[~is_ref], ref_key)
    w_ref = weight[is_ref]
    dot = np.bincount((sent[is_ref] - N) * n + order[is_ref] - 1,
                      weights=np.minimum(w_cand, w_ref) * w_ref, minlength=(n_sent - N) * n)
    dot = dot.reshape(n_sent - N, n)  # (references, n)

    denom = norm[ref_img] * norm[N:]  # (references, n): |w_c| |w_r|
    cosine = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
    delta = lengths[:N][ref_img] - lengths[N:]  # (references,)
    penalty = np.exp(-(delta.astype(float) ** 2) / (2 * sigma**2))
    per_ref = cosine.mean(1) * penalty  # (references,)
    n_refs = np.bincount(ref_img, minlength=N)
    return 10.0 * np.bincount(ref_img, weights=per_ref, minlength=N) / n_refs


def cider_d(candidates, references, n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_scores`, as pycocoevalcap returns it (e.g. 1.10;
    papers print it x100, "CIDEr 110", and BLEU x100 too)."""
    return float(cider_d_scores(candidates, references, n=n, sigma=sigma).mean())
