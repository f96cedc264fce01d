"""The transformer: attention, MLP, pre-norm block and the stack every minivl model is built from.

Follows "Attention Is All You Need" (Vaswani et al., 2017) with the pre-LayerNorm placement of
GPT-2 / ViT / CLIP (Radford et al., 2019; Dosovitskiy et al., 2021; Radford et al., 2021), and
the decoder cross-attention of the original encoder-decoder, which BLIP-style captioners reuse.

This file holds the *only* attention implementation in the package. Self-attention,
cross-attention to a `memory` (the image), causal masking, key-padding masks, packed segments, the KV cache used
by generation, the attention maps drawn in the notebooks and the one-query "pooled" last block
CLIP reads its embeddings from are all options of one `Attention` module and one `Transformer`.
`Transformer.forward` builds the masks once and hands the same prepared mask to every block.

The one idea to take away: attention is softmax(Q K^T / sqrt(d)) V, and everything else
(causality, padding, caching, cross-modal conditioning) is a choice of *which keys a query
may see* (the mask) and *where the keys come from* (the same sequence or another one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minivl import validate


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer.

    Self-attention appends one step at a time; cross-attention fills it once with the
    projected memory (the image) and then only reads it. `reorder` follows beam search.
    Appends write into a buffer with room to spare (doubled when full) instead of concatenating
    a new tensor every step: decoding n tokens copies O(n) positions in all, not O(n^2).
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None  # (B, H, capacity, Dh): the first `n` positions are filled
        self._v: torch.Tensor | None = None
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # reorder's second buffer
        self.n = 0

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, :self.n]  # (B, H, S, Dh)

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, :self.n]  # (B, H, S, Dh)

    def __len__(self) -> int:
        return self.n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if self._k is None:  # the first call (the prompt, or the memory): kept as it is, no copy
            self._k, self._v, self.n = k, v, T
            return k, v
        if torch.is_grad_enabled() and (k.requires_grad or self._k.requires_grad):  # in place would break backward
            self._k, self._v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.n += T
            return self._k, self._v
        if self.n + T > self._k.shape[2]:  # no room: a buffer twice the size, the filled part copied over
            room = max(2 * self._k.shape[2], self.n + T)
            self._k, self._v = (torch.cat([x[:, :, :self.n], x.new_empty(*x.shape[:2], room - self.n, x.shape[3])], 2)
                                for x in (self._k, self._v))
        self._k[:, :, self.n:self.n + T] = k
        self._v[:, :, self.n:self.n + T] = v
        self.n += T
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search picks which hypotheses continue).

        Beam search reorders every layer at every step with as many rows as before: the rows are gathered
        into a spare buffer of the same shape, kept from the step before, and the two swap. A fresh
        buffer per step (hundreds of KB) would cost a page-faulting allocation each time on a CPU."""
        if self._k is None:
            return
        spare = self._spare
        if len(index) != self._k.shape[0] or torch.is_grad_enabled() and self._k.requires_grad:
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)
            return
        if spare is None or spare[0].shape != self._k.shape or spare[0].dtype != self._k.dtype \
                or spare[0].device != self._k.device or not (spare[0].is_contiguous() and spare[1].is_contiguous()):
            spare = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (self._k, self._v))
        torch.index_select(self._k, 0, index, out=spare[0])
        torch.index_select(self._v, 0, index, out=spare[1])
        self._spare, (self._k, self._v) = (self._k, self._v), spare


@dataclass
class LayerCache:
    """What one block remembers between decoding steps."""

    self_attn: KVCache
    cross_attn: KVCache

    def reorder(self, index: torch.Tensor, memory: bool = True) -> None:
        """Keep batch rows `index`. memory=False leaves the cross-attention keys as they are: beam
        search's rows are K beams per prompt, each reading its prompt's image, and a beam only ever
        continues a beam of the same prompt, so those keys are already right (no copy per step)."""
        self.self_attn.reorder(index)
        if memory:
            self.cross_attn.reorder(index)


