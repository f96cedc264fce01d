"""A query-conditioned feature enhancer: the patch tokens read the query before they are classified.

Follows the idea of Grounding DINO's "feature enhancer" and language-guided query selection (Liu et
al., 2023), at course scale. OWL-ViT scores patch n against query q with one cosine: the patch
embedding cannot depend on the query. That is enough for "red circle" (a property of the patch) and
not for "the object left of the square" or "the leftmost object": whether a patch answers depends on
*other* objects, and on which relation the query names. Here, for each (image, query) pair:

1. every patch token gets the query's (pooled) embedding added, projected to the patch width;
2. `depth` of minivl's transformer Blocks run over the 64 query-conditioned patches: self-attention
   (a patch can now look for "the square" among the other patches, because the query says what to look
   for) and cross-attention to the query's text tokens ("left" and "right" are different tokens even
   where pooled embeddings blur them), then an MLP;
3. the class head scores the enhanced tokens as usual; boxes still come from the plain tokens.

Every residual branch starts at zero, so an untrained enhancer returns the patch tokens unchanged: the
model starts as plain OWL-ViT and learns only what the relations need. It costs one small transformer
pass per (image, query), so the model applies it to referring expressions only (`ground`, and the
referring columns of a training batch); detection phrases keep OWL-ViT's one cosine.

The one idea to take away: grounding a relation needs query-dependent patch features - early fusion of
text into the image tokens, the step that separates Grounding DINO from OWL-ViT.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from minivl.transformer import Block, build_mask


class QueryFusion(nn.Module):
    """Patch tokens (B, N, D), pooled queries (B, F, E), their text tokens (B, F, T, Dt) and mask
    (B, F, T) -> query-conditioned patch tokens (B, F, N, D)."""

    def __init__(self, width: int, text_width: int, embed_dim: int, depth: int, heads: int,
                 mlp_ratio: float = 2.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.query_in = nn.Linear(embed_dim, width)  # the pooled query, added to every patch
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=mlp_ratio, cross_attention=True,
                                          memory_dim=text_width, norm_eps=norm_eps) for _ in range(depth))
        for block in self.blocks:  # residual branches start at zero: the enhancer starts as the identity
            for proj in (block.attn.out_proj, block.cross_attn.out_proj, block.mlp.fc2):
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.query_in.weight)  # ... and so does the query injection (its gradient is not zero)
        nn.init.zeros_(self.query_in.bias)

    def forward(self, features: torch.Tensor, queries: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        B, N, _ = features.shape
        F_ = queries.shape[1]
        x = features[:, None] + self.query_in(queries)[:, :, None]  # (B, F, N, D)
        x = rearrange(x, "b f n d -> (b f) n d")
        memory = rearrange(text_tokens, "b f t d -> (b f) t d")  # (B*F, T, Dt)
        mask = build_mask(rearrange(text_mask, "b f t -> (b f) t"), causal=False, T=N, S=memory.shape[1],
                          device=x.device)  # (B*F, 1, N, T): never a padding token
        for block in self.blocks:
            x, _ = block(x, memory=memory, memory_mask=mask)  # (B*F, N, D)
        return rearrange(x, "(b f) n d -> b f n d", b=B, f=F_)


__all__ = ["QueryFusion"]
