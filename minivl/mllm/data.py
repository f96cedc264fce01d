"""Training data for the multimodal LLM: Shapes World chats, and LLaVA-format JSON from disk.

Two stages, as LLaVA (Liu et al., 2023): stage 1 pairs each image with a caption ("describe the
image" -> caption), stage 2 with a multi-turn conversation. Shapes World's own conversation
(`world.conversation(scene)`: describe, count, locate, one question) is extended here with
questions of every type (`world.questions(scene)`) in random order, so that one sequence grades
the model on several answers about the same picture, and the first question after the image is
sometimes each type (the evaluation asks one question right after the image).

On disk, LLaVA's format: a JSON list of {"image": path relative to the image folder,
"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}, with "<image>" in a human turn.

The one idea to take away: stage 1 teaches the projector the LM's vocabulary of inputs (what a
caption's objects look like as vectors); stage 2 teaches the LM to use them to follow requests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from minivl.data import image_to_tensor
from minivl.mllm import chat
from minivl.world import patch_labels, region_attributes
from minivl.world_text import DESCRIBE

COUNT_ALL = "How many objects are there?"  # the world conversation's count turn (a sentence answer)


def caption_chat(world, scene, rng) -> list[dict]:
    """Stage 1: one turn, "<image>\\nDescribe the image." -> one of the scene's captions."""
    caps = world.captions(scene)  # as the caption LM read them (lowercase, no full stop): its prior applies
    return [{"from": "human", "value": chat.IMAGE + "\n" + DESCRIBE[rng.integers(len(DESCRIBE))]},
            {"from": "gpt", "value": caps[rng.integers(len(caps))]}]