def build_mask(attention_mask: torch.Tensor | None, *, causal: bool, T: int, S: int, device: torch.device,
               query_positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, T, S), True where query t may attend to key s; None = every key.

    attention_mask (B, S): 1 for keys to attend to, 0 for padding. Causal masks are aligned
    bottom-right, so with S - T cached keys, query t sits at absolute position S - T + t and sees
    keys 0..S-T+t; `query_positions` (B|1, T) places the queries elsewhere (the pooled token).
    A query that may see nothing at all (a left-pad position under a causal mask) is allowed to
    see every key instead: its output is garbage but finite, it is never read, and softmax over
    an empty set would otherwise give NaN.
    """
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != S:
            raise ValueError(f"attention_mask must be (B, {S}) over the keys, got {tuple(attention_mask.shape)}")
        mask = rearrange(attention_mask.bool(), "b s -> b 1 1 s")
    if causal:
        if query_positions is None:
            query_positions = torch.arange(S - T, S, device=device)[None]  # (1, T): after S - T cached keys
        allowed = query_positions[..., None] >= torch.arange(S, device=device)  # (B|1, T, S)
        allowed = rearrange(allowed, "b t s -> b 1 t s")
        mask = allowed if mask is None else mask & allowed
    if mask is not None:
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, 1, T, T) for packed sequences, True where query t may read key s.

    segment_ids (B, T): -1 = a shared prefix every token reads (an image, a system prompt); k >= 0 =
    segment k, whose tokens read the prefix and their own segment only; -2 = padding, which reads only
    the prefix. Combined with a causal mask, segment k computes exactly what it would alone after the
    prefix (given positions that restart after the prefix): several independent continuations of one
    prefix in one row, the prefix computed once (how VQA packs a scene's questions, for a causal LM)."""
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 2 or segment_ids.is_floating_point():
        raise ValueError(f"segment_ids must be a (B, T) integer tensor, got "
                         f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)} {tuple(getattr(segment_ids, 'shape', ()))}")
    g = segment_ids.long()
    if segment_ids.device.type == "cpu" and bool((g < -2).any()):
        raise ValueError(f"segment_ids must be -2 (pad), -1 (shared prefix) or a segment index >= 0, got {int(g.min())}")
    own = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] >= 0)  # (B, T, T): same segment (pads excluded)
    shared = (g == -1)[:, None, :]  # (B, 1, T): every query reads the prefix
    return rearrange(own | shared, "b t s -> b 1 t s")


