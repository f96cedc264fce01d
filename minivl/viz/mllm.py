"""Plots of the multimodal LLM: loss per stage, chats under their images, the loss mask as coloured tokens."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from minivl.viz import show_image_texts


def plot_stage_losses(stages: dict, title: str = "LLaVA-style training: loss per stage"):
    """stages {1: {"history": [{"step", "loss"}]}, 2: ...} -> one curve per stage, steps run on."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    offset = 0
    for k in sorted(stages, key=int):
        h = stages[k]["history"]
        if h:
            ax.plot([offset + r["step"] for r in h], [r["loss"] for r in h], lw=1.2,
                    label=f"stage {k}: " + ("captions" if int(k) == 1 else "chats (instruction tuning)"))
        offset += stages[k]["steps"]
    ax.set_xlabel("step (both stages)")
    ax.set_ylabel("loss (assistant tokens\n+ region term when on)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def show_chats(model, processor, scenes, world, questions_per_scene: int = 3):
    """Each scene's image beside a short chat the model answers (describe + questions), with ticks
    (caption: every claim true and every object named, by minivl.metrics.caption_truth)."""
    from minivl.metrics.caption_truth import scene_truth
    from minivl.mllm.eval import DESCRIBE, chat_answers
    texts, marks = [], []
    for s in scenes:
        qs = world.questions(s)
        picked = [qs[i] for i in np.linspace(0, len(qs) - 1, questions_per_scene).round().astype(int)]
        asks = [DESCRIBE] + [q.question[0].upper() + q.question[1:] for q in picked]
        replies = chat_answers(model, processor, [s.image] * len(asks), asks, max_new_tokens=40)
        texts.append([f"USER: {asks[0]}  ASSISTANT: {replies[0]}"]
                     + [f"USER: {a}  ASSISTANT: {r}" for a, r in zip(asks[1:], replies[1:])])
        marks.append([bool(scene_truth(world, s, replies[0])["exact"])] + [r.strip().rstrip(".").lower() == q.answer for r, q in zip(replies[1:], picked)])
    return show_image_texts([s.image for s in scenes], texts, marks=marks,
                            title="chats on test scenes (tick: the caption is exactly true / the answer is right)")


def show_token_mask(tokens: list[str], mask: list[bool], width: int = 12, title: str | None = None):
    """Tokens as boxes in reading order: orange = loss computed (assistant), grey = no loss (user, image)."""
    n = len(tokens)
    rows = (n + width - 1) // width
    fig, ax = plt.subplots(figsize=(width * 0.95, 0.45 * rows + 0.6))
    for i, (tok, m) in enumerate(zip(tokens, mask)):
        r, c = divmod(i, width)
        ax.add_patch(plt.Rectangle((c, -r), 0.95, 0.85, color="tab:orange" if m else "lightgray"))
        ax.text(c + 0.47, -r + 0.42, tok.replace("\n", "\\n")[:9], ha="center", va="center", fontsize=6.5)
    ax.set_xlim(0, width)
    ax.set_ylim(-rows + 0.9, 1)
    ax.axis("off")
    ax.set_title(title or "loss mask: orange tokens are targets (assistant), grey are context", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["plot_stage_losses", "show_chats", "show_token_mask"]
