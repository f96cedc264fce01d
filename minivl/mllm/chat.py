"""The chat template of minivl's multimodal LLM: one fixed, documented format, and its loss mask.

LLaVA (Liu et al., 2023) trains on conversations written as "USER: <image>\\n... ASSISTANT: ...",
and computes the loss on the assistant's words only. minivl keeps that layout but spells the
role markers as single special tokens of the shared tokenizer, so a turn costs one token of
context instead of the ten bytes of "ASSISTANT:":

    <|bos|><|user|>{user text}<|end|><|assistant|>{assistant text}<|end|><|user|>...

- `<image>` in a user turn is the placeholder the processor expands to the image's tokens
  (`<|image|>` repeated once per image token), as transformers' LLaVA processor does.
- `<|end|>` closes every turn; the model learns to emit it, and generation stops on it.
- The readable spelling is accepted too: "USER: <image>\\nWhat is in this image?\\nASSISTANT:"
  (the seed's prompt) is the same token sequence as the template (see `normalize`).
- Loss mask: the assistant's text and its closing `<|end|>` are targets; bos, the role markers,
  user text and image tokens get label -100 (no loss).

The one idea to take away: instruction tuning is next-token prediction on a transcript where
only the answers count. The model reads the question and the image, and is graded on the reply.
"""
from __future__ import annotations

import re

IMAGE = "<image>"  # the placeholder a user writes (transformers' LLaVA spelling)
USER, ASSISTANT, END, IMAGE_TOKEN = "<|user|>", "<|assistant|>", "<|end|>", "<|image|>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}  # LLaVA + OpenAI names
IGNORE = -100  # label of a position without loss (PyTorch's cross-entropy ignore_index)


def check_messages(messages) -> list[dict]:
    """Messages as [{"role": "user"|"assistant", "content": str}]; LLaVA's {"from", "value"} accepted.

    Raises ValueError for an unknown role, TypeError for a message that is not a dict of strings."""
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = (m.get("role"), m.get("content")) if "role" in m else (m.get("from"), m.get("value"))
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r}; expected one of {sorted(ROLES)} "
                             "(user/human or assistant/gpt)")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}] content must be a str, got {type(content).__name__}")
        out.append({"role": ROLES[role], "content": content})
    return out


def apply_chat_template(messages, add_generation_prompt: bool = False) -> str:
    """The conversation as template text (bos excluded: the processor adds it).

    add_generation_prompt=True ends with `<|assistant|>`, where the model's reply begins; the
    conversation must then end with a user turn."""
    messages = check_messages(messages)
    parts = [(USER if m["role"] == "user" else ASSISTANT) + m["content"] + END for m in messages]
    if add_generation_prompt:
        if messages[-1]["role"] != "user":
            raise ValueError("add_generation_prompt=True needs the last message to be the user's, got "
                             f"{messages[-1]['role']!r}")
        parts.append(ASSISTANT)
    return "".join(parts)


_READABLE = [(re.compile(r"[ \t]*\n?USER:[ \t]*"), END + USER), (re.compile(r"[ \t]*\n?ASSISTANT:[ \t]*"), END + ASSISTANT)]


def normalize(text: str) -> str:
    """The readable spelling "USER: ...\\nASSISTANT: ..." rewritten as the template's tokens.

    Each role marker closes the turn before it: "USER:" becomes `<|end|><|user|>` and
    "ASSISTANT:" `<|end|><|assistant|>` (no `<|end|>` before the first turn, never two in a row);
    text already in the template form passes unchanged."""
    if "USER:" not in text and "ASSISTANT:" not in text:
        return text
    for pattern, token in _READABLE:
        text = pattern.sub(token, text)
    while END + END in text:  # "...<|end|>\nASSISTANT:" would close the turn twice
        text = text.replace(END + END, END)
    return text[len(END):] if text.startswith(END) else text


def assistant_mask(ids: list[int], assistant_id: int, end_id: int) -> list[bool]:
    """True at every token the loss is computed on: after each `<|assistant|>`, up to and
    including its `<|end|>` (the marker itself is given, not predicted)."""
    out, inside = [], False
    for t in ids:
        out.append(inside)
        if t == assistant_id:
            inside = True
        elif t == end_id:
            inside = False
    return out


def labels_for(ids: list[int], assistant_id: int, end_id: int) -> list[int]:
    """input_ids -> labels aligned with them: the id where the loss counts, IGNORE elsewhere."""
    return [t if keep else IGNORE for t, keep in zip(ids, assistant_mask(ids, assistant_id, end_id))]


__all__ = ["IMAGE", "USER", "ASSISTANT", "END", "IMAGE_TOKEN", "ROLES", "IGNORE", "check_messages",
           "apply_chat_template", "normalize", "assistant_mask", "labels_for"]
