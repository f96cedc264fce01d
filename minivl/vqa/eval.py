"""VQA evaluation: predictions over packed scenes, VQA accuracy per question type, count confusion.

Uses the VQA metric in `minivl.metrics.vqa` (normalised answers; exact match for one reference,
the ten-annotator leave-one-out accuracy for several). A prediction is the vocabulary answer with
the highest logit; an answer that is not in the vocabulary can never be predicted, so it counts
wrong, as it must.

The one idea to take away: one number hides everything; per-type accuracy shows which skill
(colour, counting, relations) the model has and which it is guessing.
"""
from __future__ import annotations

import numpy as np
import torch

from minivl.data import image_to_tensor
from minivl.metrics.vqa import accuracy_by_type, normalize_answer
from minivl.vqa.data import Packer

QUESTION_TYPES = ("color", "shape", "count", "exists", "position", "relation", "closest", "furthest")


def world_scenes(world, split: str, n: int, offset: int = 0, n_objects: int | None = None) -> list[dict]:
    """Scenes as {"image": uint8 array, "questions": [...], "answers": [[a], ...], "types": [...]}."""
    out = []
    for i in range(offset, offset + n):
        s = world.scene(i, split, n_objects)
        qs = world.questions(s)
        out.append({"image": s.image, "questions": [q.question for q in qs], "answers": [[q.answer] for q in qs],
                    "types": [q.type for q in qs]})
    return out


def records_to_scenes(records: list[dict], load_image=None) -> list[dict]:
    """Group records by image (a path, or the very same array) into scenes of several questions."""
    groups: dict = {}
    for r in records:
        key = str(r["image"]) if not isinstance(r["image"], np.ndarray) else id(r["image"])
        g = groups.setdefault(key, {"image": r["image"], "questions": [], "answers": [], "types": []})
        g["questions"].append(r["question"])
        g["answers"].append(list(r["answers"]))
        g["types"].append(r.get("type", "all"))
    return list(groups.values())


@torch.no_grad()
def predict_scenes(model, scenes: list[dict], tokenizer, batch_size: int = 32, prepare=None,
                   truncate: bool = False) -> list[list[str]]:
    """The model's answer to every question of every scene (packed when the model allows it)."""
    cfg = model.config
    packer = Packer(tokenizer, cfg.label2id, cfg.context_length, truncate=truncate)
    device = next(model.parameters()).device
    prepare = prepare or (lambda img: img)
    preds = []
    for k in range(0, len(scenes), batch_size):
        chunk = scenes[k:k + batch_size]
        images = image_to_tensor(np.stack([prepare(s["image"]) for s in chunk])).to(device)  # (b, 3, H, W)
        if cfg.image_attends_text:  # no packing: one (image, question) row each
            rows = [(i, q) for i, s in enumerate(chunk) for q in s["questions"]]
            enc = tokenizer([q for _, q in rows], context_length=cfg.context_length, truncate=truncate,
                            padding="longest")
            logits = model(enc["input_ids"].to(device), images[[i for i, _ in rows]],
                           enc["attention_mask"].to(device)).logits
            flat = logits.argmax(-1).tolist()
            it = iter(flat)
            preds += [[cfg.answers[next(it)] for _ in s["questions"]] for s in chunk]
            continue
        batch = packer(images, [s["questions"] for s in chunk], [[["?"]] * len(s["questions"]) for s in chunk])
        logits = model.forward_packed(images, *(batch[k].to(device) for k in (
            "input_ids", "attention_mask", "question_index", "position_ids", "question_starts")))
        best = logits.argmax(-1).tolist()  # (b, Q)
        preds += [[cfg.answers[j] for j in row[:len(s["questions"])]] for row, s in zip(best, chunk)]
    return preds


def score(scenes: list[dict], preds: list[list[str]]) -> dict[str, float]:
    """{"overall", type: VQA accuracy} (exact match for single answers, 10-annotator VQA accuracy otherwise)."""
    p = [a for row in preds for a in row]
    answers = [a for s in scenes for a in s["answers"]]
    types = [t for s in scenes for t in s["types"]]
    refs = [a[0] for a in answers] if all(len(a) == 1 for a in answers) else [
        a if len(a) >= 2 else a * 2 for a in answers]  # a lone reference among many: exact match via duplicates
    return accuracy_by_type(p, refs, types)


def count_confusion(scenes: list[dict], preds: list[list[str]], max_count: int = 8) -> np.ndarray:
    """(K+1, K+1) counts of (true count, predicted count) over count questions; row = truth."""
    m = np.zeros((max_count + 1, max_count + 1), dtype=int)
    for s, row in zip(scenes, preds):
        for t, a, p in zip(s["types"], s["answers"], row):
            if t == "count":
                true, guess = normalize_answer(a[0]), normalize_answer(p)
                if true.isdigit() and int(true) <= max_count:
                    m[int(true), int(guess) if guess.isdigit() and int(guess) <= max_count else max_count] += 1
    return m


def question_only_predictions(train_scenes: list[dict], scenes: list[dict]) -> list[list[str]]:
    """The language prior (Goyal et al., 2017): answer each question with the training answer most often
    given to the same question string (else to its type), never looking at the image."""
    from collections import Counter
    by_q, by_t = {}, {}
    for s in train_scenes:
        for q, a, t in zip(s["questions"], s["answers"], s["types"]):
            by_q.setdefault(q, Counter())[normalize_answer(a[0])] += 1
            by_t.setdefault(t, Counter())[normalize_answer(a[0])] += 1
    fallback = Counter(a for c in by_t.values() for a in c.elements()).most_common(1)[0][0]
    return [[(by_q.get(q) or by_t.get(t) or Counter([fallback])).most_common(1)[0][0]
             for q, t in zip(s["questions"], s["types"])] for s in scenes]


def evaluate(model, scenes: list[dict], tokenizer, **kw) -> dict[str, float]:
    return score(scenes, predict_scenes(model, scenes, tokenizer, **kw))


__all__ = ["QUESTION_TYPES", "world_scenes", "records_to_scenes", "predict_scenes", "score", "count_confusion",
           "question_only_predictions", "evaluate"]
