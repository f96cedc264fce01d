"""Evaluating a captioner: overlap with references, truth against the scene, matching and retrieval.

- BLEU-1..4 and CIDEr-D against every reference phrasing (`minivl.metrics`, equal to pycocoevalcap);
- truth (`minivl.metrics.caption_truth`): each generated caption parsed with the Shapes World
  grammar and checked against the scene graph - object precision / recall, exact-scene accuracy,
  every claim true, the CHAIR-style rate of mentions without a matching object - overall and by
  number of objects;
- ITM accuracy on true pairs and on hard negatives (the most ITC-similar wrong caption);
- ITC retrieval recall@K in both directions (a hit is any valid caption).

The one idea to take away: BLEU asks "does it sound like the references?", truth asks "is it
so?". A caption naming one wrong shape in a list of four keeps most of its n-grams.
"""
from __future__ import annotations

import torch

from minivl.metrics import bleu, cider_d, retrieval_metrics
from minivl.metrics.caption_truth import caption_truth


@torch.no_grad()
def generate_captions(model, images: torch.Tensor, batch_size: int = 200, **decoding) -> list[str]:
    """Captions of images (N, 3, H, W), `batch_size` at a time; decoding as `Captioner.generate`
    (defaults here: num_beams=3, max_new_tokens=32)."""
    decoding = {"num_beams": 3, "max_new_tokens": 32, **decoding}
    device = model.temp.device
    out = []
    for i in range(0, len(images), batch_size):
        ids = model.generate(images[i:i + batch_size].to(device), **decoding)
        out += model.decode(ids)
    return out


def caption_scores(world, scenes, captions) -> dict:
    """BLEU-1..4, CIDEr-D against all references, and the truth measures (with by_objects)."""
    refs = [world.captions(s) for s in scenes]
    out = {f"bleu{k}": v for k, v in zip(range(1, 5), bleu(captions, refs).values())}
    out["cider_d"] = cider_d(captions, refs)
    out.update(caption_truth(world, scenes, captions))
    return out


@torch.no_grad()
def itm_accuracy(model, images: torch.Tensor, texts: list[str], positives: torch.Tensor) -> dict:
    """ITM accuracy on the true pairs (image i, text i) and on hard negatives: for image i, the
    caption with the highest ITC similarity among those not true of it. A pair counts as right
    when P(match) > 0.5 for the true pair and < 0.5 for the negative."""
    device = model.temp.device
    images, positives = images.to(device), positives.to(device)
    sim = model.similarity(images, texts).masked_fill(positives, float("-inf"))  # (N, N)
    hard = sim.argmax(1).tolist()
    p_true = model.itm_score(images, list(texts))
    p_neg = model.itm_score(images, [texts[j] for j in hard])
    return {"itm_true_acc": (p_true > 0.5).float().mean().item(), "itm_hard_negative_acc": (p_neg < 0.5).float().mean().item(),
            "itm_pair_acc": (p_true > p_neg).float().mean().item()}


@torch.no_grad()
def itc_retrieval(model, images: torch.Tensor, texts: list[str], positives: torch.Tensor) -> dict:
    """Image<->text recall@1/5/10 and ranks from the ITC similarities (positives (N_img, N_txt))."""
    sim = model.similarity(images.to(model.temp.device), list(texts)).cpu()
    return retrieval_metrics(sim, positives)


__all__ = ["generate_captions", "caption_scores", "itm_accuracy", "itc_retrieval"]
