"""Decoder-only causal language model: config, model and loss.

Follows GPT-2 (Radford et al., 2019): token + learned position embeddings, causal pre-norm blocks
(minivl.transformer), a final LayerNorm and an output layer that reuses the token embedding
matrix (weight tying, Press & Wolf, 2017). Two optional inputs make the same model the text half
of the later floors: `memory` is read by cross-attention in every block (a BLIP-style captioner,
Li et al., 2022) and `inputs_embeds` is a prefix of vectors placed before the tokens (the image
tokens of a LLaVA-style multimodal LLM, Liu et al., 2023).

Decoding lives in `minivl.generation`, the one engine every generative model shares;
`CausalLM.generate` and `CausalLM.continuation_logprob` are that engine's functions as methods
(greedy, temperature, top-k, top-p, beam search, repetition penalty, min/max new tokens, eos).

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

from minivl import generation, validate
from minivl.checkpoint import Checkpointable
from minivl.generation import apply_repetition_penalty, top_k_filter, top_p_filter  # noqa: F401 (re-exported)
from minivl.text import check_tokens
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

    def __post_init__(self) -> None:  # a bad field fails here, not as a shape error in the first forward
        validate.config_fields(self, ints=dict(vocab_size=1, context_length=1, width=1, depth=0, heads=1),
                               reals=dict(mlp_ratio=(0, None, True), norm_eps=(0, None, True),
                                          dropout=(0, 1, False, True)), strings=("activation",))
        for f in ("cross_attention", "tie_embeddings"):
            validate.boolean(f"LMConfig.{f}", getattr(self, f))
        if self.memory_dim is not None:
            validate.positive_int("LMConfig.memory_dim", self.memory_dim)
        for f in ("pad_id", "bos_id", "eos_id"):  # an id past the vocabulary would fail deep in generate
            validate.vocab_id(f"LMConfig.{f}", getattr(self, f), self.vocab_size)

    @classmethod
    def preset(cls, name: str, **overrides) -> "LMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown LM preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of every slot = real tokens before it; pads get 0 (their output is never read)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, S)


class CausalLM(Checkpointable, nn.Module):
    """Token ids (B, T) [+ prefix embeddings (B, P, D)] [+ memory (B, S, Dm)] -> logits (B, P+T, V)."""

    config_class = LMConfig

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(c.context_length, c.width))
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.width, c.depth, c.heads, mlp_ratio=c.mlp_ratio, activation=c.activation,
                                       cross_attention=c.cross_attention, memory_dim=c.memory_dim,
                                       norm_eps=c.norm_eps, dropout=c.dropout)
        self.ln_final = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.width, c.vocab_size, bias=False)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.01)
        if c.tie_embeddings:  # one matrix reads tokens in and writes them out
            self.lm_head.weight = self.token_embedding.weight

    # ------------------------------------------------------------------ forward
    def new_cache(self) -> list[LayerCache]:
        """An empty KV cache, one entry per block (see minivl.transformer.KVCache)."""
        return self.transformer.new_cache()

    def embed(self, input_ids: torch.Tensor | None = None,
              inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Prefix embeddings followed by token embeddings (no positions yet): (B, P+T, D)."""
        parts = []
        if inputs_embeds is not None:
            inputs_embeds = validate.tensor("inputs_embeds", inputs_embeds, shape=("B", "P", self.config.width),
                                            kind="float", finite=True)
            parts.append(inputs_embeds.to(self.token_embedding.weight.dtype))
        if input_ids is not None:
            input_ids, _ = check_tokens(input_ids, self.config.vocab_size, self.config.context_length)  # values: CPU only
            if parts and parts[0].shape[0] != input_ids.shape[0]:
                raise ValueError(f"inputs_embeds has batch {parts[0].shape[0]}, input_ids {input_ids.shape[0]}")
            parts.append(self.token_embedding(input_ids))  # (B, T, D)
        if not parts:
            raise ValueError("pass input_ids, inputs_embeds or both")
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # (B, P+T, D)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                hidden_only: bool = False, memory_groups: int = 1) -> torch.Tensor:
        """Next-token logits (B, P+T, V) for the prefix `inputs_embeds` (B, P, D) then `input_ids` (B, T).

        attention_mask (B, past+P+T), 1 = real, 0 = pad, covers the cached positions too; a (B, T)
        mask for the tokens alone is accepted when there is a prefix and no cache (prefix = real).
        position_ids (B, P+T) default to positions_from_mask(mask), or past + 0, 1, 2, ... without one.
        memory (B, S, Dm) and memory_mask (B, S) feed the cross-attention (config.cross_attention);
        memory_groups=g: one memory row per g consecutive rows (B / g of them: beam search's beams).
        segment_ids (B, P+T): a packed row, several continuations of one shared prefix (-1) in segments
        0, 1, ... that never read each other (`minivl.transformer.segment_mask`); it needs position_ids
        (each segment's positions going on from the prefix's, as if it were alone). hidden_only=True
        returns the final hidden states after ln_final (B, P+T, D) instead, for a loss that applies
        lm_head only where it scores (a chat's answers are a small share of its tokens).
        """
        if segment_ids is not None and position_ids is None:
            raise ValueError("segment_ids (packing) need position_ids: each segment's positions continue the "
                             "prefix's as if it stood alone, which the mask's running count cannot know")
        x = self.embed(input_ids, inputs_embeds)  # (B, N, D), N = P + T
        B, N = x.shape[:2]
        past = len(cache[0].self_attn) if cache else 0
        if attention_mask is not None:
            attention_mask = validate.tensor("attention_mask", attention_mask)
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
                raise ValueError(f"attention_mask must be (B={B}, S), got {tuple(attention_mask.shape)}")
            P = 0 if inputs_embeds is None else inputs_embeds.shape[1]
            if P and not past and input_ids is not None and attention_mask.shape[1] == N - P:
                attention_mask = F.pad(attention_mask, (P, 0), value=1)  # (B, N)
            if attention_mask.shape[1] != past + N:
                raise ValueError(f"attention_mask must cover {past} cached + {N} new positions, "
                                 f"got {attention_mask.shape[1]}")
            # 0/1 only: a 2 would count a slot twice in positions_from_mask's cumsum
            attention_mask = validate.attention_mask("attention_mask", attention_mask, (B, past + N))
        if memory is not None or memory_mask is not None:
            memory_groups = validate.divisor("memory_groups", memory_groups, B)
            memory, memory_mask = self._check_memory(memory, memory_mask, B // memory_groups)
        L = self.config.context_length
        if position_ids is None:  # positions never exceed the slot index, so the shapes are the check
            if past + N > L:
                raise ValueError(f"{past} cached + {N} new positions exceed the context length {L}")
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past:]  # (B, N)
            else:
                position_ids = torch.arange(past, past + N, device=x.device).expand(B, N)  # (B, N)
        else:
            position_ids = validate.tensor("position_ids", position_ids, kind="int").long()  # uint8 indexes as a mask
            if position_ids.shape != (B, N):
                raise ValueError(f"position_ids must be ({B}, {N}), got {tuple(position_ids.shape)}")
            if position_ids.device.type == "cpu" and (position_ids.min() < 0 or position_ids.max() >= L):
                raise ValueError(f"position_ids must lie in [0, {L}) (the context length), got "
                                 f"[{int(position_ids.min())}, {int(position_ids.max())}]")
        x = self.drop(x + self.pos_embed[position_ids])  # (B, N, D)
        h = self.transformer(x, attention_mask=attention_mask, causal=True, memory=memory, memory_mask=memory_mask,
                             cache=cache, segment_ids=segment_ids, memory_groups=memory_groups).last_hidden_state
        h = self.ln_final(h)  # (B, N, D)
        return h if hidden_only else self.lm_head(h)  # (B, N, V)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean next-token cross-entropy over real targets.

        batch: input_ids (B, T), attention_mask (B, T); optional labels (B, T) aligned with
        input_ids (-100 = no loss there, e.g. the prompt), memory / memory_mask for cross-attention.
        """
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError(f"CausalLM.loss needs a dict with 'input_ids', got "
                            f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        ids, mask = check_tokens(batch["input_ids"], self.config.vocab_size, self.config.context_length,
                                 batch.get("attention_mask"))
        if ids.shape[1] < 2:
            raise ValueError(f"CausalLM.loss needs sequences of >= 2 tokens (one to read, one to predict), "
                             f"got input_ids {tuple(ids.shape)}")
        logits = self(ids, mask, memory=batch.get("memory"), memory_mask=batch.get("memory_mask"))
        labels = batch.get("labels", ids)
        if labels is not ids:
            labels = validate.tensor("batch['labels']", labels, shape=tuple(ids.shape), kind="int").long()
            V = self.config.vocab_size
            if validate.on_cpu(labels) and ((labels != -100) & ((labels < 0) | (labels >= V))).any():
                raise ValueError(f"batch['labels'] must be token ids in [0, {V}) or -100 (no loss), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at t
        if mask is not None:
            targets = targets.masked_fill(mask[:, 1:] == 0, -100)
        if validate.on_cpu(targets) and not (targets != -100).any():  # the mean of nothing is NaN
            raise ValueError("CausalLM.loss: no target token to score (every label is -100 or padding)")
        logits = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
        loss = F.cross_entropy(logits, targets.flatten(), ignore_index=-100)
        return loss, {"ppl": loss.detach().exp()}  # a tensor: .item() would sync the device every step

    def _check_memory(self, memory, memory_mask, B: int):
        if memory is None:
            raise ValueError("memory_mask given without memory")
        if not self.config.cross_attention:
            raise ValueError("memory given, but this LM has no cross-attention (LMConfig.cross_attention=False)")
        dim = self.config.memory_dim or self.config.width
        memory = validate.tensor("memory", memory, shape=(B, None, dim), kind="float")
        if memory_mask is not None:
            memory_mask = validate.attention_mask("memory_mask", memory_mask, tuple(memory.shape[:2]))
        return memory.to(self.token_embedding.weight.dtype), memory_mask

    @torch.no_grad()
    def resize_position_embeddings(self, context_length: int, init: str = "copy") -> "CausalLM":
        """Grow (or cut) the learned positions to `context_length`, in place; updates the config.

        The positions the model was trained on keep their vectors. New ones (a prefix of image tokens
        pushes the text past the contexts a caption LM saw) start, with init="copy", as the last trained
        position plus 0.01 noise: the nearest vector the LM knows, though every new position then looks
        almost the same. init="spread" draws them around the trained positions' mean with their
        per-dimension spread, as far apart as trained neighbours. Measured on the MLLM's cpu recipe
        (150 + 250 steps, 150 test scenes): answers 44.0% with "copy", 39.7% with "spread"."""
        n = validate.positive_int("context_length", context_length)
        if init not in ("spread", "copy"):
            raise ValueError(f"init must be 'spread' or 'copy', got {init!r}")
        old = self.pos_embed.data
        new = old[:n].clone()
        extra = n - old.shape[0]
        if extra > 0:
            noise = torch.randn(extra, old.shape[1], device=old.device, dtype=old.dtype)
            if init == "copy" or old.shape[0] < 2:
                rows = old[-1:] + 0.01 * noise
            else:
                rows = old.mean(0, keepdim=True) + old.std(0, keepdim=True) * noise
            new = torch.cat([new, rows], 0)  # (n, D)
        self.pos_embed = nn.Parameter(new)
        self.config.context_length = n
        return self

    # ------------------------------------------------------------------ generation
    # The engine's functions as methods, as transformers users expect (`lm.generate(ids, ...)`):
    # the engine's first argument, `decoder`, is this model.
    generate = generation.generate
    continuation_logprob = generation.continuation_logprob
