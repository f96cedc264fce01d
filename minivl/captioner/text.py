"""BLIP's text transformer: one BERT-style stack that is an encoder or a decoder by its mask.

Follows BERT (Devlin et al., 2019) as BLIP (Li et al., 2022) uses it: token + position embeddings
followed by a LayerNorm, *post-norm* blocks (x = LN(x + f(x))) with a cross-attention to the image
patches in every block, and an LM prediction head (dense -> GELU -> LayerNorm -> the tied token
embedding matrix plus a bias). The blocks are `minivl.transformer.Block` with post_norm=True: the
same one attention as every other model.

The module serves BLIP's three modes with the same weights:
- unimodal encoder (ITC): bidirectional self-attention, cross-attention skipped;
- image-grounded encoder (ITM): bidirectional self-attention + cross-attention to the image;
- image-grounded decoder (LM): causal self-attention + cross-attention; `forward` is this mode
  and follows the `minivl.generation.Decoder` protocol, so captions decode through the one engine.

With `decoder_self_attention=True` (BLIP's own choice) the decoder has its own causal
self-attention (and its LayerNorm) in every block and shares the rest - embeddings,
cross-attention, MLP - with the encoder: reading a whole sentence and writing one left to right
need different attention patterns, and one set of self-attention weights serving both makes the
ITC/ITM objectives pull against the captioning one. Each block is then a `BertLayer`, the one
`Block` with that second self-attention module chosen in decoder mode.

The one idea to take away: encoder or decoder is mostly not a different network, it is a different
mask. The same weights read a sentence all at once (to judge it) or left to right (to write it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minivl import validate
from minivl.lm import positions_from_mask
from minivl.text import check_tokens
from minivl.transformer import ACTIVATIONS, Attention, Block, LayerCache, Transformer, init_weights


@dataclass
class BertTextConfig:
    vocab_size: int = 514  # token ids 0 .. vocab_size - 1: the tokenizer's plus BLIP's [ENC] and [DEC]
    context_length: int = 40  # longest sequence ([DEC] + prompt + caption + eos)
    width: int = 64  # token width D
    depth: int = 4  # post-norm blocks, each with self-attention, cross-attention and an MLP
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    activation: str = "gelu"  # BERT's exact (erf) GELU
    norm_eps: float = 1e-12  # BERT's LayerNorm epsilon
    dropout: float = 0.0  # attention/MLP/embedding dropout
    memory_dim: int = 64  # width of the image tokens the cross-attention reads (the ViT's width)
    decoder_self_attention: bool = False  # the decoder's own causal self-attention (BLIP's); False = shared
    pad_id: int | None = None  # ids generate() defaults to; the captioner's config fills them in
    eos_id: int | None = None

    def __post_init__(self) -> None:
        validate.config_fields(self, ints=dict(vocab_size=1, context_length=1, width=1, depth=1, heads=1,
                                               memory_dim=1),
                               reals=dict(mlp_ratio=(0, None, True), norm_eps=(0, None, True),
                                          dropout=(0, 1, False, True)), strings=("activation",))
        validate.boolean("BertTextConfig.decoder_self_attention", self.decoder_self_attention)
        for f in ("pad_id", "eos_id"):
            validate.vocab_id(f"BertTextConfig.{f}", getattr(self, f), self.vocab_size)


class BertLayer(Block):
    """A post-norm `Block` with a second, causal self-attention (`dec_attn`, `ln_dec`) used in decoder
    mode (BLIP's decoder: its own self-attention, the cross-attention and MLP shared).

    `decoding` picks the self-attention of the next call; `BertText` sets it before every pass."""

    def __init__(self, dim: int, n_heads: int, **kwargs) -> None:
        super().__init__(dim, n_heads, post_norm=True, **kwargs)
        self.dec_attn = Attention(dim, n_heads, dropout=kwargs.get("dropout", 0.0))
        self.ln_dec = nn.LayerNorm(dim, eps=kwargs.get("norm_eps", 1e-5))
        self.decoding = False

    def _post_norm(self, x, mask, is_causal, memory, memory_mask, cache, need_weights, query_index,
                   use_cross_attention, *, memory_groups: int = 1):
        own = (self.dec_attn, self.ln_dec) if self.decoding else (None, None)  # None: the encoder's attn / ln_1
        return super()._post_norm(x, mask, is_causal, memory, memory_mask, cache, need_weights, query_index,
                                  use_cross_attention, *own, memory_groups=memory_groups)


class BertText(nn.Module):
    """Token ids (B, T) [+ image tokens (B, S, Dm)] -> features (B, T, D) or next-token logits (B, T, V)."""

    def __init__(self, config: BertTextConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(c.context_length, c.width))
        self.ln_embed = nn.LayerNorm(c.width, eps=c.norm_eps)  # BERT normalises the embeddings too
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.width, c.depth, c.heads, mlp_ratio=c.mlp_ratio, activation=c.activation,
                                       cross_attention=True, memory_dim=c.memory_dim, norm_eps=c.norm_eps,
                                       dropout=c.dropout, post_norm=True)
        if c.decoder_self_attention:
            self.transformer.blocks = nn.ModuleList(
                BertLayer(c.width, c.heads, mlp_ratio=c.mlp_ratio, activation=c.activation, cross_attention=True,
                          memory_dim=c.memory_dim, norm_eps=c.norm_eps, dropout=c.dropout) for _ in range(c.depth))
        # the LM prediction head: a transform, then the token embedding matrix read backwards
        self.head_dense = nn.Linear(c.width, c.width)
        self.head_ln = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.act = ACTIVATIONS[c.activation]
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    def new_cache(self) -> list[LayerCache]:
        return self.transformer.new_cache()

    def _mode(self, decoding: bool) -> None:
        """Which self-attention the blocks use next: the decoder's own (BertLayer) or the encoder's."""
        for block in self.transformer.blocks:
            if isinstance(block, BertLayer):
                block.decoding = decoding

    def embed(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D), positions not yet added (the Decoder protocol)."""
        if inputs_embeds is not None:
            raise ValueError("BLIP's text decoder takes no prefix embeddings: the image enters by cross-attention")
        if input_ids is None:
            raise ValueError("pass input_ids")
        input_ids, _ = check_tokens(input_ids, self.config.vocab_size, self.config.context_length)
        return self.token_embedding(input_ids)  # (B, T, D)

    def _inputs(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.drop(self.ln_embed(x + self.pos_embed[positions]))  # (B, T, D)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
               need_weights: bool = False):
        """Bidirectional features (B, T, D): unimodal without memory (ITC), image-grounded with it (ITM).

        Right padding (the tokenizer's) keeps positions 0, 1, 2, ... of the real tokens.
        """
        input_ids, attention_mask = check_tokens(input_ids, self.config.vocab_size, self.config.context_length,
                                                 attention_mask)
        T = input_ids.shape[1]
        x = self._inputs(self.token_embedding(input_ids), torch.arange(T, device=input_ids.device))
        self._mode(decoding=False)
        out = self.transformer(x, attention_mask=attention_mask, memory=memory, memory_mask=memory_mask,
                               use_cross_attention=memory is not None, need_weights=need_weights)
        return out if need_weights else out.last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Features (B, T, D) -> logits (B, T, V) through the LM prediction head."""
        h = self.head_ln(self.act(self.head_dense(h)))
        return h @ self.token_embedding.weight.T + self.head_bias  # (B, T, V), tied to the input embeddings

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
                need_weights: bool = False, memory_groups: int = 1):
        """The image-grounded causal decoder: next-token logits (B, T, V) for the new positions.

        attention_mask (B, past + T) covers cached positions too; positions come from it (the
        `generation.Decoder` protocol). With need_weights, returns (logits, TransformerOutput).
        memory_groups=g: memory (B / g, S, Dm), one image per g consecutive rows (beam search's beams).
        """
        if memory is None:
            raise ValueError("the caption decoder reads the image: pass memory (B, S, memory_dim)")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T = x.shape[:2]
        past = len(cache[0].self_attn) if cache else 0
        if past + T > self.config.context_length:
            raise ValueError(f"{past} cached + {T} new positions exceed the context length {self.config.context_length}")
        if attention_mask is not None:
            attention_mask = validate.attention_mask("attention_mask", attention_mask, (B, past + T))
            positions = positions_from_mask(attention_mask)[:, past:]  # (B, T)
        else:
            positions = torch.arange(past, past + T, device=x.device).expand(B, T)  # (B, T)
        memory_groups = validate.divisor("memory_groups", memory_groups, B)
        memory = validate.tensor("memory", memory, shape=(B // memory_groups, None, self.config.memory_dim),
                                 kind="float")
        self._mode(decoding=True)
        out = self.transformer(self._inputs(x, positions), attention_mask=attention_mask, causal=True,
                               memory=memory.to(x.dtype), memory_mask=memory_mask, cache=cache,
                               need_weights=need_weights, memory_groups=memory_groups)
        logits = self.logits(out.last_hidden_state)  # (B, T, V)
        return (logits, out) if need_weights else logits


__all__ = ["BertTextConfig", "BertText", "BertLayer"]
