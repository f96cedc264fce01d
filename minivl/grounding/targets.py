"""Training targets for open-vocabulary detection, straight from Shapes World's scene graph.

Each training image is asked a set of text queries: the batch's detection phrases (the union of
`world.detection(scene)` over the batch - shape names, colour-shape pairs, "red object" - which
holds the absent ones as negatives) and a few of the image's own referring expressions
(`world.referring(scene)`). Because the scene graph is complete, every image can be labelled
against *every* phrase of the batch: a phrase that names no object in it is an exact negative,
not a missing label (OWL-ViT's real datasets only have "federated" labels). Held-out colour-shape
pairs are never in a training scene, so they never become a training query either.

The one idea to take away: for a detector the labels are a matrix objects x queries (one object
answers "circle", "red circle" and "the leftmost object" at once), and the box targets are
normalised (cx, cy, w, h), the format the box head predicts.
"""
from __future__ import annotations

import numpy as np
import torch

from minivl.data import image_to_tensor
from minivl.metrics.boxes import as_boxes, box_convert
from minivl.world import SIZES

REFERRING_PER_IMAGE = 6  # referring expressions asked of each training image (relational ones first)
ARTICLES = ("a", "an", "the")


def query_text(phrase: str) -> str:
    """The text the text tower reads for a query: "circle" -> "a circle", "orange object" -> "an orange
    object"; a phrase that starts with an article ("the leftmost object") is kept as it is.

    OWL-ViT embeds its queries in a prompt template ("a photo of a {}") for the same reason: the text
    tower was trained on captions. minivl's CLIP read "a red circle", never a bare "circle", and its BPE
    gives a sentence-initial word its own token ("circle" is not " circle"): bare shape names all embed
    to the same vector (cosine 0.99 in clip-cpu), while "a circle" reads the trained " circle"."""
    if not isinstance(phrase, str) or not phrase.split():
        raise ValueError(f"a query must be a non-empty phrase like 'red circle', got {phrase!r}")
    words = " ".join(phrase.split())
    if words.split()[0].lower() in ARTICLES:
        return words
    return ("an " if words[0].lower() in "aeiou" else "a ") + words


def parse_phrase(world, phrase: str) -> tuple:
    """"red square" -> (size, colour, shape) with None for a word left out; "red object" names a
    colour only. ValueError for a word Shapes World does not know."""
    words = phrase.strip().lower().split()
    size = color = shape = None
    for i, w in enumerate(words):
        if w in SIZES and size is None:
            size = w
        elif w in world.config.colors and color is None:
            color = w
        elif w in world.config.shapes and i == len(words) - 1:
            shape = w
        elif not (w == "object" and i == len(words) - 1):
            raise ValueError(f"cannot read detection phrase {phrase!r}: expected [size] [colour] shape|object "
                             f"with sizes {SIZES}, colours {world.config.colors}, shapes {world.config.shapes}")
    if size is color is shape is None:
        raise ValueError(f"detection phrase {phrase!r} names no size, colour or shape")
    return size, color, shape


def matches(obj, parsed: tuple) -> bool:
    """Whether a scene object answers a parsed phrase (every word it has must agree)."""
    size, color, shape = parsed
    return (size is None or obj.size == size) and (color is None or obj.color == color) and \
        (shape is None or obj.shape == shape)


def boxes_to_targets(boxes, image_size: int) -> torch.Tensor:
    """Pixel xyxy boxes (G, 4) -> normalised cxcywh (G, 4), the box head's format. Boxes with x2 < x1
    or y2 < y1 raise ValueError (never silently flipped)."""
    b = as_boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), "target boxes (pixel xyxy)")
    return box_convert(b / image_size, "xyxy", "cxcywh")


def detection_phrases(world, scene) -> list[str]:
    """The phrases of all of the scene's detection queries (shapes, combos, mixed), without repeats."""
    return list(dict.fromkeys(p for q in world.detection(scene) for p in q.phrases))


def pick_referring(world, scene, k: int, rng: np.random.Generator) -> list:
    """Up to k of the scene's referring expressions: relational and extreme ones first (fewer, harder)."""
    refs = world.referring(scene)
    hard = [r for r in refs if r.type != "attribute"]
    easy = [r for r in refs if r.type == "attribute"]
    rng.shuffle(hard)
    rng.shuffle(easy)
    return (hard + easy)[:k]


def make_batch(world, scenes: list, tokenizer, context_length: int, rng: np.random.Generator | None = None,
               referring_per_image: int = REFERRING_PER_IMAGE) -> dict:
    """Scenes -> the batch `OWLViT.loss` reads.

    input_ids/attention_mask (U, T): every distinct query text of the batch, tokenised once (as
    `query_text` writes it: "a circle");
    query_index (B, Q): which of them image b is asked (-1 = padding); query_fused (Q,) bool: the
    referring columns (the ones a fusion enhancer reads, `OWLViTConfig.fusion_depth`); target_boxes (B, G, 4)
    normalised cxcywh, target_mask (B, G), target_labels (B, G, Q) multi-hot over the image's queries.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    vocab = sorted({p for s in scenes for p in detection_phrases(world, s)})
    parsed = [parse_phrase(world, p) for p in vocab]
    refs = [pick_referring(world, s, referring_per_image, rng) if referring_per_image else [] for s in scenes]
    texts = list(dict.fromkeys(vocab + [r.text for rs in refs for r in rs]))
    slot = {t: i for i, t in enumerate(texts)}
    B, V = len(scenes), len(vocab)
    Q = V + max([len(rs) for rs in refs] + [0])
    G = max([len(s.objects) for s in scenes] + [1])
    S = world.config.image_size
    index = torch.full((B, Q), -1, dtype=torch.long)
    boxes, mask = torch.zeros(B, G, 4), torch.zeros(B, G, dtype=torch.bool)
    labels = torch.zeros(B, G, Q)
    index[:, :V] = torch.arange(V)
    counts = [len(s.objects) for s in scenes]
    all_boxes = boxes_to_targets([o.box for s in scenes for o in s.objects], S).split(counts)  # one checked call
    for b, (scene, rs) in enumerate(zip(scenes, refs)):
        n = counts[b]
        boxes[b, :n] = all_boxes[b]
        mask[b, :n] = True
        if n:
            labels[b, :n, :V] = torch.tensor([[matches(o, p) for p in parsed] for o in scene.objects],
                                             dtype=torch.float32)
        for j, r in enumerate(rs):
            index[b, V + j] = slot[r.text]
            labels[b, r.index, V + j] = 1.0  # a referring expression names exactly one object
    tok = tokenizer([query_text(t) for t in texts], context_length=context_length, truncate=True, padding="longest")
    return {"image": image_to_tensor(np.stack([s.image for s in scenes])), "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"], "query_index": index,
            "query_fused": torch.arange(Q) >= V, "target_boxes": boxes,
            "target_mask": mask, "target_labels": labels}


__all__ = ["REFERRING_PER_IMAGE", "query_text", "parse_phrase", "matches", "boxes_to_targets", "detection_phrases",
           "pick_referring", "make_batch"]
