"""The one decoding engine: every generative model in minivl produces text through `generate`.

Strategies: greedy; sampling with a temperature, top-k (Fan et al., 2018, "Hierarchical Neural
Story Generation") and top-p / nucleus filtering (Holtzman et al., 2020, "The Curious Case of
Neural Text Degeneration"); beam search ranking hypotheses by sum log p / length ** alpha (the
simple form of the length penalty of Wu et al., 2016, "Google's Neural Machine Translation
System"). Rules shared by all: the CTRL repetition penalty (Keskar et al., 2019), min/max new
tokens, stop at eos and pad after it, never emit pad. Prompts may be batched with different
lengths, padded on either side: they are left-aligned here and each row decodes as if alone.

The engine knows nothing about the model beyond a small protocol (`Decoder`), so the causal LM,
a BLIP-style captioner (cross-attention to image patches: pass `memory`) and a LLaVA-style model
(image tokens as prefix embeddings: pass `inputs_embeds`) all decode through the same code.

The one idea to take away: decoding is a loop of "logits of the next token -> pick -> append",
and the strategies differ only in the pick; the KV cache makes each append cost one position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from minivl import validate


class Decoder(Protocol):
    """What `generate` needs from a model (`minivl.lm.CausalLM` has it; other families wrap one).

    - an `nn.Module` (decoding runs in eval mode and restores the mode) with a `config` holding
      `vocab_size`, `context_length` and optionally `eos_id` / `pad_id` (defaults for generate);
    - `embed(input_ids=None, inputs_embeds=None) -> (B, P + T, D)`: the prefix embeddings followed by
      the token embeddings, no positions yet;
    - `forward(input_ids=None, attention_mask=None, *, inputs_embeds=None, cache=None, memory=None,
      memory_mask=None, memory_groups=1) -> logits (B, N, V)` for N new positions. attention_mask
      (B, past + N) covers the cached positions too (1 = real, 0 = pad) and positions must come from
      it (position = real tokens before), so that a left-padded row gives the logits it would alone.
      memory/memory_mask are passed only when given (cross-attention models); beam search passes them
      once per prompt with memory_groups=K, the K beams of prompt b being rows b*K .. b*K + K - 1. The
      engine calls it with `inputs_embeds` (the prompt; without a cache, the whole sequence) or with
      one new token per row and the cache;
    - optional `new_cache()`: an empty KV cache, a list of per-layer caches with `reorder(index)`
      (`minivl.transformer.LayerCache`). Without it the engine recomputes the sequence every step.
    """

    config: object

    def embed(self, input_ids=None, inputs_embeds=None) -> torch.Tensor: ...

    def __call__(self, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor: ...


def _check_logits(logits) -> torch.Tensor:
    # -inf is a legitimate logit here (an earlier filter's), NaN is not: no finite check
    return validate.tensor("logits", logits, kind="float")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf (ties at the k-th are kept)."""
    k = validate.positive_int("top_k", k)
    logits = _check_logits(logits)
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p."""
    p = validate.real("top_p", p, 0.0, 1.0, low_open=True)
    logits = _check_logits(logits)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p  # the most likely token always stays (before == 0 < p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on tokens already present (seen (B, V) bool): positive logits / penalty,
    negative ones * penalty, so a seen token always becomes less likely. Returns a new tensor."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


@dataclass
class _Rules:
    """What every strategy applies to the next-token logits before picking."""

    eos: int
    pad: int
    min_new: int = 0
    penalty: float = 1.0

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor, step: int, log_probs: bool = False) -> torch.Tensor:
        """With log_probs, the bans apply after log_softmax, so beam scores stay the model's own
        log-probabilities (what continuation_logprob computes) instead of being renormalised."""
        logits = logits.float()
        if self.penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, self.penalty)
        if log_probs:
            logits = logits.log_softmax(-1)
        banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        banned[self.pad] = self.pad != self.eos  # pad is never generated (unless it doubles as eos)
        banned[self.eos] = step < self.min_new
        return logits.masked_fill(banned, float("-inf"))


class _Rows:
    """The sequences being decoded, one row per prompt (or per beam): mask, cache, tokens seen."""

    def __init__(self, decoder, x: torch.Tensor, mask: torch.Tensor, seen: torch.Tensor, extra: dict,
                 use_cache: bool) -> None:
        self.decoder, self.x, self.mask, self.seen, self.extra = decoder, x, mask, seen, extra
        self.cache = decoder.new_cache() if use_cache and hasattr(decoder, "new_cache") else None

    def start(self) -> torch.Tensor:
        """Run the prompt: logits of the first new token (B, V)."""
        cache = {} if self.cache is None else {"cache": self.cache}
        return self.decoder(inputs_embeds=self.x, attention_mask=self.mask, **cache, **self.extra)[:, -1]

    def append(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,); logits of the next one (B, V)."""
        self.seen = self.seen.scatter(1, tokens[:, None], True)
        self.mask = F.pad(self.mask, (0, 1), value=1)  # (B, S + 1)
        if self.cache is not None:  # one new position; the cache holds the rest
            return self.decoder(tokens[:, None], self.mask, cache=self.cache, **self.extra)[:, -1]
        self.x = torch.cat([self.x, self.decoder.embed(tokens[:, None])], 1)  # (B, S + 1, D)
        return self.decoder(inputs_embeds=self.x, attention_mask=self.mask, **self.extra)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B*K,): the beams that continue. Each index stays within its prompt's K
        rows, so the memory (the prompt's image, one row for its K beams) needs no reordering."""
        self.mask, self.seen = self.mask[index], self.seen[index]
        if self.cache is None:
            self.x = self.x[index]
        else:
            for layer in self.cache:
                layer.reorder(index, memory=False)


def _prepare_prompt(decoder, input_ids, attention_mask, inputs_embeds):
    """Prompt as embeddings (B, S, D) with its mask (B, S), left-aligned (real slots at the end,
    S = the longest prompt), and its token ids (B, P + T) with -1 at pads and prefix slots."""
    if input_ids is not None:  # converted here (numpy, uint8: -1 marks pads below), checked by embed
        input_ids = validate.tensor("input_ids", input_ids)
        if input_ids.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
            input_ids = input_ids.long()
    x = decoder.embed(input_ids, inputs_embeds)  # (B, S, D)
    B, S = x.shape[:2]
    P = 0 if inputs_embeds is None else inputs_embeds.shape[1]
    mask = torch.ones(B, S, dtype=torch.long, device=x.device)
    if attention_mask is not None:
        attention_mask = validate.tensor("attention_mask", attention_mask)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (S, S - P):
            raise ValueError(f"attention_mask must be (B={B}, {S - P}) or ({B}, {S}), got {tuple(attention_mask.shape)}")
        attention_mask = validate.attention_mask("attention_mask", attention_mask, tuple(attention_mask.shape))  # 0/1
        mask[:, S - attention_mask.shape[1]:] = attention_mask.long()  # the prefix counts as real
    longest = int(mask.sum(1).max())
    if int(mask.sum(1).min()) == 0:
        raise ValueError("every prompt needs at least one real token (start it with bos)")
    order = mask.argsort(dim=1, stable=True)[:, S - longest:]  # (B, longest): pads first, real slots in order
    x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))  # (B, longest, D)
    ids = None
    if input_ids is not None:
        ids = torch.cat([input_ids.new_full((B, P), -1), input_ids], 1).masked_fill(mask == 0, -1)  # (B, S)
    return x, mask.gather(1, order), ids


