"""torch Datasets for every Shapes World task, a collate that stacks images and pads text, and
the world tokenizer.

Each Dataset is `(world, split, length)`: item i is scene i of that split, made on the fly, so
a DataLoader worker on any machine builds exactly the same sample (nothing is stored, nothing
is shared between workers but the World's small config and masks).
The idea to take away: a dataset is a pure function from an index to a sample; shuffling,
batching and padding are the loader's job.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

from minivl import validate
from minivl.world import World
from minivl.world_text import NUMBERS, PLURAL, pick, rng_for


def _as_int(x, name: str) -> int:
    """Python/NumPy ints and 0-d integer tensors (what samplers yield); never bools or floats,
    which index silently (True is 1, 2.0 becomes 2)."""
    if isinstance(x, torch.Tensor) and x.ndim == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        x = x.item()
    return validate.integer(name, x)


def image_to_tensor(img) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]; batches (B, H, W, 3) -> (B, 3, H, W)."""
    if img is None or isinstance(img, (str, bytes, dict)):
        raise TypeError(f"img must be a uint8 array (H, W, 3), got {type(img).__name__}")
    try:
        img = np.asarray(img)
    except (TypeError, ValueError) as e:  # ragged nested lists
        raise TypeError(f"img must be a uint8 array (H, W, 3), got {type(img).__name__} ({e})") from None
    if img.dtype != np.uint8 or img.ndim not in (3, 4) or img.shape[-1] != 3:
        raise ValueError(f"img: expected uint8 (H, W, 3) or (B, H, W, 3), got {img.dtype} {img.shape}")
    if 0 in img.shape:
        raise ValueError(f"img must not be empty, got shape {img.shape}")
    t = torch.from_numpy(np.ascontiguousarray(img)).float().div_(127.5).sub_(1.0)  # (img/255 - 0.5)/0.5
    return t.movedim(-1, -3).contiguous()  # (..., 3, H, W)


RANGE_SLACK = 0.5  # tensor_to_image clamps values up to this far outside [-1, 1] (model outputs overshoot)


