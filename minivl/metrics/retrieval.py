"""Cross-modal retrieval metrics: recall@K, median and mean rank, image->text and text->image.

The protocol of VSE++ (Faghri et al., 2018) and CLIP (Radford et al., 2021) on COCO / Flickr30k:
rank every text for each image (and every image for each text) by similarity; a query is
answered at rank r when its best-ranked correct item is r-th. With five captions per image,
image->text counts a hit when *any* of the image's captions is in the top K.

The one idea: the positives are a many-to-many mask, not the diagonal. An image has several
captions, and Shapes World repeats captions ("a red circle") across images, so a text can have
several correct images too; scoring only the diagonal would punish the model for a tie that is
not its fault.

Ties count against the model: the rank of the best positive is 1 + the number of negatives whose
similarity is >= its own, so a constant similarity matrix gets chance-or-worse recall, never 1.
"""
from __future__ import annotations

import torch

from minivl.metrics._checks import check_ks, to_tensor


def _inputs(similarity, positives) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (Q, K) similarity (real, finite) and positives (bool, or 0/1 integers)."""
    sim = to_tensor(similarity, "similarity")
    pos = to_tensor(positives, "positives", kind="any")
    if sim.dim() != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"similarity must be a non-empty (N_img, N_txt) matrix, got {tuple(sim.shape)}")
    if pos.shape != sim.shape:
        raise ValueError(f"positives must have the similarity's shape {tuple(sim.shape)}, got {tuple(pos.shape)}")
    if pos.dtype != torch.bool:
        if pos.is_floating_point() or not ((pos == 0) | (pos == 1)).all():
            raise ValueError(f"positives must be a bool (or 0/1 integer) mask, got dtype {pos.dtype}")
        pos = pos.bool()
    return sim, pos.to(sim.device)


def first_positive_rank(similarity, positives) -> torch.Tensor:
    """Rank (1 = best) of the highest-scoring positive in each row (Q,), from (Q, K) inputs.

    rank_q = 1 + #{negatives j : s_qj >= max_{p positive} s_qp}
    A row without any positive has no rank: ValueError.
    """
    similarity, positives = _inputs(similarity, positives)
    empty = ~positives.any(1)
    if empty.any():
        raise ValueError(f"row {empty.nonzero()[0].item()} of positives has no True entry: its rank is undefined")
    return _ranks(similarity, positives)


def _ranks(similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:  # inputs checked
    best_positive = torch.where(positives, similarity, torch.full_like(similarity, -torch.inf)).amax(1)  # (Q,)
    beaten_by = (similarity >= best_positive[:, None]) & ~positives  # (Q, K)
    return beaten_by.sum(1) + 1


def retrieval_metrics(similarity, positives, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K (a fraction in [0, 1]), median and mean rank, in both directions.

    similarity: (N_img, N_txt), higher = more similar (e.g. CLIP's image @ text.T).
    positives: (N_img, N_txt) bool, True where text j describes image i. Every image needs at
        least one positive text and every text at least one positive image.
    Returns keys "i2t_R@K", "t2i_R@K" for K in ks, and "{i2t,t2i}_{median,mean}_rank":
        R@K = (1/Q) * sum_q [rank_q <= K]; median_rank is the usual median (the mean of the two
        middle ranks for an even count).
    """
    sim, pos = _inputs(similarity, positives)
    ks = check_ks(ks, "ks")
    for name, mask, axis in (("image", pos, 1), ("text", pos, 0)):
        empty = ~mask.any(axis)
        if empty.any():
            raise ValueError(f"{name} {empty.nonzero()[0].item()} has no positive "
                             f"{'text' if name == 'image' else 'image'}: its rank is undefined")

    out = {}
    ranks = {"i2t": _ranks(sim, pos), "t2i": _ranks(sim.T, pos.T)}
    for direction, r in ranks.items():
        for k in ks:
            out[f"{direction}_R@{k}"] = (r <= k).double().mean().item()
    for direction, r in ranks.items():
        out[f"{direction}_median_rank"] = r.double().quantile(0.5).item()
        out[f"{direction}_mean_rank"] = r.double().mean().item()
    return out
