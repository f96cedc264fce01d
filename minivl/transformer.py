"""The transformer: attention, MLP, pre-norm block and the stack every minivl model is built from.

Follows "Attention Is All You Need" (Vaswani et al., 2017) with the pre-LayerNorm placement of
GPT-2 / ViT / CLIP (Radford et al., 2019; Dosovitskiy et al., 2021; Radford et al., 2021), and
the decoder cross-attention of the original encoder-decoder, which BLIP-style captioners reuse.

This file holds the *only* attention implementation in the package. Self-attention,
cross-attention, causal masking, key-padding masks, the KV cache used by generation and the
attention maps drawn in the notebooks are all options of one `Attention` module.

The one idea to take away: attention is softmax(Q K^T / sqrt(d)) V, and everything else
(causality, padding, caching, cross-modal conditioning) is a choice of *which keys a query
may see* (the mask) and *where the keys come from* (the same sequence or another one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer.

    Self-attention appends one step at a time; cross-attention fills it once with the
    projected memory (the image) and then only reads it. `reorder` follows beam search.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (B, H, S, Dh)
        self.v: torch.Tensor | None = None  # (B, H, S, Dh)

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)  # (B, H, S + T, Dh)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search picks which hypotheses continue)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


@dataclass
class LayerCache:
    """What one block remembers between decoding steps."""

    self_attn: KVCache
    cross_attn: KVCache

    def reorder(self, index: torch.Tensor) -> None:
        self.self_attn.reorder(index)
        self.cross_attn.reorder(index)


def build_mask(attention_mask: torch.Tensor | None, causal: bool, T: int, S: int,
               device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, T, S), True where query t may attend to key s.

    Causal masks are aligned bottom-right, so with S - T cached keys, query t sits at absolute
    position S - T + t and sees keys 0..S-T+t. A query that may see nothing at all (a left-pad
    position under a causal mask) is allowed to see every key instead: its output is garbage
    but finite, it is never read, and softmax over an empty set would otherwise give NaN.
    """
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != S:
            raise ValueError(f"attention_mask must be (B, {S}) over the keys, got {tuple(attention_mask.shape)}")
        mask = rearrange(attention_mask.bool(), "b s -> b 1 1 s")
    if causal:
        q_pos = torch.arange(T, device=device) + (S - T)
        causal_mask = q_pos[:, None] >= torch.arange(S, device=device)[None, :]  # (T, S)
        mask = causal_mask[None, None] if mask is None else mask & causal_mask
    if mask is not None:
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise."""

    def __init__(self, dim: int, n_heads: int, kv_dim: int | None = None, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"width {dim} must be divisible by the number of heads {n_heads}")
        kv_dim = kv_dim or dim
        self.n_heads, self.head_dim, self.dropout = n_heads, dim // n_heads, dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b t (h d) -> b h t d", h=self.n_heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) attends to context (B, S, Dkv), or to itself (and the cache) when None.

        attention_mask (B, S): 1 for keys to attend to, 0 for padding; S counts cached keys too.
        Returns the output (B, T, D) and, with need_weights, the weights (B, H, T, S).
        """
        if x.dim() != 3:
            raise ValueError(f"attention input must be (B, T, D), got shape {tuple(x.shape)}")
        q = self._heads(self.q_proj(x))  # (B, H, T, Dh)
        if context is not None and cache is not None and len(cache) > 0:
            k, v = cache.k, cache.v  # cross-attention memory was projected on the first step
        else:
            source = x if context is None else context
            k, v = self._heads(self.k_proj(source)), self._heads(self.v_proj(source))  # (B, H, S, Dh)
            if cache is not None:
                k, v = cache.append(k, v)
        T, S = q.shape[2], k.shape[2]
        dropout = self.dropout if self.training else 0.0

        if need_weights:  # explicit path: the weights are what the notebooks draw
            mask = build_mask(attention_mask, causal, T, S, x.device)
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v  # (B, H, T, Dh)
        else:  # fast path: fused kernels (flash / memory-efficient) where the device has them
            weights = None
            if causal and attention_mask is None and T == S:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:
                mask = build_mask(attention_mask, causal and T > 1, T, S, x.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = rearrange(out, "b h t d -> b t (h d)")
        return self.out_proj(out), weights


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
}


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> activation -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.act = ACTIVATIONS[activation]
        self.fc1, self.fc2 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to a memory, MLP; each residual."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0, activation: str = "gelu",
                 cross_attention: bool = False, kv_dim: int | None = None, norm_eps: float = 1e-5,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads, dropout=dropout)
        self.cross_attn = Attention(dim, n_heads, kv_dim=kv_dim, dropout=dropout) if cross_attention else None
        self.ln_cross = nn.LayerNorm(dim, eps=norm_eps) if cross_attention else None
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, attention_mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: LayerCache | None = None, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, weights = self.attn(self.ln_1(x), attention_mask=attention_mask, causal=causal,
                               cache=cache.self_attn if cache else None, need_weights=need_weights)
        x = x + self.drop(h)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass `context` (the memory to attend to)")
            h, _ = self.cross_attn(self.ln_cross(x), context, attention_mask=context_mask,
                                   cache=cache.cross_attn if cache else None)
            x = x + self.drop(h)
        x = x + self.mlp(self.ln_2(x))
        return x, weights


@dataclass
class TransformerOutput:
    last_hidden_state: torch.Tensor  # (B, T, D)
    hidden_states: list[torch.Tensor] | None = None  # depth + 1 entries: the input, then each block's output
    attentions: list[torch.Tensor] | None = None  # depth entries of (B, H, T, S)


class Transformer(nn.Module):
    """A stack of `depth` pre-norm blocks (the final LayerNorm belongs to the model using it)."""

    def __init__(self, dim: int, depth: int, n_heads: int, mlp_ratio: float = 4.0, activation: str = "gelu",
                 cross_attention: bool = False, kv_dim: int | None = None, norm_eps: float = 1e-5,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, mlp_ratio, activation, cross_attention, kv_dim, norm_eps, dropout)
            for _ in range(depth))

    def new_cache(self) -> list[LayerCache]:
        """Empty per-layer caches for incremental decoding."""
        return [LayerCache(KVCache(), KVCache()) for _ in self.blocks]

    def forward(self, x: torch.Tensor, *, attention_mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: list[LayerCache] | None = None, need_weights: bool = False,
                output_hidden_states: bool = False) -> TransformerOutput:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"transformer input must be (B, T, {self.dim}), got {tuple(x.shape)}")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the transformer has {len(self.blocks)}")
        hidden = [x] if output_hidden_states else None
        attentions = [] if need_weights else None
        for i, block in enumerate(self.blocks):
            x, weights = block(x, attention_mask=attention_mask, causal=causal, context=context,
                               context_mask=context_mask, cache=cache[i] if cache else None,
                               need_weights=need_weights)
            if hidden is not None:
                hidden.append(x)
            if attentions is not None:
                attentions.append(weights)
        return TransformerOutput(x, hidden, attentions)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 / CLIP style init: N(0, std) for linear and embedding weights, zero biases, unit norms.

    Use as `model.apply(init_weights)`.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
