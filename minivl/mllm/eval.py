"""Evaluating the multimodal LLM the way it is used: chat prompts in, generated text out.

Everything here asks held-out scenes a question in the chat template and decodes greedily:
- answers per question type (the VQA types of minivl.world_text.QUESTION_TYPES), exact match;
- captions ("Describe the image."): exact-scene accuracy and hallucination (CHAIR) through
  `minivl.metrics.caption_truth`, which checks every claim against the scene graph;
- box answers ("Where is the red circle?" -> "[x1, y1, x2, y2]", normalised xyxy): IoU >= 0.5;
- POPE (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models"):
  "Is there a <colour> <shape>?" balanced between present and absent pairs; accuracy, F1 of
  "yes" and the yes-ratio (a model that says yes to everything has a ratio of 1 and F1 0.67).
Scenes of the "test" split hold only seen colour-shape pairs, "heldout" scenes one unseen pair
each: the two are reported separately.

The one idea to take away: a generative model is graded on what it says. A fluent answer can
still be false, so every measure here checks the text against the picture's ground truth.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from minivl.metrics.boxes import box_iou
from minivl.metrics.caption_truth import caption_truth
from minivl.world_text import QUESTION_TYPES, rng_for

DESCRIBE = "Describe the image."


@torch.no_grad()
def chat_answers(model, processor, images, questions, max_new_tokens: int = 4, batch_size: int = 64) -> list[str]:
    """One single-turn chat per (image, question): "<|user|><image>\\n{q}<|end|><|assistant|>" -> reply."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(questions), batch_size):
        prompts = [f"USER: <image>\n{q}\nASSISTANT:" for q in questions[i:i + batch_size]]
        inputs = processor(text=prompts, images=list(images[i:i + batch_size]))
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        new = model.generate(**inputs, max_new_tokens=max_new_tokens)
        out += processor.batch_decode(new, skip_special_tokens=True)
    return out


def _clean(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def question_accuracy(model, processor, world, scenes, per_type: int = 1, batch_size: int = 64) -> dict:
    """Accuracy per question type (and overall = mean over asked questions) on `scenes`;
    `per_type` questions of each type per scene (drawn deterministically)."""
    images, questions, answers, types = [], [], [], []
    for s in scenes:
        qs, rng = world.questions(s), rng_for(s, 21)
        for t in QUESTION_TYPES:
            pool = [q for q in qs if q.type == t]
            for q in rng.sample(pool, min(per_type, len(pool))):
                images.append(s.image)
                questions.append(q.question[0].upper() + q.question[1:])
                answers.append(q.answer)
                types.append(t)
    replies = chat_answers(model, processor, images, questions, batch_size=batch_size)
    right = np.array([_clean(r) == a for r, a in zip(replies, answers)])
    types = np.array(types)
    by_type = {t: float(right[types == t].mean()) for t in QUESTION_TYPES if (types == t).any()}
    return {"overall": float(right.mean()), "by_type": by_type, "min_type": min(by_type.values()),
            "n_questions": int(len(right)),
            "examples": [{"q": q, "a": a, "reply": r} for q, a, r in list(zip(questions, answers, replies))[:12]]}


def caption_quality(model, processor, world, scenes, batch_size: int = 64) -> dict:
    """Generated captions scored against the scene graph (minivl.metrics.caption_truth)."""
    captions = chat_answers(model, processor, [s.image for s in scenes], [DESCRIBE] * len(scenes),
                            max_new_tokens=40, batch_size=batch_size)
    truth = caption_truth(world, scenes, captions)
    return {**{k: v for k, v in truth.items() if k != "by_objects"}, "examples": captions[:8]}


_BOX = re.compile(r"\[\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\]")


def parse_box(text: str):
    """"... is at [0.12, 0.30, 0.41, 0.62]." -> (x1, y1, x2, y2) normalised, or None."""
    m = _BOX.search(text)
    if m is None:
        return None
    try:
        return tuple(float(v) for v in m.groups())
    except ValueError:
        return None


def box_accuracy(model, processor, world, scenes, thresh: float = 0.5, batch_size: int = 64) -> dict:
    """"Where is <referring expression>?" -> a normalised xyxy box; correct when IoU >= thresh."""
    images, questions, truth = [], [], []
    S = world.config.image_size
    for s in scenes:
        refs = [r for r in world.referring(s) if r.type == "attribute"]
        if refs:
            r = refs[rng_for(s, 22).randrange(len(refs))]
            images.append(s.image)
            questions.append(f"Where is {r.text}?")
            truth.append([v / S for v in r.box])
    replies = chat_answers(model, processor, images, questions, max_new_tokens=32, batch_size=batch_size)
    boxes = [parse_box(r) for r in replies]
    ious = [float(box_iou([b], [t])[0, 0]) if b is not None and b[2] > b[0] and b[3] > b[1] else 0.0
            for b, t in zip(boxes, truth)]
    return {"acc_iou50": float(np.mean([i >= thresh for i in ious])), "mean_iou": float(np.mean(ious)),
            "parse_rate": float(np.mean([b is not None for b in boxes])), "n": len(ious)}


def pope(model, processor, world, scenes, batch_size: int = 64) -> dict:
    """POPE-style probe: per scene one present and one absent colour-shape pair, "Is there a ...?"."""
    images, questions, truth = [], [], []
    for s in scenes:
        rng = rng_for(s, 23)
        present = sorted({(o.color, o.shape) for o in s.objects})
        pool = world.combos if s.split == "heldout" else world.train_combos
        absent = [p for p in pool if p not in present]
        for (c, sh), label in ((present[rng.randrange(len(present))], "yes"), (absent[rng.randrange(len(absent))], "no")):
            art = "an" if c[0] in "aeiou" else "a"
            images.append(s.image)
            questions.append(f"Is there {art} {c} {sh}?")
            truth.append(label)
    replies = [_clean(r) for r in chat_answers(model, processor, images, questions, max_new_tokens=2,
                                               batch_size=batch_size)]
    said_yes, is_yes = np.array([r == "yes" for r in replies]), np.array([t == "yes" for t in truth])
    tp, fp, fn = (said_yes & is_yes).sum(), (said_yes & ~is_yes).sum(), (~said_yes & is_yes).sum()
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"accuracy": float(np.mean([r == t for r, t in zip(replies, truth)])),
            "precision": float(precision), "recall": float(recall),
            "f1": float(2 * precision * recall / max(precision + recall, 1e-9)),
            "yes_ratio": float(said_yes.mean()), "n": len(truth)}


def evaluate(model, processor, world, n_test: int = 1000, n_heldout: int = 300, n_other: int | None = None,
             batch_size: int = 64) -> dict:
    """Every measure on test scenes (seen pairs) and held-out scenes (one unseen pair each).

    Question accuracy uses n scenes (one question per type each); captions, boxes and POPE
    use `n_other` scenes (default: the same n)."""
    model.eval()
    out = {}
    for split, n in (("test", n_test), ("heldout", n_heldout)):
        if n <= 0:
            continue
        scenes = [world.scene(i, split) for i in range(n)]
        few = scenes[:n_other or n]
        out[split] = {"questions": question_accuracy(model, processor, world, scenes, batch_size=batch_size),
                      "captions": caption_quality(model, processor, world, few, batch_size),
                      "boxes": box_accuracy(model, processor, world, few, batch_size=batch_size),
                      "pope": pope(model, processor, world, few, batch_size)}
    return out


__all__ = ["chat_answers", "question_accuracy", "caption_quality", "parse_box", "box_accuracy", "pope", "evaluate"]
