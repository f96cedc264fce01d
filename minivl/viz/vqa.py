"""VQA plots: per-type accuracy bars, questions drawn on their images, word-to-patch attention.

The idea to take away: look at answers per question type and at where the question's words
look; an overall accuracy can hide a skill left at chance.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from minivl.viz import plot_attention_maps, show_image_texts


def plot_type_accuracy(tables: dict[str, dict[str, float]], types=None, title: str | None = None, chance=None):
    """Grouped bars: one group per question type, one bar per table ({name: {type: acc}}), y in [0, 1]."""
    if not isinstance(tables, dict) or not tables:
        raise ValueError("tables must be a non-empty {name: {type: accuracy}} dict")
    types = list(types or [t for t in next(iter(tables.values())) if t != "overall"] + ["overall"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(types) * max(1, len(tables) / 2)), 3.4))
    width = 0.8 / len(tables)
    for k, (name, table) in enumerate(tables.items()):
        vals = [table.get(t, np.nan) for t in types]
        ax.bar(np.arange(len(types)) + (k - (len(tables) - 1) / 2) * width, vals, width, label=name)
    if chance is not None:
        ax.plot(np.arange(len(types)), [chance.get(t, np.nan) for t in types], "k_", markersize=14, label="chance")
    ax.set_xticks(np.arange(len(types)), types, rotation=30)
    ax.set_ylim(0, 1)
    ax.set_ylabel("VQA accuracy")
    ax.set_xlabel("question type")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    ax.set_title(title or "accuracy per question type")
    fig.tight_layout()
    return fig


def show_answers(scenes: list[dict], preds: list[list[str]], n: int = 4, per_scene: int = 5, title: str | None = None):
    """Scenes beside some of their questions, "question -> predicted (true)", right ones green."""
    texts, marks = [], []
    for s, p in list(zip(scenes, preds))[:n]:
        rows = list(zip(s["questions"], p, s["answers"]))[:per_scene]
        texts.append([f"{q} -> {a}" + ("" if a in t else f"  (true: {t[0]})") for q, a, t in rows])
        marks.append([a in t for _, a, t in rows])
    return show_image_texts([s["image"] for s in scenes[:n]], texts, marks, title=title or "VQA: predicted (true)")


def plot_word_attention(image, attn, words: list[str], title: str | None = None):
    """attn (T, gh, gw): one map per question token (from `model.word_to_patch_attention`)."""
    attn = np.asarray(attn)
    fig = plot_attention_maps(image, attn.reshape(attn.shape[0], -1), grid_size=attn.shape[-1], titles=list(words),
                              ncols=min(6, len(words) + 1))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


__all__ = ["plot_type_accuracy", "show_answers", "plot_word_attention"]
