"""VQA data: records, the answer vocabulary, soft scores, VQA v2 files, and packed batches.

A record is `{"image": uint8 (H, W, 3) array or a path, "question": str, "answers": [str, ...]}`
(VQA v2 gives ten annotators' answers; Shapes World one exact answer). Answers are normalised as
the VQA metric normalises them (`minivl.metrics.vqa.normalize_answer`), the vocabulary is the
most frequent training answers (a cap on its size), and each question's target is a vector of
soft scores, one per vocabulary answer (Goyal et al., 2017; Teney et al., 2018): the VQA accuracy
that answer would get. An answer outside the vocabulary gets no column: the model can never say
it, and the metric counts it wrong.

The one idea to take away: VQA is trained as multi-label classification over a fixed answer
list, with targets that say how much each answer agrees with the annotators.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from minivl.metrics.vqa import normalize_answer
from minivl.world import patch_labels  # region targets from a scene graph (shared with the MLLM's region loss)

FIELDS = ("image", "question", "answers")


def check_records(records, what: str = "records") -> list[dict]:
    """Records as a list of dicts with every field, or a ValueError naming the record and the field."""
    if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__len__"):
        raise TypeError(f"{what} must be a list of dicts {{image, question, answers}}, got {type(records).__name__}")
    records = list(records)
    if not records:
        raise ValueError(f"{what} is empty: need at least one {{image, question, answers}} record")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{what}[{i}] must be a dict {{image, question, answers}}, got {type(r).__name__}")
        for f in FIELDS:
            if f not in r:
                raise ValueError(f"{what}[{i}] is missing the field {f!r} (a record needs {list(FIELDS)})")
        if not isinstance(r["question"], str) or not r["question"].strip():
            raise ValueError(f"{what}[{i}]['question'] must be a non-empty string, got {r['question']!r:.60}")
        a = r["answers"]
        if isinstance(a, str) or not isinstance(a, (list, tuple)) or not a or not all(isinstance(x, str) for x in a):
            raise ValueError(f"{what}[{i}]['answers'] must be a non-empty list of strings, got {a!r:.60}")
        img = r["image"]
        if not isinstance(img, (str, Path, np.ndarray)):
            raise ValueError(f"{what}[{i}]['image'] must be a uint8 (H, W, 3) array or a path, got {type(img).__name__}")
    return records


def answer_vocabulary(answer_lists, max_size: int | None = 1000) -> tuple[str, ...]:
    """The normalised answers, most frequent first (ties alphabetical), at most `max_size` of them."""
    counts = Counter(normalize_answer(a) for answers in answer_lists for a in answers)
    counts.pop("", None)
    vocab = tuple(a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))[:max_size]
    if not vocab:
        raise ValueError("the answer vocabulary is empty: the training records hold no (non-empty) answers")
    return vocab


def soft_scores(answers: list[str], label2id: dict[str, int]) -> torch.Tensor:
    """(A,) the VQA accuracy each vocabulary answer would score against `answers` (leave-one-out over
    annotators, as the metric); one answer (Shapes World) gives 1.0 to it and 0 elsewhere."""
    out = torch.zeros(len(label2id))
    norm = [normalize_answer(a) for a in answers]
    n = len(norm)
    for a, m in Counter(norm).items():
        if a in label2id:
            out[label2id[a]] = 1.0 if n == 1 else (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n
    return out


def load_image(image) -> np.ndarray:
    """A record's image as uint8 (H, W, 3): arrays pass (checked), paths are read (PNG/JPEG via matplotlib/PIL)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image file {path} does not exist")
        try:
            from PIL import Image
            arr = np.asarray(Image.open(path).convert("RGB"))
        except ImportError:  # PIL is optional: matplotlib reads PNG itself
            import matplotlib.image as mpimg
            arr = mpimg.imread(path)
            arr = (arr[..., :3] * (255 if arr.dtype != np.uint8 else 1)).astype(np.uint8)
        return arr
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (H, W, 3) arrays, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"images must be (H, W, 3) RGB, got shape {arr.shape}")
    return arr