class Attention(nn.Module):
    """Multi-head attention; self-attention when `memory` is None, cross-attention otherwise."""

    def __init__(self, dim: int, n_heads: int, *, memory_dim: int | None = None, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"width {dim} must be divisible by the number of heads {n_heads}")
        memory_dim = memory_dim or dim
        self.n_heads, self.head_dim, self.dropout = n_heads, dim // n_heads, dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(memory_dim, dim, bias=bias)
        self.v_proj = nn.Linear(memory_dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, H * Dh) -> (B, H, T, Dh), einops' "b t (h d) -> b h t d" spelt as view + transpose: this runs
        # three times per layer per decoding step, where einops' own overhead shows in a profile
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                is_causal: bool = False, cache: KVCache | None = None, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) attends to memory (B, S, Dm), or to itself (and the cache) when memory is None.

        mask (B|1, 1, T, S) bool from `build_mask` (S counts cached keys too), None = every key;
        is_causal = the fused kernel's own causal mask instead (no padding, no cache, T == S).
        Returns the output (B, T, D) and, with need_weights, the weights (B, H, T, S).
        """
        if x.dim() != 3:
            raise ValueError(f"attention input must be (B, T, D), got shape {tuple(x.shape)}")
        if is_causal and mask is not None:
            raise ValueError("pass a mask or is_causal=True, not both")
        q = self._heads(self.q_proj(x))  # (B, H, T, Dh)
        if memory is not None and cache is not None and len(cache) > 0:
            k, v = cache.k, cache.v  # cross-attention memory was projected on the first step
        else:
            source = x if memory is None else memory
            k, v = self._heads(self.k_proj(source)), self._heads(self.v_proj(source))  # (B, H, S, Dh)
            if cache is not None:
                k, v = cache.append(k, v)
        dropout = self.dropout if self.training else 0.0

        if need_weights:  # explicit path: the weights are what the notebooks draw
            if is_causal:
                mask = build_mask(None, causal=True, T=q.shape[2], S=k.shape[2], device=x.device)
            scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5  # (B, H, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout) @ v  # (B, H, T, Dh)
        else:  # fast path: fused kernels (flash / memory-efficient) where the device has them
            weights = None
            if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
                out = _cpu_attention_fp32(q, k, v, mask, dropout, is_causal)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        out = out.transpose(1, 2).flatten(2)  # (B, H, T, Dh) -> (B, T, H * Dh): "b h t d -> b t (h d)"
        return self.out_proj(out), weights


def _cpu_attention_fp32(q, k, v, mask, dropout: float, is_causal: bool) -> torch.Tensor:
    """The fused kernel in fp32 for bf16 / fp16 inputs on the CPU, the output cast back.

    On a CPU without bf16 instructions (this course's AVX-512 machines) the fused CPU kernel is ~3.6x
    slower in bf16 than in fp32 with the casts around it (330 ms vs 92 ms forward + backward, VQA-bench
    shapes (136, 4, 81, 32), one thread, 2026-12-07), and the explicit matmul path in bf16 ~1.7x slower:
    under bf16 autocast minivl's VQA step was 0.52-0.78x `transformers`' (eager matmuls), now ~1.2x. fp32 is
    also the more exact of the two. Autocast is switched off around the call, or it would cast back to bf16."""
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout,
                                             is_causal=is_causal)
    return out.to(q.dtype)


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


def _take(x: torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
    """Token `index` of every row of x (B, T, D): an int, or a (B,) tensor with one index per row."""
    if isinstance(index, int):
        return x[:, index, None]  # (B, 1, D)
    return x[torch.arange(x.shape[0], device=x.device), index][:, None]  # (B, 1, D)


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to a memory, MLP; each residual.

    post_norm=True places each LayerNorm after its residual sum instead, x = LN(x + f(x)), as the
    original Transformer and BERT do (BLIP's text side); the modules and their names are the same.
    """

    def __init__(self, dim: int, n_heads: int, *, mlp_ratio: float = 4.0, activation: str = "gelu",
                 cross_attention: bool = False, memory_dim: int | None = None, norm_eps: float = 1e-5,
                 dropout: float = 0.0, post_norm: bool = False) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads, dropout=dropout)
        self.cross_attn = Attention(dim, n_heads, memory_dim=memory_dim, dropout=dropout) if cross_attention else None
        self.ln_cross = nn.LayerNorm(dim, eps=norm_eps) if cross_attention else None
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation, dropout)
        self.drop = nn.Dropout(dropout)
        # with need_weights, the last call's cross-attention weights (B, H, T, S): where each text
        # token looked in the memory (Transformer.forward collects them as `cross_attentions`)
        self.cross_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, is_causal: bool = False,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                cache: LayerCache | None = None, need_weights: bool = False,
                query_index: int | torch.Tensor | None = None, use_cross_attention: bool = True,
                memory_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> (B, T, D) and, with need_weights, the self-attention weights.

        Masks come prepared by `Transformer.forward` (`build_mask` output). With query_index (an int
        or (B,)), only that token of each row is computed, -> (B, 1, D): its query reads the keys and
        values of every token, then the MLP runs on it alone. use_cross_attention=False skips this
        block's cross-attention (a BLIP text encoder in its unimodal mode: same weights, no image).
        memory_groups=g: memory (B / g, S, Dm) holds one row per g consecutive rows of x (`_cross`).
        """
        if self.post_norm:
            return self._post_norm(x, mask, is_causal, memory, memory_mask, cache, need_weights, query_index,
                                   use_cross_attention, memory_groups=memory_groups)
        h = self.ln_1(x)  # (B, T, D)
        if query_index is None:
            a, weights = self.attn(h, mask=mask, is_causal=is_causal, cache=cache.self_attn if cache else None,
                                   need_weights=need_weights)
        else:
            x = _take(x, query_index)  # (B, 1, D)
            a, weights = self.attn(_take(h, query_index), h, mask=mask, need_weights=need_weights)
        x = x + self.drop(a)
        if self.cross_attn is not None and use_cross_attention:
            x = x + self.drop(self._cross(self.ln_cross(x), memory, memory_mask, cache, need_weights, memory_groups))
        x = x + self.mlp(self.ln_2(x))
        return x, weights

    def _cross(self, h: torch.Tensor, memory, memory_mask, cache, need_weights: bool, groups: int) -> torch.Tensor:
        """Cross-attention of h (B, T, D) to memory; sets self.cross_weights (B, H, T, S) with need_weights.

        groups = g > 1: memory holds B / g rows, row b shared by rows b*g .. b*g + g - 1 of h (the g beams
        of one image). Each query reads the memory on its own, so the g rows' queries can line up as one
        row of g*T queries: the memory's keys and values are projected and read once per image, not g times."""
        if memory is None:
            raise ValueError("this block has cross-attention: pass `memory` (what to attend to)")
        T = h.shape[1]
        if groups > 1:
            h = rearrange(h, "(b g) t d -> b (g t) d", g=groups)  # (B/g, g*T, D)
        a, w = self.cross_attn(h, memory, mask=memory_mask, cache=cache.cross_attn if cache else None,
                               need_weights=need_weights)
        if groups > 1:
            a = rearrange(a, "b (g t) d -> (b g) t d", g=groups, t=T)  # (B, T, D)
            w = None if w is None else rearrange(w, "b h (g t) s -> (b g) h t s", g=groups, t=T)
        self.cross_weights = w
        return a

    def _post_norm(self, x, mask, is_causal, memory, memory_mask, cache, need_weights, query_index,
                   use_cross_attention, self_attn=None, self_ln=None, *, memory_groups: int = 1):
        """BERT's order: every sub-layer's output is added to its input, then normalised.
        self_attn / self_ln: another self-attention and its LayerNorm in place of `attn` / `ln_1`
        (BLIP's decoder has its own; minivl.captioner.text.BertLayer)."""
        if query_index is not None:
            raise ValueError("pool_index is not supported by post-norm blocks")
        self_attn = self.attn if self_attn is None else self_attn
        self_ln = self.ln_1 if self_ln is None else self_ln
        a, weights = self_attn(x, mask=mask, is_causal=is_causal, cache=cache.self_attn if cache else None,
                               need_weights=need_weights)
        x = self_ln(x + self.drop(a))  # (B, T, D)
        if self.cross_attn is not None and use_cross_attention:
            x = self.ln_cross(x + self.drop(self._cross(x, memory, memory_mask, cache, need_weights, memory_groups)))
        return self.ln_2(x + self.mlp(x)), weights


