"""The LLaVA processor: prompts + images -> input_ids with expanded image tokens, pixel_values.

As transformers' `LlavaProcessor`: `processor(text=..., images=..., return_tensors="pt")` turns
each `<image>` of a prompt into `num_image_tokens` copies of the image token (the model swaps
their embeddings for the image's projected patches), tokenises the rest with the chat template's
special tokens (`minivl.mllm.chat`), pads a batch on the left (generation appends on the right)
and turns images into the [-1, 1] tensors the CLIP tower reads. `decode` / `batch_decode` go back.

The one idea to take away: the prompt's length depends on the image. Expansion happens before
the model, so the context-length check must count image tokens, not the one `<image>` word.
"""
from __future__ import annotations

import numpy as np
import torch

from minivl.clip.load import Preprocess
from minivl.mllm import chat


class LlavaProcessor:
    """Tokenizer + image transform of one LlavaModel (its config fixes the image size and token count)."""

    def __init__(self, tokenizer, config) -> None:
        if not hasattr(tokenizer, "token_to_id"):
            raise TypeError(f"tokenizer must be a minivl Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer, self.config = tokenizer, config
        self.num_image_tokens = config.num_image_tokens
        self.context_length = config.lm.context_length
        self.image_processor = Preprocess(config.vision.image_size)
        ids = {t: tokenizer.token_to_id(t) for t in (chat.IMAGE_TOKEN, chat.USER, chat.ASSISTANT, chat.END)}
        self.image_token_id, self.user_id = ids[chat.IMAGE_TOKEN], ids[chat.USER]
        self.assistant_id, self.end_id = ids[chat.ASSISTANT], ids[chat.END]
        if self.image_token_id != config.image_token_id:
            raise ValueError(f"the tokenizer's {chat.IMAGE_TOKEN} is id {self.image_token_id}, the model's "
                             f"image_token_id is {config.image_token_id}: not the tokenizer the model was built for")
        self.pad_id, self.bos_id = tokenizer.pad_id, tokenizer.bos_id

    @classmethod
    def from_model(cls, model) -> "LlavaProcessor":
        if getattr(model, "tokenizer", None) is None:
            from minivl.data import world_tokenizer
            model.tokenizer = world_tokenizer(model.config.lm.vocab_size)
        return cls(model.tokenizer, model.config)

    # ------------------------------------------------------------------ text
    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        return chat.apply_chat_template(messages, add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """One prompt -> ids: bos, the template's tokens, each <image> as num_image_tokens image ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str (or a list of str), got {type(text).__name__}")
        pieces = chat.normalize(text).split(chat.IMAGE)
        ids = [self.bos_id]
        for k, piece in enumerate(pieces):
            if k:
                ids += [self.image_token_id] * self.num_image_tokens
            ids += self.tokenizer.encode(piece, allow_special=True)
        return ids

    def __call__(self, text=None, images=None, return_tensors: str = "pt", padding_side: str = "left") -> dict:
        """-> {input_ids (B, T), attention_mask (B, T), pixel_values (n_images, 3, S, S)}.

        text: a prompt or a list; images: an image, a list of images (all prompts' images in
        reading order) or a list of lists (one per prompt). Prompts are padded on the left by
        default (padding_side="right" for training batches). ValueError when the <image> count
        differs from the images given, or a prompt is longer than the context after expansion."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if text is None:
            raise ValueError("text is required: a prompt with one <image> per image")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is empty: expected at least one prompt")
        flat = self._flat_images(images, len(texts))
        n_placeholders = [t.count(chat.IMAGE) if isinstance(t, str) else 0 for t in texts]
        if sum(n_placeholders) != len(flat):
            raise ValueError(f"the prompts hold {sum(n_placeholders)} <image> placeholder(s) "
                             f"(per prompt: {n_placeholders}) but {len(flat)} image(s) were given: "
                             "expected exactly one image per <image>")
        rows = [self.encode(t) for t in texts]
        for i, r in enumerate(rows):
            if len(r) > self.context_length:
                raise ValueError(f"prompt {i} is {len(r)} tokens after expanding {n_placeholders[i]} <image> into "
                                 f"{self.num_image_tokens} tokens each, more than the context length "
                                 f"{self.context_length}")
        out = self.pad(rows, padding_side)
        if flat:
            out["pixel_values"] = torch.stack([self.image_processor(im) for im in flat])  # (n, 3, S, S)
        return out

    def pad(self, rows: list[list[int]], padding_side: str = "left") -> dict:
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
        for b, r in enumerate(rows):
            sl = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
            ids[b, sl], mask[b, sl] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}

    @staticmethod
    def _flat_images(images, n_texts: int) -> list:
        if images is None:
            return []
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:  # a batch (n, ...)
            return list(images)
        if not isinstance(images, (list, tuple)):
            return [images]
        flat = []
        for im in images:
            flat.extend(im if isinstance(im, (list, tuple)) else [im])
        return flat

    # ------------------------------------------------------------------ back to text
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of generated ids; stops at the first <|end|> (the end of the reply) and drops pads."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if self.end_id in ids and skip_special_tokens:
            ids = ids[:ids.index(self.end_id)]
        ids = [i for i in ids if i != self.pad_id]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).strip()

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in batch]

    # ------------------------------------------------------------------ training examples
    def encode_conversation(self, conversation, n_images: int = 1) -> tuple[list[int], list[int]]:
        """A whole conversation (LLaVA {"from", "value"} turns or {"role", "content"}) -> (ids, labels):
        labels = ids on the assistant's tokens (and each closing <|end|>), -100 elsewhere."""
        text = chat.apply_chat_template(conversation)
        if text.count(chat.IMAGE) != n_images:
            raise ValueError(f"the conversation holds {text.count(chat.IMAGE)} <image> placeholder(s), "
                             f"expected {n_images} (one per image)")
        ids = self.encode(text)
        if len(ids) > self.context_length:
            raise ValueError(f"the conversation is {len(ids)} tokens after image expansion, more than the "
                             f"context length {self.context_length}")
        return ids, chat.labels_for(ids, self.assistant_id, self.end_id)


__all__ = ["LlavaProcessor"]