def load_vqa_v2(folder, questions: str | None = None, annotations: str | None = None,
                images: str | None = None) -> list[dict]:
    """VQA v2-style files -> records. The folder holds a questions JSON ({"questions": [{question_id,
    image_id, question}]}), an annotations JSON ({"annotations": [{question_id, answers: [{answer}],
    question_type?}]}) and an image folder whose files are named by image_id (COCO_*_000000000042.jpg,
    42.png, ...). The JSONs are found by name (*question*, *annotation*) unless given."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--data {folder} is not a folder")

    def find(given, word):
        if given:
            return folder / given
        hits = sorted(p for p in folder.glob("*.json") if word in p.name.lower())
        if len(hits) != 1:
            raise ValueError(f"expected one *{word}*.json in {folder}, found {[p.name for p in hits]}")
        return hits[0]
    qs = json.loads(find(questions, "question").read_text())["questions"]
    anns = {a["question_id"]: a for a in json.loads(find(annotations, "annotation").read_text())["annotations"]}
    img_dir = folder / images if images else next((p for p in sorted(folder.iterdir()) if p.is_dir()), folder)
    by_id = {}
    for p in img_dir.iterdir():
        digits = "".join(ch for ch in p.stem.split("_")[-1] if ch.isdigit())
        if digits:
            by_id[int(digits)] = p
    records = []
    for q in qs:
        a = anns.get(q["question_id"])
        if a is None:
            raise ValueError(f"question {q['question_id']} has no annotation in the annotations file")
        if q["image_id"] not in by_id:
            raise ValueError(f"no image file for image_id {q['image_id']} in {img_dir}")
        records.append({"image": str(by_id[q["image_id"]]), "question": q["question"],
                        "answers": [x["answer"] for x in a["answers"]],
                        "type": a.get("question_type") or a.get("answer_type") or "all"})
    return records


class Packer:
    """Scenes -> packed batches: one image and all its questions per row (B, Q, L), targets (B, Q, A).

    The tokenizer's ids are cached per question string: a world asks the same questions again and again."""

    def __init__(self, tokenizer, label2id: dict[str, int], context_length: int, truncate: bool = False):
        self.tokenizer, self.label2id, self.context_length, self.truncate = tokenizer, label2id, context_length, truncate
        self._ids: dict[str, list[int]] = {}

    def ids(self, question: str) -> list[int]:
        if question not in self._ids:
            ids = self.tokenizer.encode(question)
            if len(ids) + 2 > self.context_length:
                if not self.truncate:
                    raise ValueError(f"question of {len(ids) + 2} tokens is longer than the text context "
                                     f"({self.context_length}): {question!r:.80}; pass truncate=True to cut it")
                ids = ids[:self.context_length - 2]
            self._ids[question] = [self.tokenizer.bos_id, *ids, self.tokenizer.eos_id]
        return self._ids[question]

    def __call__(self, images: torch.Tensor, questions: list[list[str]], answers: list[list[list[str]]]) -> dict:
        """images (B, 3, H, W); questions[b] the questions of image b; answers[b][q] their answer lists.

        -> pixel_values, input_ids/attention_mask/question_index/position_ids (B, T): row b is its
        questions' tokens one after the other; question_starts/question_mask (B, Q); targets (B, Q, A)."""
        if len(questions) == 0:
            raise ValueError("empty batch: no scenes to pack")
        toks = [[self.ids(q) for q in qs] for qs in questions]
        B, Q = len(toks), max(1, max(len(ts) for ts in toks))
        T = max(1, max(sum(len(t) for t in ts) for ts in toks))
        ids = torch.full((B, T), self.tokenizer.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((B, T), dtype=torch.long)
        group = torch.full((B, T), -2, dtype=torch.long)  # -2: padding (it reads only the image)
        pos = torch.zeros((B, T), dtype=torch.long)
        starts = torch.zeros((B, Q), dtype=torch.long)
        qmask = torch.zeros((B, Q), dtype=torch.bool)
        targets = torch.zeros((B, Q, len(self.label2id)))  # (B, Q, A)
        for b, (ts, ans) in enumerate(zip(toks, answers)):
            flat = [i for t in ts for i in t]
            ids[b, :len(flat)] = torch.tensor(flat, dtype=torch.long)
            mask[b, :len(flat)] = 1
            at = 0
            for q, (t, a) in enumerate(zip(ts, ans)):
                group[b, at:at + len(t)] = q
                pos[b, at:at + len(t)] = torch.arange(len(t))
                starts[b, q], qmask[b, q] = at, True
                at += len(t)
                if len(a) == 1 and a[0] in self.label2id:  # the common case, without normalising again
                    targets[b, q, self.label2id[a[0]]] = 1.0
                else:
                    targets[b, q] = soft_scores(a, self.label2id)
        return {"pixel_values": images, "input_ids": ids, "attention_mask": mask, "question_index": group,
                "position_ids": pos, "question_starts": starts, "question_mask": qmask, "targets": targets}

    def unpacked(self, images: torch.Tensor, questions: list[list[str]], answers: list[list[list[str]]]) -> dict:
        """The same scenes as one (image, question) row each: pixel_values (M, 3, H, W), input_ids (M, T), targets (M, A)."""
        rows = [(b, q, a) for b, (qs, ans) in enumerate(zip(questions, answers)) for q, a in zip(qs, ans)]
        if not rows:
            raise ValueError("empty batch: no questions")
        toks = [self.ids(q) for _, q, _ in rows]
        T = max(len(t) for t in toks)
        ids = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)  # (M, T)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, t in enumerate(toks):
            ids[r, :len(t)], mask[r, :len(t)] = torch.tensor(t, dtype=torch.long), 1
        targets = torch.stack([soft_scores(a, self.label2id) for _, _, a in rows])  # (M, A)
        return {"pixel_values": images[[b for b, _, _ in rows]], "input_ids": ids, "attention_mask": mask,
                "targets": targets}


__all__ = ["check_records", "answer_vocabulary", "soft_scores", "load_image", "load_vqa_v2", "patch_labels", "Packer"]