def question_chat(world, scene, rng, n_questions: int = 4, world_turns: bool = True) -> list[dict]:
    """Stage 2: the world's conversation turns (describe, locate, one question; its count turn is
    dropped, see below) when `world_turns`, plus `n_questions` questions of distinct types, all in
    random order; the image placeholder opens the first user turn."""
    turns = []
    if world_turns:
        conv = world.conversation(scene)
        turns = [(conv[i]["value"].replace(chat.IMAGE + "\n", ""), conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
        caps = world.captions(scene)  # the describe turn in stage 1's spelling, so both stages agree
        turns[0] = (turns[0][0], caps[rng.integers(len(caps))])
        # the world's "How many objects are there?" -> "There are 3 objects." would teach a second answer
        # to the count question the evaluation asks ("3"): the question types below keep the short one
        turns = [turns[0]] + [t for t in turns[1:] if t[0] != COUNT_ALL]
    qs = world.questions(scene)
    types = sorted({q.type for q in qs})
    for t in rng.permutation(types)[:n_questions]:
        pool = [q for q in qs if q.type == t]
        q = pool[rng.integers(len(pool))]
        turns.append((q.question[0].upper() + q.question[1:], q.answer))
    order = rng.permutation(len(turns))
    out = []
    for k, i in enumerate(order):
        user, answer = turns[i]
        out += [{"from": "human", "value": (chat.IMAGE + "\n" if k == 0 else "") + user},
                {"from": "gpt", "value": answer}]
    return out


def fit_conversation(processor, conversation) -> tuple[list[int], list[int]]:
    """(ids, labels) of the conversation, its last exchanges dropped until it fits the context."""
    conversation = list(conversation)
    while True:
        try:
            return processor.encode_conversation(conversation)
        except ValueError:
            if len(conversation) <= 2:
                raise
            conversation = conversation[:-2]


def collate_chats(processor, images, conversations) -> dict:
    """Images (n, 3, S, S) in [-1, 1] (one per conversation) + conversations -> a training batch:
    input_ids / attention_mask / labels (B, T) right-padded, pixel_values."""
    rows, labels = zip(*(fit_conversation(processor, c) for c in conversations))
    batch = processor.pad(list(rows), "right")
    T = batch["input_ids"].shape[1]
    batch["labels"] = torch.tensor([list(lab) + [chat.IGNORE] * (T - len(lab)) for lab in labels])  # (B, T)
    batch["pixel_values"] = images
    return batch


def single_turns(conversation) -> list[list[dict]]:
    """A conversation -> one chat per exchange, each opening with the image: [[human, gpt], ...]. Packed
    (`pack_chats`), each is answered from the image and its own question, never from the turns before."""
    out = []
    for i in range(0, len(conversation) - 1, 2):
        user, reply = conversation[i], conversation[i + 1]
        text = user["value"].replace(chat.IMAGE + "\n", "").replace(chat.IMAGE, "")
        out.append([{"from": "human", "value": chat.IMAGE + "\n" + text}, {"from": "gpt", "value": reply["value"]}])
    return out


def pack_chats(processor, images, chats: list[list[list[dict]]]) -> dict:
    """Packing: row b = image b's shared prefix (<|bos|><|user|> and its image tokens) once, then each of
    chats[b] (single-exchange chats that open with the image, `single_turns`) after it as a segment that
    reads the prefix and itself only, positions restarting after the prefix: every segment is scored
    exactly as if it were its own sequence (tests/test_mllm.py checks it), for one prefix instead of
    one per question. The last segments of a row are dropped until it fits the context.

    -> input_ids, attention_mask, labels, segment_ids (-1 prefix, 0.. segments, -2 pad), position_ids
    (B, T) right-padded, and pixel_values."""
    if len(chats) == 0 or len(chats) != len(images):
        raise ValueError(f"pack_chats needs one list of chats per image, got {len(chats)} lists for {len(images)} images")
    rows = []
    for b, row_chats in enumerate(chats):
        if not row_chats:
            raise ValueError(f"pack_chats: image {b} has no chat to pack")
        encoded = [processor.encode_conversation(c) for c in row_chats]
        first = encoded[0][0]
        P = max(i for i, t in enumerate(first) if t == processor.image_token_id) + 1  # the prefix: up to the last image token
        ids, labels, seg, pos = list(first[:P]), [chat.IGNORE] * P, [-1] * P, list(range(P))
        for k, (e_ids, e_labels) in enumerate(encoded):
            if e_ids[:P] != first[:P]:
                raise ValueError(f"pack_chats: image {b}'s chats do not share one prefix (each must open with the image)")
            body, body_labels = e_ids[P:], e_labels[P:]
            if body_labels and body_labels[0] != chat.IGNORE:  # the token before it is another segment's
                raise ValueError("pack_chats: a segment must open with the user's text, not the assistant's")
            if len(ids) + len(body) > processor.context_length:
                if k == 0:
                    raise ValueError(f"pack_chats: image {b}'s first chat alone exceeds the context")
                break
            ids += body
            labels += body_labels
            seg += [k] * len(body)
            pos += range(P, P + len(body))
        rows.append((ids, labels, seg, pos))
    T = max(len(r[0]) for r in rows)
    B = len(rows)
    out = {"input_ids": torch.full((B, T), processor.pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((B, T), dtype=torch.long),
           "labels": torch.full((B, T), chat.IGNORE, dtype=torch.long),
           "segment_ids": torch.full((B, T), -2, dtype=torch.long),
           "position_ids": torch.zeros((B, T), dtype=torch.long)}
    for b, (ids, labels, seg, pos) in enumerate(rows):
        n = len(ids)
        out["input_ids"][b, :n] = torch.tensor(ids)
        out["attention_mask"][b, :n] = 1
        out["labels"][b, :n] = torch.tensor(labels)
        out["segment_ids"][b, :n] = torch.tensor(seg)
        out["position_ids"][b, :n] = torch.tensor(pos)
    out["pixel_values"] = images
    return out


def max_objects_at(step: int, ramp_steps: int, world) -> int:
    """The curriculum: at most 1 object per scene at step 0, growing linearly to the world's maximum
    at `ramp_steps` (0 = no curriculum). One object first: "what color is the circle?" is then read
    off the picture without knowing *which* object is meant; binding words to places comes after."""
    lo, hi = world.config.min_objects, world.config.max_objects
    if ramp_steps <= 0:
        return hi
    return min(hi, lo + int((hi - lo + 1) * step / ramp_steps))


def world_batches(world, processor, batch_size: int, stage: int, seed: int = 0, n_questions: int = 4,
                  world_turns: float = 0.5, ramp_steps: int = 0, pack: bool = False, region_grid: int = 0):
    """get_batch(step) for stage 1 (captions) or 2 (conversations): fresh train scenes every step,
    a pure function of (seed, stage, step). In stage 2 a share `world_turns` of the chats carries
    the world's describe/locate turns; the rest are questions only (shorter, more of them).
    ramp_steps > 0: the object-count curriculum of `max_objects_at`. pack=True (stage 2): each
    scene's exchanges as separate chats packed behind one image (`pack_chats`), so that no answer can
    be read off an earlier turn's text (in one multi-turn chat, "is there a red circle?" after "describe
    the image" is answered from the description, and the model learns to look less); `world_turns` is
    then the share of *batches* whose rows carry the world's turns, so that the rows of a batch have
    similar lengths (a batch is padded to its longest row). region_grid > 0 adds
    patch_labels (B, grid^2, 3): the colour, shape and size under each image token's patch block
    (`minivl.world.patch_labels`, row-major as the tokens are), for MLLMConfig.patch_classes."""
    attributes = region_attributes(world)
    def get_batch(step: int) -> dict:
        rng = np.random.default_rng([seed, stage, step])
        first = (seed * 3 + stage) * 2**40 + step * batch_size  # as recipes.stream_indices: fresh scenes
        top, lo = max_objects_at(step, ramp_steps, world), world.config.min_objects
        scenes = [world.scene(i, "train", None if top == world.config.max_objects else int(rng.integers(lo, top + 1)))
                  for i in range(first, first + batch_size)]
        if stage == 1:
            convs = [caption_chat(world, s, rng) for s in scenes]
        else:
            if pack:  # the whole batch carries the world's turns or none does: a batch is padded to its longest
                turns = [bool(rng.random() < world_turns)] * len(scenes)  # row, and a describe turn is ~40 tokens
            else:
                turns = [bool(rng.random() < world_turns) for _ in scenes]
            convs = [question_chat(world, s, rng, n_questions, t) for s, t in zip(scenes, turns)]
        images = image_to_tensor(np.stack([s.image for s in scenes]))  # (B, 3, S, S)
        if pack and stage == 2:
            batch = pack_chats(processor, images, [single_turns(c) for c in convs])
        else:
            batch = collate_chats(processor, images, convs)
        if region_grid:
            batch["patch_labels"] = torch.from_numpy(np.stack([
                patch_labels(s.objects, world.config.image_size, region_grid, attributes) for s in scenes]))  # (B, N, 3)
        return batch
    return get_batch


def load_llava_json(path, image_folder=None) -> list[dict]:
    """A LLaVA-format JSON file -> [{"image": Path, "conversations": [...]}] with every image path
    resolved (relative to `image_folder`, default: the JSON's folder) and checked to exist."""
    path = Path(path)
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{'image', 'conversations'}} records, got "
                         f"{type(records).__name__}")
    folder = Path(image_folder) if image_folder is not None else path.parent
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "conversations" not in r or "image" not in r:
            raise ValueError(f"{path} record {i}: expected keys 'image' and 'conversations', got "
                             f"{sorted(r) if isinstance(r, dict) else type(r).__name__}")
        chat.check_messages(r["conversations"])  # unknown roles fail here, naming the record's turn
        image = folder / r["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{path} record {i}: image {image} does not exist")
        out.append({"image": image, "conversations": r["conversations"]})
    return out


def read_image(path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3): .npy arrays always, PNG/JPEG through Pillow or matplotlib."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path)
    try:
        from PIL import Image
        return np.asarray(Image.open(path).convert("RGB"))
    except ImportError:
        import matplotlib.image as mpimg
        img = mpimg.imread(path)
        return (img[..., :3] * 255).round().astype(np.uint8) if img.dtype != np.uint8 else img[..., :3]


def write_llava_folder(world, folder, n: int, split: str = "train") -> Path:
    """Write n Shapes World scenes as a LLaVA-format dataset: folder/images/*.png + folder/data.json."""
    import matplotlib.image as mpimg
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        s = world.scene(i, split)
        name = f"images/{split}_{i:06d}.png"
        mpimg.imsave(folder / name, s.image)
        records.append({"id": f"{split}-{i}", "image": name, "conversations": world.conversation(s)})
    (folder / "data.json").write_text(json.dumps(records, indent=1))
    return folder / "data.json"


def folder_batches(records: list[dict], processor, batch_size: int, seed: int = 0):
    """get_batch(step) over LLaVA-format records (shuffled per epoch, a pure function of (seed, step))."""
    preprocess = processor.image_processor
    n = len(records)

    def get_batch(step: int) -> dict:
        first = step * batch_size
        idx = []
        for k in range(first, first + batch_size):
            epoch, j = divmod(k, n)
            idx.append(int(np.random.default_rng([seed, epoch]).permutation(n)[j]))
        images = torch.stack([preprocess(read_image(records[i]["image"])) for i in idx])  # (B, 3, S, S)
        return collate_chats(processor, images, [records[i]["conversations"] for i in idx])
    return get_batch


__all__ = ["max_objects_at", "caption_chat", "question_chat", "single_turns", "pack_chats", "fit_conversation",
           "collate_chats", "world_batches", "load_llava_json", "read_image",
           "write_llava_folder", "folder_batches"]
