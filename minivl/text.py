"""Text encoder shaped like CLIP's text tower.

Follows CLIP (Radford et al., 2021), whose text tower is a GPT-2-style (Radford et al., 2019)
transformer: token + learned position embeddings, *causal* pre-norm blocks, a final LayerNorm,
and the sentence summarised by the features at the end-of-text token.

The one idea to take away: with a causal mask, the last token is the only one that has read the
whole sentence, so it is the natural place to pool. (A causal encoder also lets the same tower
be used as a language model.) Right padding never changes it: pads come after the last token,
and causal attention never looks forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from minivl import validate
from minivl.checkpoint import Checkpointable
from minivl.transformer import Transformer, init_weights

PRESETS = {
    "tiny": dict(vocab_size=300, context_length=16, width=32, depth=2, heads=2),
    "cpu": dict(vocab_size=512, context_length=32, width=128, depth=4, heads=4),
    "gpu": dict(vocab_size=512, context_length=48, width=384, depth=8, heads=6),
}


@dataclass
class TextConfig:
    vocab_size: int = 512  # token ids are 0 .. vocab_size - 1
    context_length: int = 32  # longest sequence (special tokens included)
    width: int = 128  # token width D
    depth: int = 4  # number of transformer blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    activation: str = "gelu"  # "quick_gelu" for OpenAI CLIP weights
    norm_eps: float = 1e-5  # LayerNorm epsilon
    dropout: float = 0.0  # attention/MLP dropout

    def __post_init__(self) -> None:  # a bad field fails here, not as a shape error in the first forward
        validate.config_fields(self, ints=dict(vocab_size=1, context_length=1, width=1, depth=0, heads=1),
                               reals=dict(mlp_ratio=(0, None, True), norm_eps=(0, None, True), dropout=(0, 1, False, True)),
                               strings=("activation",))

    @classmethod
    def preset(cls, name: str, **overrides) -> "TextConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown text preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


@dataclass
class TextOutput:
    tokens: torch.Tensor  # (B, T, D) after ln_final
    pooled: torch.Tensor  # (B, D) the features at the last real (end-of-text) token
    hidden_states: list[torch.Tensor] | None = field(default=None)
    attentions: list[torch.Tensor] | None = field(default=None)


def check_tokens(input_ids, vocab_size: int, context_length: int, attention_mask=None,
                 right_padded: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (input_ids, attention_mask) as tensors, or a clear error: input_ids a (B, T) integer tensor
    (B, T >= 1; numpy arrays are converted) that fits the model, the mask exactly its shape, 0/1.

    Shapes and dtypes are checked always: that is free. Values - ids in [0, vocab_size), a 0/1 mask
    and, with right_padded, a mask like 1 1 1 0 0 with a real token in every row - are checked only
    when the tensors are on the CPU, which is where data enters (the tokenizer, `collate`) and where
    every CPU run computes. On an accelerator, reading a value back is a host sync that would stall
    every forward pass; batches there were already checked on their way in.
    """
    input_ids = validate.token_ids("input_ids", input_ids, vocab_size, context_length)
    if attention_mask is not None:
        attention_mask = validate.attention_mask("attention_mask", attention_mask, tuple(input_ids.shape),
                                                 right_padded=right_padded)
    return input_ids, attention_mask


def last_token_index(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (B,): right padding assumed, as the tokenizer makes
    (`check_tokens(..., right_padded=True)` checks it)."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.full((B,), T - 1, device=input_ids.device)
    return attention_mask.long().sum(1) - 1


class TextEncoder(Checkpointable, nn.Module):
    """Token ids (B, T) -> token features (B, T, D) and a pooled sentence vector (B, D)."""

    config_class = TextConfig

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(c.context_length, c.width))
        self.transformer = Transformer(c.width, c.depth, c.heads, mlp_ratio=c.mlp_ratio, activation=c.activation,
                                       norm_eps=c.norm_eps, dropout=c.dropout)
        self.ln_final = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.01)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Checked token ids (B, T) -> token + position embeddings (B, T, D)."""
        input_ids, attention_mask = check_tokens(input_ids, self.config.vocab_size, self.config.context_length,
                                                 attention_mask, right_padded=True)
        return self._embed(input_ids)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # ids already checked
        return self.token_embedding(input_ids) + self.pos_embed[:input_ids.shape[1]]  # (B, T, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                need_weights: bool = False, output_hidden_states: bool = False) -> TextOutput:
        input_ids, attention_mask = check_tokens(input_ids, self.config.vocab_size, self.config.context_length,
                                                 attention_mask, right_padded=True)
        x = self._embed(input_ids)  # (B, T, D)
        out = self.transformer(x, attention_mask=attention_mask, causal=True, need_weights=need_weights,
                               output_hidden_states=output_hidden_states)
        tokens = self.ln_final(out.last_hidden_state)  # (B, T, D)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        pooled = tokens[rows, last_token_index(attention_mask, input_ids)]  # (B, D)
        return TextOutput(tokens, pooled, out.hidden_states, out.attentions)