def tensor_to_image(t) -> np.ndarray:
    """Inverse of image_to_tensor: (3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3).

    Values a little outside [-1, 1] (up to RANGE_SLACK) are clamped; further out the tensor is in
    another convention ([0, 255] floats, unnormalised features) and ValueError says so, as does
    NaN, which would otherwise become an arbitrary grey level.
    """
    if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4) or t.shape[-3] != 3:
        raise ValueError(f"tensor_to_image expected a (3, H, W) or (B, 3, H, W) tensor, got "
                         f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    if not t.is_floating_point():  # a uint8 tensor is already pixels: scaling it again is wrong
        raise TypeError(f"tensor_to_image expected a floating tensor in [-1, 1], got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"tensor_to_image got an empty tensor, shape {tuple(t.shape)}")
    x = t.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("tensor_to_image got NaN or infinite values")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ValueError(f"tensor_to_image expects values in [-1, 1] (image_to_tensor's range), "
                         f"got values in [{lo:.3g}, {hi:.3g}]")
    x = (x.movedim(-3, -1) + 1.0) * 127.5
    return x.round_().clamp_(0, 255).to(torch.uint8).numpy()


class WorldDataset(Dataset):
    """Item i -> {"image": (3, H, W) float, "index": i, "text": str, ...task targets}."""

    n_objects: int | None = None  # None: the world's own range; 1 for classification

    def __init__(self, world: World, split: str = "train", length: int = 10_000):
        if not isinstance(world, World):
            raise TypeError(f"world must be a minivl.world.World, got {type(world).__name__}")
        if _as_int(length, "length") < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        length = int(length)
        world.scene(0, split, self.n_objects)  # fails now on a bad split, not inside a worker
        self.world, self.split, self.length = world, split, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        """Negative indices count from the end, as for a list; out of range is an IndexError
        (the sequence protocol: `for item in ds` stops on it)."""
        i = _as_int(i, "index")
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        i %= self.length
        scene = self.world.scene(i, self.split, self.n_objects)
        return {"image": image_to_tensor(scene.image), "index": i, **self.targets(scene)}

    def targets(self, scene) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, length={self.length}, image_size={self.world.config.image_size})"


class ClassificationDataset(WorldDataset):
    """Single-object scenes; label indexes world.classes ("red circle", ...)."""
    n_objects = 1

    def targets(self, scene) -> dict:
        return {"label": self.world.class_index(scene), "text": scene.objects[0].name}


class CaptionDataset(WorldDataset):
    """Image-text pairs: one caption drawn per item (fixed per index), all references kept for BLEU."""

    def targets(self, scene) -> dict:
        refs = self.world.captions(scene)
        return {"text": pick(rng_for(scene, 8), refs), "references": refs}


class VQADataset(WorldDataset):
    """One question per item: a question type drawn uniformly, then a question of that type,
    so rare types (closest, furthest) are not drowned by frequent ones (exists, count)."""

    def targets(self, scene) -> dict:
        qs, rng = self.world.questions(scene), rng_for(scene, 9)
        kind = pick(rng, sorted({q.type for q in qs}))
        q = pick(rng, [q for q in qs if q.type == kind])
        return {"text": q.question, "question": q.question, "answer": q.answer,
                "answer_id": self.world.answer_index(q.answer), "type": q.type}


class ReferringDataset(WorldDataset):
    """One referring expression per item (type drawn uniformly) and the pixel xyxy box it names."""

    def targets(self, scene) -> dict:
        refs, k = self.world.referring(scene), 0
        while not refs:  # rare (identical objects in a row): take another scene, deterministically
            k += 1
            scene = self.world.scene(scene.index + (k << 40), self.split)
            refs = self.world.referring(scene)
        rng = rng_for(scene, 10)
        kind = pick(rng, sorted({r.type for r in refs}))
        r = pick(rng, [r for r in refs if r.type == kind])
        out = {"text": r.text, "box": torch.tensor(r.box, dtype=torch.float32), "type": r.type}
        if k:
            out["image"] = image_to_tensor(scene.image)
        return out


class DetectionDataset(WorldDataset):
    """A Grounding-DINO prompt ("circle . red square") with every matching box and its phrase index."""

    def targets(self, scene) -> dict:
        d = pick(rng_for(scene, 11), self.world.detection(scene))
        return {"text": d.query, "phrases": list(d.phrases), "type": d.type,
                "boxes": torch.tensor(d.boxes, dtype=torch.float32).reshape(-1, 4),  # (M, 4)
                "labels": torch.tensor(d.labels, dtype=torch.long)}  # (M,)


class ConversationDataset(WorldDataset):
    """LLaVA-format turns [{"from": "human"|"gpt", "value": ...}]; "text" is a plain transcript."""

    def targets(self, scene) -> dict:
        conv = self.world.conversation(scene)
        return {"conversation": conv, "text": "\n".join(f"{t['from']}: {t['value']}" for t in conv)}


def pad_sequences(seqs, pad_id: int) -> tuple:
    """Right-pad 1-D id sequences -> (input_ids (B, T), attention_mask (B, T)), both long."""
    if not isinstance(seqs, (list, tuple)) or not seqs:
        raise ValueError(f"seqs must be a non-empty list of id sequences, got {seqs!r:.60}")
    if not 0 <= _as_int(pad_id, "pad_id") < 1 << 62:
        raise ValueError(f"pad_id must be a token id >= 0, got {pad_id}")
    seqs = [_id_sequence(s, f"input_ids[{b}]") for b, s in enumerate(seqs)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids, mask


def _id_sequence(s, name: str) -> torch.Tensor:
    """A 1-D sequence of integer token ids, as a LongTensor."""
    if isinstance(s, (str, bytes, dict)) or s is None:
        raise TypeError(f"{name} must be a list or 1-D tensor of token ids, got {type(s).__name__}")
    try:
        t = s if isinstance(s, torch.Tensor) else torch.as_tensor(s)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a list or 1-D tensor of token ids, got {type(s).__name__} ({e})") from None
    t = t.long() if t.numel() == 0 else t  # [] arrives as float32
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be a 1-D sequence of integer ids, got {t.dtype} {tuple(t.shape)}")
    return t.long()


def _check_collate_args(tokenizer, context_length, truncate) -> None:
    """Checked once per batch, or once for all of them by make_collate."""
    if tokenizer is not None and not hasattr(tokenizer, "pad_id"):
        raise TypeError(f"tokenizer must be a minivl Tokenizer (with pad_id), got {type(tokenizer).__name__}")
    if context_length is not None and _as_int(context_length, "context_length") < 1:
        raise ValueError(f"context_length must be >= 1 or None, got {context_length}")
    if not isinstance(truncate, bool):
        raise TypeError(f"truncate must be a bool, got {type(truncate).__name__}")


def collate(samples: list, tokenizer=None, context_length: int | None = None, truncate: bool = True) -> dict:
    """Stack a list of dataset items into a batch.

    Same-shape tensors are stacked ("image" -> (B, 3, H, W)), ints become a LongTensor, strings
    and ragged tensors ("boxes") stay lists. With a tokenizer, "text" becomes right-padded
    input_ids/attention_mask (B, T) (T = context_length, or the longest); items that already
    carry "input_ids" are padded with tokenizer.pad_id.
    """
    if not isinstance(samples, (list, tuple)) or not samples or not all(isinstance(s, dict) for s in samples):
        raise ValueError(f"collate expects a non-empty list of dicts (dataset items), got {samples!r:.60}")
    _check_collate_args(tokenizer, context_length, truncate)
    keys = samples[0].keys()
    for j, s in enumerate(samples):
        if s.keys() != keys:
            raise ValueError(f"item {j} has keys {sorted(s)} but item 0 has {sorted(keys)}")
    batch = {}
    for k in keys:
        vals = [s[k] for s in samples]
        if k == "input_ids":
            if tokenizer is None:
                raise ValueError("items carry 'input_ids': pass the tokenizer so collate knows pad_id")
            batch["input_ids"], batch["attention_mask"] = pad_sequences(vals, tokenizer.pad_id)
        elif isinstance(vals[0], torch.Tensor) and all(v.shape == vals[0].shape for v in vals):
            batch[k] = torch.stack(vals)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
            batch[k] = torch.tensor(vals, dtype=torch.long)
        else:
            batch[k] = vals
    if tokenizer is not None and "input_ids" not in keys:
        # a tokenizer with nothing to encode would silently give a batch without input_ids
        if "text" not in keys:
            raise ValueError(f"collate was given a tokenizer but the items have no 'text' (keys: {sorted(keys)})")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable to encode 'text', got {type(tokenizer).__name__}")
        for j, t in enumerate(batch["text"]):
            if not isinstance(t, str):
                raise TypeError(f"item {j}'s 'text' must be a string for the tokenizer, got {type(t).__name__}")
        enc = tokenizer(batch["text"], context_length=context_length, truncate=truncate)
        batch["input_ids"], batch["attention_mask"] = enc["input_ids"], enc["attention_mask"]  # (B, T)
    return batch


def make_collate(tokenizer=None, context_length: int | None = None, truncate: bool = True):
    """A picklable collate_fn for DataLoader(num_workers > 0); the arguments are checked now,
    not in the first batch of a worker."""
    _check_collate_args(tokenizer, context_length, truncate)
    return functools.partial(collate, tokenizer=tokenizer, context_length=context_length, truncate=truncate)


def world_corpus(world: World | None = None, n_scenes: int = 400) -> list:
    """Deterministic training text: every vocabulary word, then all text of the first train scenes
    (never held-out pairs: the tokenizer must not have seen them together either)."""
    world = _world_or_default(world)
    if _as_int(n_scenes, "n_scenes") < 0:
        raise ValueError(f"n_scenes must be >= 0, got {n_scenes}")
    cfg = world.config
    words = [" ".join(cfg.colors), " ".join(cfg.shapes), " ".join(PLURAL[s] for s in cfg.shapes),
             " ".join(NUMBERS), " ".join(world.answers)]
    return words + [t for i in range(n_scenes) for t in world.texts(world.scene(i, "train"))]


def _world_or_default(world) -> World:
    if world is None:
        return World()
    if not isinstance(world, World):
        raise TypeError(f"world must be a minivl.world.World or None, got {type(world).__name__}")
    return world


_TOKENIZERS: dict = {}


def world_tokenizer(vocab_size: int = 512, world: World | None = None):
    """A byte-level BPE tokenizer trained on Shapes World text (deterministic, cached in-process)."""
    from minivl.tokenizer import Tokenizer  # lazily: the tokenizer is a floor of its own
    n_min = 256 + len(Tokenizer.SPECIAL_TOKENS)  # checked before the (slow) corpus is built
    if _as_int(vocab_size, "vocab_size") < n_min:
        raise ValueError(f"vocab_size must be >= {n_min} (256 bytes + special tokens), got {vocab_size}")
    vocab_size = int(vocab_size)
    world = _world_or_default(world)
    key = (vocab_size, repr(world.config))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer.train(world_corpus(world), vocab_size)
    return _TOKENIZERS[key]


__all__ = ["image_to_tensor", "tensor_to_image", "WorldDataset", "ClassificationDataset", "CaptionDataset",
           "VQADataset", "ReferringDataset", "DetectionDataset", "ConversationDataset", "collate",
           "make_collate", "pad_sequences", "world_corpus", "world_tokenizer"]