def _alias(name: str, ours, theirs):
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(f"{name}_id={ours} and {name}_token_id={theirs} disagree: pass one")
    return theirs if ours is None else ours


@torch.no_grad()
def generate(decoder: Decoder, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             *, max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             repetition_penalty: float = 1.0, eos_id: int | None = None, pad_id: int | None = None,
             memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
             inputs_embeds: torch.Tensor | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, eos_token_id: int | None = None, pad_token_id: int | None = None
             ) -> torch.Tensor:
    """New tokens (B, T_new), T_new <= max_new_tokens; after a row's eos come pad_id tokens.

    The prompt is the prefix `inputs_embeds` (B, P, D) then `input_ids` (B, T) (either may be
    absent), with attention_mask (B, T) or (B, P + T), 0 = pad, on either side; each row decodes
    as if alone. `memory` (B, S, Dm) / `memory_mask` (B, S) go to the decoder's cross-attention.
    Greedy by default; do_sample=True samples from softmax(logits / temperature) after top_k /
    top_p filtering (a seeded `generator` makes it repeatable); num_beams > 1 runs beam search,
    ranking finished hypotheses by sum log p / n_new_tokens ** length_penalty. pad_id is never
    generated; eos is suppressed for the first min_new_tokens steps. eos_id / pad_id default to
    decoder.config's; transformers' names eos_token_id / pad_token_id are accepted too. Unlike
    transformers, only the new tokens are returned. use_cache=False recomputes the whole sequence
    every step (the reference the KV cache must match). Runs in eval mode and restores the mode.
    Raises ValueError if the longest prompt + max_new_tokens exceeds config.context_length.
    """
    c = decoder.config
    eos_id = _alias("eos", eos_id, eos_token_id)
    pad_id = _alias("pad", pad_id, pad_token_id)
    eos_id = getattr(c, "eos_id", None) if eos_id is None else eos_id
    pad_id = getattr(c, "pad_id", None) if pad_id is None else pad_id
    if eos_id is None or pad_id is None:
        raise ValueError("generate needs eos_id and pad_id (pass them or set them in the decoder's config)")
    eos_id = validate.vocab_id("eos_id", eos_id, c.vocab_size, optional=False)
    pad_id = validate.vocab_id("pad_id", pad_id, c.vocab_size, optional=False)
    # Every argument is checked whatever the mode: a top_p=1.5 or temperature=nan that greedy
    # decoding happens to ignore today is still a bug in the caller's code.
    max_new_tokens = validate.positive_int("max_new_tokens", max_new_tokens)
    min_new_tokens = validate.positive_int("min_new_tokens", min_new_tokens, minimum=0)
    if min_new_tokens > max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    do_sample, use_cache = validate.boolean("do_sample", do_sample), validate.boolean("use_cache", use_cache)
    temperature = validate.real("temperature (use do_sample=False for greedy)", temperature, 0.0, low_open=True)
    repetition_penalty = validate.real("repetition_penalty (1.0 = off)", repetition_penalty, 0.0, low_open=True)
    length_penalty = validate.real("length_penalty", length_penalty)
    num_beams = validate.positive_int("num_beams", num_beams)
    distinct = c.vocab_size ** min(max_new_tokens, 8)  # more beams than sequences cannot all differ
    if num_beams > distinct:  # and each beam is a row in memory: a typo like 10**9 would exhaust it
        raise ValueError(f"num_beams must be <= {distinct} (vocab_size ** max_new_tokens, the distinct "
                         f"continuations), got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam search here is deterministic: use num_beams=1 with do_sample=True")
    if top_k is not None:
        top_k = validate.positive_int("top_k", top_k)
    if top_p is not None:
        top_p = validate.real("top_p", top_p, 0.0, 1.0, low_open=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if memory is None and memory_mask is not None:
        raise ValueError("memory_mask given without memory")
    if memory is not None:  # the decoder checks it against its config; converted here to be repeated for beams
        memory = validate.tensor("memory", memory, dims=3, kind="float")
        memory_mask = None if memory_mask is None else validate.tensor("memory_mask", memory_mask, dims=2)
    x, mask, ids = _prepare_prompt(decoder, input_ids, attention_mask, inputs_embeds)
    if x.shape[1] + max_new_tokens > c.context_length:
        raise ValueError(f"prompt of {x.shape[1]} positions + max_new_tokens={max_new_tokens} exceeds the "
                         f"context length {c.context_length}")
    seen = torch.zeros(x.shape[0], c.vocab_size + 1, dtype=torch.bool, device=x.device)
    if ids is not None:  # prompt tokens count as seen for the repetition penalty (pads go to column V)
        seen.scatter_(1, ids.masked_fill(ids < 0, c.vocab_size), True)
    seen = seen[:, :-1]  # (B, V)
    extra = {} if memory is None else {"memory": memory, "memory_mask": memory_mask}
    if num_beams > 1:  # every beam is a row of its own: repeat the prompt K times...
        x, mask, seen = (t.repeat_interleave(num_beams, 0) for t in (x, mask, seen))
        if memory is not None:  # ...but not the image: the K beams of a prompt read its memory row together
            extra["memory_groups"] = num_beams
    rules = _Rules(eos=eos_id, pad=pad_id, min_new=min_new_tokens, penalty=repetition_penalty)
    was_training = decoder.training
    if was_training:  # (module.train walks every submodule: not twice per call when already in eval mode)
        decoder.eval()
    try:
        rows = _Rows(decoder, x, mask, seen, extra, use_cache)
        if num_beams > 1:
            return _beam_search(rows, rules, num_beams, max_new_tokens, length_penalty)
        return _sample(rows, rules, max_new_tokens, do_sample, temperature, top_k, top_p, generator)
    finally:
        if was_training:
            decoder.train()


def _sample(rows: _Rows, rules: _Rules, max_new: int, do_sample: bool, temperature: float, top_k, top_p,
            generator) -> torch.Tensor:
    """Greedy (argmax) or sampling, one token per row per step."""
    logits = rows.start()  # (B, V)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    out = []
    for step in range(max_new):
        logits = rules(logits, rows.seen, step)
        if do_sample:
            logits = logits / temperature
            if top_k is not None:
                logits = top_k_filter(logits, top_k)
            if top_p is not None:
                logits = top_p_filter(logits, top_p)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
        else:
            nxt = logits.argmax(-1)  # (B,)
        nxt = nxt.masked_fill(done, rules.pad)
        out.append(nxt)
        done |= nxt == rules.eos
        if step == max_new - 1 or done.all():
            break
        logits = rows.append(nxt)
    return torch.stack(out, 1)  # (B, T_new)


def _beam_search(rows: _Rows, rules: _Rules, K: int, max_new: int, length_penalty: float) -> torch.Tensor:
    """Beam search over rows = B prompts x K beams; per prompt, the best finished hypothesis.

    All bookkeeping stays on the device as (B, ...) tensors, so a step costs one host sync (are all
    prompts done?) however many prompts and beams there are. Per prompt and step: the 2K best
    (beam, token) candidates, in score order; an eos candidate ranked before the K-th running one
    joins the prompt's K best finished hypotheses; the first K others are the new beams.
    """
    logits = rows.start()  # (B*K, V)
    (BK, V), dev, inf = logits.shape, logits.device, float("-inf")
    B, T = BK // K, max_new + 1
    scores = torch.full((B, K), inf, device=dev)
    scores[:, 0] = 0.0  # all beams start equal: only the first expands
    tokens = torch.empty(BK, 0, dtype=torch.long, device=dev)
    fin_scores = torch.full((B, K), inf, device=dev)  # per prompt: its K best hypotheses ending in eos,
    fin_tokens = torch.full((B, K, T), rules.pad, dtype=torch.long, device=dev)  # best first
    fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    base = torch.arange(B, device=dev)[:, None] * K  # (B, 1): each prompt's first row
    rank = torch.arange(2 * K, device=dev)  # (2K,)

    def norm(score, n):  # the ranking of Wu et al., simplified
        return score / n**length_penalty

    for step in range(max_new):
        logp = rules(logits, rows.seen, step, log_probs=True).float()  # (B*K, V)
        cand = (scores.reshape(BK, 1) + logp).reshape(B, K * V)
        top, idx = cand.topk(2 * K, dim=1)  # (B, 2K) in score order; 2K: even if K end in eos, K go on
        top = top.masked_fill(done[:, None], inf)  # a finished prompt takes nothing more
        beam, tok = idx // V, idx % V  # (B, 2K)
        valid, eos = top > inf, tok == rules.eos
        running = valid & ~eos
        before = running.cumsum(1) - running.long()  # running candidates ranked above each one
        ends = valid & eos & (before < K)  # eos candidates the loop reaches before K beams are full
        # the new beams: the first K running candidates; unfilled slots keep their row, pad, score -inf
        key = torch.where(running, rank, 2 * K + rank)  # (B, 2K): running ones first, in score order
        pick = key.argsort(1)[:, :K]  # (B, K)
        took = running.gather(1, pick)  # (B, K)
        new_scores = top.gather(1, pick).masked_fill(~took, inf)
        src = torch.where(took, base + beam.gather(1, pick), base + rank[:K])  # (B, K) rows continued
        new_tok = torch.where(took, tok.gather(1, pick), rules.pad)  # (B, K)
        # finished: the K best of the old ones and this step's (old first, so ties keep the old)
        seqs = torch.cat([tokens[base + beam], tok[..., None]], 2)  # (B, 2K, step + 1): each candidate's tokens
        seqs = F.pad(seqs, (0, T - step - 1), value=rules.pad)  # (B, 2K, T)
        pool = torch.cat([fin_scores, norm(top, step + 1).masked_fill(~ends, inf)], 1)  # (B, 3K)
        order = pool.sort(dim=1, descending=True, stable=True).indices[:, :K]  # (B, K)
        fin_scores = pool.gather(1, order)
        fin_tokens = torch.cat([fin_tokens, seqs], 1).gather(1, order[..., None].expand(B, K, T))
        fin_len = torch.cat([fin_len, torch.full_like(top, step + 1, dtype=torch.long)], 1).gather(1, order)
        # Stop a prompt only when no running beam can still beat its K-th finished one: log-probs only
        # fall, so the best a beam can reach is its sum now at the most favourable length.
        length = max_new if length_penalty > 0 else step + 2
        done = done | ~took[:, 0] | ((fin_scores[:, -1] > inf) & (fin_scores[:, -1] >= norm(new_scores[:, 0], length)))
        index, new = src.flatten(), new_tok.flatten()  # (B*K,)
        tokens, scores = torch.cat([tokens[index], new[:, None]], 1), new_scores  # (B*K, step + 1)
        if step == max_new - 1 or bool(done.all()):  # the one host sync of the step
            break
        rows.reorder(index)
        logits = rows.append(new)
    # beams still running at the end compete with the finished ones (finished first: ties keep them)
    n = tokens.shape[1]
    live = norm(scores, n).masked_fill(done[:, None], inf)  # (B, K)
    pool = torch.cat([fin_scores, live], 1)  # (B, 2K)
    seqs = torch.cat([fin_tokens, F.pad(tokens.reshape(B, K, n), (0, T - n), value=rules.pad)], 1)  # (B, 2K, T)
    lengths = torch.cat([fin_len, torch.full_like(fin_len, n)], 1)  # (B, 2K)
    best = pool.argmax(1)  # (B,): the first of the best
    out = seqs[torch.arange(B, device=dev), best]  # (B, T)
    return out[:, :int(lengths.gather(1, best[:, None]).max())]  # (B, T_new)


@torch.no_grad()
def continuation_logprob(decoder: Decoder, input_ids: torch.Tensor | None, new_tokens: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, *, eos_id: int | None = None,
                         memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                         inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(new token | prompt, earlier new tokens) up to and including the first eos,
    and the number of tokens counted: ((B,), (B,)). Scores what generate returned."""
    eos_id = getattr(decoder.config, "eos_id", None) if eos_id is None else eos_id
    if eos_id is None:
        raise ValueError("continuation_logprob needs eos_id (pass it or set it in the decoder's config)")
    eos_id = validate.vocab_id("eos_id", eos_id, decoder.config.vocab_size, optional=False)
    new_tokens = validate.token_ids("new_tokens", new_tokens, decoder.config.vocab_size)
    if memory is None and memory_mask is not None:
        raise ValueError("memory_mask given without memory")
    x, mask, _ = _prepare_prompt(decoder, input_ids, attention_mask, inputs_embeds)
    if new_tokens.shape[0] != x.shape[0]:
        raise ValueError(f"new_tokens has batch {new_tokens.shape[0]}, the prompt {x.shape[0]}")
    if x.shape[1] + new_tokens.shape[1] > decoder.config.context_length:
        raise ValueError(f"prompt of {x.shape[1]} positions + {new_tokens.shape[1]} new tokens exceeds the "
                         f"context length {decoder.config.context_length}")
    is_eos = (new_tokens == eos_id).long()
    keep = (is_eos.cumsum(1) - is_eos) == 0  # (B, T_new): up to and including the first eos
    x = torch.cat([x, decoder.embed(new_tokens)], 1)  # (B, S + T_new, D)
    mask = torch.cat([mask, keep.long()], 1)
    extra = {} if memory is None else {"memory": memory, "memory_mask": memory_mask}
    logits = decoder(inputs_embeds=x, attention_mask=mask, **extra)
    T = new_tokens.shape[1]
    logp = logits[:, -T - 1:-1].float().log_softmax(-1).gather(-1, new_tokens[..., None])[..., 0]  # (B, T_new)
    return (logp * keep).sum(1), keep.sum(1)
