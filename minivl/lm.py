"""Decoder-only causal language model, and text generation with a KV cache.

Follows GPT-2 (Radford et al., 2019): token + learned position embeddings, causal pre-norm blocks
(minivl.transformer), a final LayerNorm and an output layer that reuses the token embedding
matrix (weight tying, Press & Wolf, 2017). Two optional inputs make the same model the text half
of the later floors: `memory` is read by cross-attention in every block (a BLIP-style captioner,
Li et al., 2022) and `inputs_embeds` is a prefix of vectors placed before the tokens (the image
tokens of a LLaVA-style multimodal LLM, Liu et al., 2023).

Decoding strategies (`CausalLM.generate`): greedy, sampling with temperature, top-k (Fan et al.,
2018) and top-p / nucleus (Holtzman et al., 2020), beam search with a length penalty (Wu et al.,
2016), the CTRL repetition penalty (Keskar et al., 2019), min/max new tokens, stop at eos.

The one idea to take away: a causal LM is trained on every prefix at once (one forward pass,
T next-token losses), and generates one token at a time; the KV cache makes each new token cost
one position instead of recomputing the whole sequence.

Conventions chosen here:
- Positions always come from the attention mask (position = number of real tokens before it), so
  left- and right-padded batches give each row exactly the logits it would get alone.
- `generate` accepts prompts padded on either side: it left-aligns them internally. The prompt
  is whatever precedes the first new token, so encode it without eos.
- pad/bos/eos ids may be stored in the config; `generate(eos_id=..., pad_id=...)` overrides them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minivl.checkpoint import Checkpointable
from minivl.transformer import LayerCache, Transformer, init_weights

PRESETS = {
    "tiny": dict(vocab_size=300, context_length=32, width=32, depth=2, heads=2),
    "cpu": dict(vocab_size=512, context_length=48, width=128, depth=4, heads=4),
    "gpu": dict(vocab_size=1024, context_length=64, width=384, depth=8, heads=6),
}


@dataclass
class LMConfig:
    vocab_size: int = 512  # token ids are 0 .. vocab_size - 1 (the tokenizer's vocab_size)
    context_length: int = 48  # positions available: prefix + prompt + generated tokens
    width: int = 128  # token width D
    depth: int = 4  # number of transformer blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    activation: str = "gelu"  # MLP non-linearity (see minivl.transformer.ACTIVATIONS)
    norm_eps: float = 1e-5  # LayerNorm epsilon
    dropout: float = 0.0  # attention/MLP/embedding dropout during training
    cross_attention: bool = False  # add cross-attention to a memory (the image) in every block
    memory_dim: int | None = None  # width of the memory vectors; None = same as width
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    pad_id: int | None = None  # defaults for generate(); None = must be passed to generate
    bos_id: int | None = None  # (informative: generate never adds bos, the prompt carries it)
    eos_id: int | None = None

    @classmethod
    def preset(cls, name: str, **overrides) -> "LMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown LM preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of every slot = real tokens before it; pads get 0 (their output is never read)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, S)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {k!r}")
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p  # the most likely token always stays (before == 0 < p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def repetition_penalty_(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on tokens already present: positive logits / penalty, negative ones * penalty."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


class CausalLM(Checkpointable, nn.Module):
    """Token ids (B, T) [+ prefix embeddings (B, P, D)] [+ memory (B, S, Dm)] -> logits (B, P+T, V)."""

    config_class = LMConfig

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(c.context_length, c.width))
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.width, c.depth, c.heads, c.mlp_ratio, c.activation,
                                       cross_attention=c.cross_attention, kv_dim=c.memory_dim,
                                       norm_eps=c.norm_eps, dropout=c.dropout)
        self.ln_final = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.width, c.vocab_size, bias=False)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.01)
        if c.tie_embeddings:  # one matrix reads tokens in and writes them out
            self.lm_head.weight = self.token_embedding.weight

    # ------------------------------------------------------------------ forward
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, T) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.is_floating_point():
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        V = self.config.vocab_size
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= V):
            raise ValueError(f"token ids must lie in [0, {V}), got [{input_ids.min()}, {input_ids.max()}]")

    def embed(self, input_ids: torch.Tensor | None = None,
              inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Prefix embeddings followed by token embeddings (no positions yet): (B, P+T, D)."""
        parts = []
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.width:
                raise ValueError(f"inputs_embeds must be (B, P, {self.config.width}), got {tuple(inputs_embeds.shape)}")
            parts.append(inputs_embeds)
        if input_ids is not None:
            self._check_ids(input_ids)
            if parts and parts[0].shape[0] != input_ids.shape[0]:
                raise ValueError(f"inputs_embeds has batch {parts[0].shape[0]}, input_ids {input_ids.shape[0]}")
            parts.append(self.token_embedding(input_ids))  # (B, T, D)
        if not parts:
            raise ValueError("pass input_ids, inputs_embeds or both")
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # (B, P+T, D)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, P+T, V) for the prefix `inputs_embeds` (B, P, D) then `input_ids` (B, T).

        attention_mask (B, past+P+T), 1 = real, 0 = pad, covers the cached positions too; a (B, T)
        mask for the tokens alone is accepted when there is a prefix and no cache (prefix = real).
        position_ids (B, P+T) default to positions_from_mask(mask), or past + 0, 1, 2, ... without one.
        memory (B, S, Dm) and memory_mask (B, S) feed the cross-attention (config.cross_attention).
        """
        x = self.embed(input_ids, inputs_embeds)  # (B, N, D), N = P + T
        B, N = x.shape[:2]
        past = len(cache[0].self_attn) if cache else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
                raise ValueError(f"attention_mask must be (B={B}, S), got {tuple(attention_mask.shape)}")
            P = 0 if inputs_embeds is None else inputs_embeds.shape[1]
            if P and not past and input_ids is not None and attention_mask.shape[1] == N - P:
                attention_mask = F.pad(attention_mask, (P, 0), value=1)  # (B, N)
            if attention_mask.shape[1] != past + N:
                raise ValueError(f"attention_mask must cover {past} cached + {N} new positions, "
                                 f"got {attention_mask.shape[1]}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past:]  # (B, N)
            else:
                position_ids = torch.arange(past, past + N, device=x.device).expand(B, N)
        if position_ids.shape != (B, N):
            raise ValueError(f"position_ids must be ({B}, {N}), got {tuple(position_ids.shape)}")
        if position_ids.max() >= self.config.context_length:
            raise ValueError(f"position {int(position_ids.max())} is beyond the context length "
                             f"{self.config.context_length}")
        if self.config.cross_attention and memory is None:
            raise ValueError("this LM has cross-attention: pass memory (B, S, memory_dim)")
        if not self.config.cross_attention and memory is not None:
            raise ValueError("memory given but the LM was built with cross_attention=False")
        if memory is not None and (memory.dim() != 3 or memory.shape[0] != B):
            raise ValueError(f"memory must be (B={B}, S, memory_dim), got {tuple(memory.shape)}")
        x = self.drop(x + self.pos_embed[position_ids])  # (B, N, D)
        h = self.transformer(x, attention_mask=attention_mask, causal=True, context=memory,
                             context_mask=memory_mask, cache=cache).last_hidden_state
        return self.lm_head(self.ln_final(h))  # (B, N, V)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean next-token cross-entropy over real targets.

        batch: input_ids (B, T), attention_mask (B, T); optional labels (B, T) aligned with
        input_ids (-100 = no loss there, e.g. the prompt), memory / memory_mask for cross-attention.
        """
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        logits = self(ids, mask, memory=batch.get("memory"), memory_mask=batch.get("memory_mask"))
        targets = batch.get("labels", ids)[:, 1:]  # (B, T-1): token t+1 is predicted at t
        if mask is not None:
            targets = targets.masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return loss, {"ppl": loss.detach().exp().item()}

    # ------------------------------------------------------------------ generation
    def _prepare_prompt(self, input_ids, attention_mask, inputs_embeds):
        """Prompt as embeddings (B, S, D) with its mask, left-aligned: real slots at the end."""
        x = self.embed(input_ids, inputs_embeds)  # (B, S, D)
        B, S = x.shape[:2]
        P = 0 if inputs_embeds is None else inputs_embeds.shape[1]
        mask = torch.ones(B, S, dtype=torch.long, device=x.device)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (S, S - P):
                raise ValueError(f"attention_mask must be (B={B}, {S - P}) or ({B}, {S}), "
                                 f"got {tuple(attention_mask.shape)}")
            mask[:, S - attention_mask.shape[1]:] = attention_mask.long()
        if (mask.sum(1) == 0).any():
            raise ValueError("every prompt needs at least one real token (start it with bos)")
        order = mask.argsort(dim=1, stable=True)  # pads first, real slots in their order after
        x = x.gather(1, order[..., None].expand_as(x))  # (B, S, D)
        ids = None
        if input_ids is not None:
            ids = torch.cat([input_ids.new_full((B, P), -1), input_ids], 1).masked_fill(mask == 0, -1)
        return x, mask.gather(1, order), ids

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 num_beams: int = 1, length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                 eos_id: int | None = None, pad_id: int | None = None, memory: torch.Tensor | None = None,
                 memory_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """New tokens (B, T_new), T_new <= max_new_tokens; after a row's eos come pad_id tokens.

        Prompts may be padded on either side (mask 0 = pad); each row decodes as if alone.
        Greedy by default; do_sample=True samples from softmax(logits / temperature) after top_k /
        top_p filtering; num_beams > 1 runs beam search, ranking finished hypotheses by
        sum log p / n_new_tokens ** length_penalty. pad_id is never generated; eos is suppressed
        for the first min_new_tokens steps. Runs in eval mode (no dropout) and restores the mode.
        Raises ValueError if the longest prompt + max_new_tokens exceeds context_length.
        """
        c = self.config
        eos_id = c.eos_id if eos_id is None else eos_id
        pad_id = c.pad_id if pad_id is None else pad_id
        if eos_id is None or pad_id is None:
            raise ValueError("generate needs eos_id and pad_id (pass them or set them in LMConfig)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
        if num_beams > 1 and do_sample:
            raise ValueError("beam search here is deterministic: use num_beams=1 with do_sample=True")
        x, mask, ids = self._prepare_prompt(input_ids, attention_mask, inputs_embeds)
        longest = int(mask.sum(1).max())
        if longest + max_new_tokens > c.context_length:
            raise ValueError(f"prompt of {longest} positions + max_new_tokens={max_new_tokens} exceeds the "
                             f"context length {c.context_length}")
        seen = torch.zeros(x.shape[0], c.vocab_size, dtype=torch.bool, device=x.device)
        if ids is not None:  # prompt tokens count as seen for the repetition penalty (pads go to column V)
            seen = F.pad(seen, (0, 1)).scatter_(1, ids.masked_fill(ids < 0, c.vocab_size), True)[:, :-1]
        opts = dict(min_new=min_new_tokens, eos=eos_id, pad=pad_id, penalty=repetition_penalty)
        was_training = self.training
        self.eval()
        try:
            if num_beams > 1:
                return self._beam_search(x, mask, memory, memory_mask, seen, num_beams, max_new_tokens,
                                         length_penalty, **opts)
            return self._sample(x, mask, memory, memory_mask, seen, max_new_tokens, do_sample, temperature,
                                top_k, top_p, generator, **opts)
        finally:
            self.train(was_training)

    def _process(self, logits, seen, step, *, min_new, eos, pad, penalty, log_probs=False):
        """Rules every strategy shares: repetition penalty, no pad, no eos before min_new tokens.

        With log_probs, the bans apply after log_softmax, so beam scores stay the model's own
        log-probabilities (what continuation_logprob computes) instead of being renormalised."""
        logits = logits.float()
        if penalty != 1.0:
            logits = repetition_penalty_(logits, seen, penalty)
        if log_probs:
            logits = logits.log_softmax(-1)
        logits[:, pad] = float("-inf")
        if step < min_new:
            logits[:, eos] = float("-inf")
        return logits

    def _step(self, tokens, mask, memory, memory_mask, cache):
        """Feed one new token per row through the cache; logits of the next one (B, V)."""
        return self(tokens[:, None], mask, memory=memory, memory_mask=memory_mask, cache=cache)[:, -1]

    def _sample(self, x, mask, memory, memory_mask, seen, max_new, do_sample, temperature, top_k, top_p,
                generator, **opts):
        cache = self.transformer.new_cache()
        logits = self(inputs_embeds=x, attention_mask=mask, memory=memory, memory_mask=memory_mask,
                      cache=cache)[:, -1]  # (B, V)
        B = x.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        out = []
        for step in range(max_new):
            logits = self._process(logits, seen, step, **opts)
            if do_sample:
                logits = logits / temperature
                if top_k is not None:
                    logits = top_k_filter(logits, top_k)
                if top_p is not None:
                    logits = top_p_filter(logits, top_p)
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
            else:
                nxt = logits.argmax(-1)  # (B,)
            nxt = nxt.masked_fill(done, opts["pad"])
            out.append(nxt)
            seen[torch.arange(B, device=x.device), nxt] = True
            done |= nxt == opts["eos"]
            if done.all() or step == max_new - 1:
                break
            mask = F.pad(mask, (0, 1), value=1)  # (B, S+1)
            logits = self._step(nxt, mask, memory, memory_mask, cache)
        return torch.stack(out, 1)  # (B, T_new)

    def _beam_search(self, x, mask, memory, memory_mask, seen, K, max_new, length_penalty, **opts):
        B, V, dev = x.shape[0], self.config.vocab_size, x.device
        eos, pad = opts["eos"], opts["pad"]
        x, mask, seen = x.repeat_interleave(K, 0), mask.repeat_interleave(K, 0), seen.repeat_interleave(K, 0)
        if memory is not None:
            memory = memory.repeat_interleave(K, 0)  # (B*K, S, Dm)
            memory_mask = None if memory_mask is None else memory_mask.repeat_interleave(K, 0)
        cache = self.transformer.new_cache()
        logits = self(inputs_embeds=x, attention_mask=mask, memory=memory, memory_mask=memory_mask,
                      cache=cache)[:, -1]  # (B*K, V)
        scores = torch.full((B, K), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start equal: let only the first expand at step 0
        tokens = torch.empty(B * K, 0, dtype=torch.long, device=dev)
        finished = [[] for _ in range(B)]  # per row: (normalised score, token list)
        done = [False] * B

        def norm(s, n):
            return s / n ** length_penalty

        for step in range(max_new):
            logp = self._process(logits, seen, step, log_probs=True, **opts)  # (B*K, V)
            cand = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
            top, idx = cand.topk(2 * K, dim=1)  # 2K: even if K of them end in eos, K beams go on
            top, idx = top.tolist(), idx.tolist()
            new_scores = torch.full((B, K), float("-inf"), device=dev)
            src = torch.arange(B * K, device=dev).reshape(B, K).clone()
            new_tok = torch.full((B, K), pad, dtype=torch.long, device=dev)
            for b in range(B):
                if done[b]:
                    continue
                j = 0
                for s, i in zip(top[b], idx[b]):
                    beam, tok = divmod(i, V)
                    if s == float("-inf") or j == K:
                        break
                    if tok == eos:
                        finished[b].append((norm(s, step + 1), tokens[b * K + beam].tolist() + [eos]))
                    else:
                        new_scores[b, j], src[b, j], new_tok[b, j] = s, b * K + beam, tok
                        j += 1
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                # Stop only when no running beam can still beat the K-th finished one: log-probs only
                # fall, so the best a beam can reach is its sum now at the most favourable length.
                best = new_scores[b].max().item()
                length = max_new if length_penalty > 0 else step + 2
                if j == 0 or (len(finished[b]) == K and finished[b][-1][0] >= norm(best, length)):
                    done[b] = True
            if all(done) or step == max_new - 1:
                scores = new_scores
                tokens = torch.cat([tokens[src.flatten()], new_tok.reshape(-1, 1)], 1)
                break
            src, scores = src.flatten(), new_scores
            tokens = torch.cat([tokens[src], new_tok.reshape(-1, 1)], 1)  # (B*K, step+1)
            seen = seen[src]
            seen[torch.arange(B * K, device=dev), new_tok.flatten()] = True
            mask = F.pad(mask[src], (0, 1), value=1)
            for layer in cache:
                layer.reorder(src)
            logits = self._step(new_tok.flatten(), mask, memory, memory_mask, cache)
        for b in range(B):  # beams still running at the end compete with the finished ones
            if not done[b]:
                for k in range(K):
                    if scores[b, k] > float("-inf"):
                        finished[b].append((norm(scores[b, k].item(), tokens.shape[1]), tokens[b * K + k].tolist()))
        best = [max(f, key=lambda h: h[0])[1] for f in finished]
        out = torch.full((B, max(map(len, best))), pad, dtype=torch.long, device=dev)
        for b, seq in enumerate(best):
            out[b, :len(seq)] = torch.tensor(seq, device=dev)
        return out  # (B, T_new)

    @torch.no_grad()
    def continuation_logprob(self, input_ids: torch.Tensor | None, new_tokens: torch.Tensor,
                             attention_mask: torch.Tensor | None = None, *, eos_id: int | None = None,
                             memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                             inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of log p(new token | prompt, earlier new tokens) up to and including the first eos,
        and the number of tokens counted: ((B,), (B,)). Scores what generate returned."""
        eos_id = self.config.eos_id if eos_id is None else eos_id
        self._check_ids(new_tokens)
        x, mask, _ = self._prepare_prompt(input_ids, attention_mask, inputs_embeds)
        after_eos = (new_tokens == eos_id).long().cumsum(1) - (new_tokens == eos_id).long() > 0
        keep = ~after_eos  # (B, T_new)
        x = torch.cat([x, self.token_embedding(new_tokens)], 1)  # (B, S + T_new, D)
        mask = torch.cat([mask, keep.long()], 1)
        logits = self(inputs_embeds=x, attention_mask=mask, memory=memory, memory_mask=memory_mask)
        T = new_tokens.shape[1]
        logp = logits[:, -T - 1:-1].float().log_softmax(-1).gather(-1, new_tokens[..., None])[..., 0]  # (B, T_new)
        return (logp * keep).sum(1), keep.sum(1)