@dataclass
class TransformerOutput:
    last_hidden_state: torch.Tensor  # (B, T, D); (B, D) with pool_index
    hidden_states: list[torch.Tensor] | None = None  # depth + 1 entries: the input, then each block's output
    attentions: list[torch.Tensor] | None = None  # depth entries of (B, H, T, S)
    cross_attentions: list[torch.Tensor] | None = None  # with need_weights and a memory: depth x (B, H, T, S_mem)


class Transformer(nn.Module):
    """A stack of `depth` pre-norm blocks (the final LayerNorm belongs to the model using it);
    post_norm=True builds BERT-style post-norm blocks instead (see `Block`)."""

    def __init__(self, dim: int, depth: int, n_heads: int, *, mlp_ratio: float = 4.0, activation: str = "gelu",
                 cross_attention: bool = False, memory_dim: int | None = None, norm_eps: float = 1e-5,
                 dropout: float = 0.0, post_norm: bool = False) -> None:
        super().__init__()
        self.dim, self.cross_attention = dim, cross_attention
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, mlp_ratio=mlp_ratio, activation=activation, cross_attention=cross_attention,
                  memory_dim=memory_dim, norm_eps=norm_eps, dropout=dropout, post_norm=post_norm)
            for _ in range(depth))

    def new_cache(self) -> list[LayerCache]:
        """Empty per-layer caches for incremental decoding."""
        return [LayerCache(KVCache(), KVCache()) for _ in self.blocks]

    def forward(self, x: torch.Tensor, *, attention_mask: torch.Tensor | None = None, causal: bool = False,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                cache: list[LayerCache] | None = None, need_weights: bool = False,
                output_hidden_states: bool = False, pool_index: int | torch.Tensor | None = None,
                use_cross_attention: bool = True, segment_ids: torch.Tensor | None = None,
                memory_groups: int = 1) -> TransformerOutput:
        """x (B, T, D) through every block.

        attention_mask (B, past + T): 1 = real, 0 = pad, over the cached positions too. causal: each
        query sees the keys up to its own position. memory (B, S, Dm) and memory_mask (B, S) feed
        the cross-attention. pool_index (an int, 0 = the class token, or (B,) one index per row):
        return only that token's output (B, D). Nothing else reads the other tokens' outputs of
        the last block, so it computes attention for that one query and the MLP on that one token:
        the same numbers at about 1/depth less cost (how CLIP reads its embeddings).
        use_cross_attention=False runs a cross-attention stack without its cross-attention (no
        memory): BLIP's text transformer as a unimodal encoder, with the same weights.
        segment_ids (B, T): packing, see `segment_mask` (no cache: a packed row is read whole).
        memory_groups=g: memory (B / g, S, Dm) and memory_mask (B / g, S) hold one row per g consecutive
        rows of x, which all read it (beam search: the K beams of one image read that image once).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"transformer input must be (B, T, {self.dim}), got {tuple(x.shape)}")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the transformer has {len(self.blocks)}")
        if not use_cross_attention and memory is not None:
            raise ValueError("memory given with use_cross_attention=False: nothing would read it")
        if self.cross_attention and memory is None and use_cross_attention:
            raise ValueError("this transformer has cross-attention: pass memory (B, S, memory_dim)")
        if not self.cross_attention and memory is not None:
            raise ValueError("memory given but the model was built with cross_attention=False")
        memory_groups = validate.divisor("memory_groups", memory_groups, x.shape[0])
        if memory is not None and (memory.dim() != 3 or memory.shape[0] * memory_groups != x.shape[0]):
            rows = x.shape[0] // memory_groups
            raise ValueError(f"memory must be (B={rows}, S, memory_dim)"
                             f"{f' (one row per {memory_groups} rows of x)' if memory_groups > 1 else ''}, "
                             f"got {tuple(memory.shape)}")
        T, dev = x.shape[1], x.device
        past = len(cache[0].self_attn) if cache else 0
        # The masks, once for every block. SDPA's own causal mask (fused, no mask tensor at all) is
        # top-left aligned and knows no padding: use it when that is the whole story.
        fused_causal = causal and attention_mask is None and past == 0 and not need_weights and segment_ids is None
        # One new query (T == 1) is the last position: a causal mask would hide nothing from it.
        mask = None if fused_causal else build_mask(attention_mask, causal=causal and T > 1, T=T, S=past + T,
                                                    device=dev)
        if segment_ids is not None:
            if cache is not None or pool_index is not None:
                raise ValueError("segment_ids (packing) reads a whole row at once: no cache, no pool_index")
            packed = segment_mask(segment_ids)  # (B, 1, T, T); checks the type
            if tuple(segment_ids.shape) != (x.shape[0], T):
                raise ValueError(f"segment_ids must be (B={x.shape[0]}, T={T}), got {tuple(segment_ids.shape)}")
            packed = packed.to(dev)
            mask = packed if mask is None else mask & packed
            mask = mask | ~mask.any(dim=-1, keepdim=True)  # a query that may see nothing sees all (never read)
        if memory_mask is not None:
            if memory is None:
                raise ValueError("memory_mask given without memory")
            if memory_mask.dim() != 2 or memory_mask.shape[0] != memory.shape[0]:
                raise ValueError(f"memory_mask must be ({memory.shape[0]}, {memory.shape[1]}), one row per memory "
                                 f"row, got {tuple(memory_mask.shape)}")
            memory_mask = build_mask(memory_mask, causal=False, T=T, S=memory.shape[1], device=dev)  # (B, 1, 1, S)
        blocks = list(self.blocks)
        if pool_index is not None:
            *blocks, last = blocks
            if cache is not None or need_weights or output_hidden_states:
                raise ValueError("pool_index returns one token per row: it does not combine with a cache, "
                                 "need_weights or output_hidden_states")
            pool_mask = _pool_mask(pool_index, attention_mask, causal, T, dev)  # (B|1, 1, 1, T)
        hidden = [x] if output_hidden_states else None
        attentions = [] if need_weights else None
        for i, block in enumerate(blocks):
            x, weights = block(x, mask=mask, is_causal=fused_causal, memory=memory, memory_mask=memory_mask,
                               cache=cache[i] if cache else None, need_weights=need_weights,
                               use_cross_attention=use_cross_attention, memory_groups=memory_groups)
            if hidden is not None:
                hidden.append(x)
            if attentions is not None:
                attentions.append(weights)
        if pool_index is not None:
            x, _ = last(x, mask=pool_mask, memory=memory, memory_mask=memory_mask, query_index=pool_index,
                        use_cross_attention=use_cross_attention, memory_groups=memory_groups)
            x = x[:, 0]  # (B, D)
        cross = None
        if need_weights and memory is not None and use_cross_attention:
            cross = [block.cross_weights for block in blocks]
        return TransformerOutput(x, hidden, attentions, cross)

def _pool_mask(pool_index: int | torch.Tensor, attention_mask: torch.Tensor | None, causal: bool, T: int,
               device: torch.device) -> torch.Tensor | None:
    """Check pool_index and build the pooled query's mask (B|1, 1, 1, T): causal, it sits at pool_index."""
    if isinstance(pool_index, bool) or not isinstance(pool_index, (int, torch.Tensor)):
        raise TypeError(f"pool_index must be an int or a (B,) integer tensor, got {type(pool_index).__name__}")
    if isinstance(pool_index, int) and not 0 <= pool_index < T:
        raise ValueError(f"pool_index {pool_index} is outside the {T} tokens")
    if isinstance(pool_index, torch.Tensor) and (pool_index.dim() != 1 or pool_index.is_floating_point()):
        raise ValueError(f"pool_index must be a (B,) integer tensor, got {pool_index.dtype} {tuple(pool_index.shape)}")
    positions = torch.as_tensor(pool_index, device=device).reshape(-1, 1)  # (B|1, 1)
    return build_mask(attention_mask, causal=causal, T=1, S=T, device=device, query_positions=positions)


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
