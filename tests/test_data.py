"""minivl.data: image <-> tensor, one Dataset per task, collate (padding), DataLoader workers,
and the Shapes World tokenizer."""
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from minivl import data
from minivl.world import PALETTE, World, WorldConfig

DATASETS = [data.ClassificationDataset, data.CaptionDataset, data.VQADataset, data.ReferringDataset,
            data.DetectionDataset, data.ConversationDataset]


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(image_size=32))


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("minivl.tokenizer")
    return data.world_tokenizer(400)


def test_image_tensor_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    t = data.image_to_tensor(img)
    assert t.dtype == torch.float32 and t.shape == (2, 3, 8, 6)
    assert t.min() >= -1 and t.max() <= 1
    assert abs(t[1, 2, 3, 4].item() - (img[1, 3, 4, 2] / 255 - 0.5) / 0.5) < 1e-6
    assert np.array_equal(data.tensor_to_image(t), img)
    assert np.array_equal(data.tensor_to_image(data.image_to_tensor(img[0])), img[0])
    with pytest.raises(ValueError, match="uint8"):
        data.image_to_tensor(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        data.tensor_to_image(torch.zeros(4, 5, 5))


@pytest.mark.parametrize("cls", DATASETS, ids=lambda c: c.__name__)
def test_dataset_items_and_batches(cls, world, tok):
    ds = cls(world, "train", 16)
    assert len(ds) == 16
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert isinstance(item["text"], str) and item["text"]
    assert torch.equal(ds[3]["image"], item["image"]) and ds[3]["text"] == item["text"]  # deterministic
    T = 24 if cls is data.ClassificationDataset else None  # fixed length, or the longest text
    batch = data.collate([ds[i] for i in range(5)], tokenizer=tok, context_length=T)
    assert batch["image"].shape == (5, 3, 32, 32)
    T = T or max(len(tok.encode(t)) + 2 for t in batch["text"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, T)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    lengths = batch["attention_mask"].sum(1)
    for b in range(5):  # bos first, eos last real token, pad after; decodes back to the text
        ids = batch["input_ids"][b]
        assert ids[0] == tok.bos_id and ids[lengths[b] - 1] == tok.eos_id
        assert (ids[lengths[b]:] == tok.pad_id).all() and (batch["attention_mask"][b, :lengths[b]] == 1).all()
        assert tok.decode(ids.tolist()) == batch["text"][b]
    assert batch["index"].tolist() == list(range(5))
    with pytest.raises(IndexError):
        ds[16]


def test_task_targets_match_the_scene(world):
    cls_ds = data.ClassificationDataset(world, "val", 8)
    for i in range(8):
        it = cls_ds[i]
        assert world.classes[it["label"]] == it["text"]
        color = data.image_to_tensor(np.array(PALETTE[it["text"].split()[0]], np.uint8).reshape(1, 1, 3))[:, 0, 0]
        assert (it["image"] == color[:, None, None]).all(0).any()  # the named colour is in the image
    vqa = data.VQADataset(world, "train", 40)
    items = [vqa[i] for i in range(40)]
    assert all(world.answers[it["answer_id"]] == it["answer"] for it in items)
    assert len({it["type"] for it in items}) >= 5  # types are drawn evenly, not by frequency
    ref = data.ReferringDataset(world, "train", 20)
    for i in range(20):
        it, scene = ref[i], world.scene(i, "train")
        assert tuple(it["box"].long().tolist()) in [o.box for o in scene.objects]
    det = data.collate([data.DetectionDataset(world, "train", 6)[i] for i in range(6)])
    assert isinstance(det["boxes"], list) and len(det["boxes"]) == 6
    for boxes, labels, phrases in zip(det["boxes"], det["labels"], det["phrases"]):
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.long and (labels < len(phrases)).all()
    cap = data.CaptionDataset(world, "test", 4)[2]
    assert cap["text"] in cap["references"] and cap["references"] == world.captions(world.scene(2, "test"))
    conv = data.ConversationDataset(world, "train", 2)[0]["conversation"]
    assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")


def test_collate_without_tokenizer_and_padding():
    samples = [{"input_ids": torch.tensor([5, 6, 7]), "x": 1}, {"input_ids": torch.tensor([8]), "x": 2}]

    class Pad:
        pad_id = 99
    b = data.collate(samples, tokenizer=Pad())
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["x"].dtype == torch.long
    with pytest.raises(ValueError, match="pad_id"):
        data.collate(samples)
    with pytest.raises(ValueError, match="keys"):
        data.collate([{"a": 1}, {"b": 2}])
    with pytest.raises(ValueError, match="non-empty"):
        data.collate([])


def test_dataloader_with_workers_matches_single_process(world, tok):
    ds = data.VQADataset(world, "train", 12)
    assert pickle.loads(pickle.dumps(ds)).world.config == world.config
    fn = data.make_collate(tok, context_length=32)
    one = list(DataLoader(ds, batch_size=4, collate_fn=fn))
    two = list(DataLoader(ds, batch_size=4, collate_fn=fn, num_workers=2))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert a["answer"] == b["answer"] and a["answer_id"].dtype == torch.long


def test_bad_dataset_arguments(world):
    with pytest.raises(ValueError, match="unknown split"):
        data.CaptionDataset(world, "training", 10)
    with pytest.raises(ValueError, match="length"):
        data.CaptionDataset(world, "train", 0)
    with pytest.raises(TypeError, match="World"):
        data.CaptionDataset("world", "train", 10)


def test_world_tokenizer_is_deterministic_and_never_saw_heldout_pairs(tok):
    assert tok is data.world_tokenizer(400)  # cached in-process
    corpus = data.world_corpus(n_scenes=50)
    assert corpus == data.world_corpus(n_scenes=50)
    world = World()
    for c, s in world.heldout:
        assert not any(f"{c} {s}" in t for t in corpus)
    text = "is the large red circle left of the small blue square?"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) <= 14  # world words are single tokens, not bytes


# ---- bad input where it enters: clear errors, never a silently wrong item --------------------
def test_dataset_indices_and_lengths_are_checked():
    ds = data.CaptionDataset(World(), "train", np.int64(4))
    assert len(ds) == 4 and type(ds.length) is int
    assert ds[-1]["index"] == 3 and ds[np.int64(2)]["index"] == 2 and ds[torch.tensor(1)]["index"] == 1
    with pytest.raises(TypeError, match="index must be an int"):
        ds[True]  # used to be item 1, silently
    with pytest.raises(TypeError, match="index must be an int"):
        ds[1.0]
    with pytest.raises(IndexError, match="out of range"):
        ds[-5]
    for bad, error in ((0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="length"):
            data.VQADataset(World(), "train", bad)
    with pytest.raises(TypeError, match="split must be a string"):
        data.VQADataset(World(), ["train"], 4)


class _FakeTokenizer:
    pad_id = 0

    def __call__(self, texts, context_length=None, truncate=True):
        ids = [[1] * len(t) for t in texts]
        ids, mask = data.pad_sequences(ids, self.pad_id)
        return {"input_ids": ids, "attention_mask": mask}


def test_collate_says_what_the_tokenizer_misses():
    tok = _FakeTokenizer()
    assert data.collate([{"text": "ab"}, {"text": "a"}], tok)["input_ids"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="no 'text'"):
        data.collate([{"index": 0}], tok)  # used to return a batch without input_ids
    with pytest.raises(TypeError, match="item 1's 'text' must be a string"):
        data.collate([{"text": "a"}, {"text": 3}], tok)
    with pytest.raises(TypeError, match="tokenizer"):
        data.collate([{"text": "a"}], tokenizer="gpt2")
    with pytest.raises(ValueError, match="non-empty list"):
        data.collate({"text": "a"})
    with pytest.raises(ValueError, match="context_length"):
        data.make_collate(tok, context_length=0)
    with pytest.raises(TypeError, match="truncate"):
        data.make_collate(tok, truncate="yes")
    with pytest.raises(ValueError, match="non-empty list"):
        data.pad_sequences([], 0)
    with pytest.raises(TypeError, match=r"input_ids\[1\]"):
        data.pad_sequences([[1], [0.5]], 0)


def test_image_conversions_reject_wrong_dtype_shape_range_and_nan():
    with pytest.raises(ValueError, match="uint8"):
        data.image_to_tensor(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        data.image_to_tensor(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="img"):
        data.image_to_tensor(None)
    with pytest.raises(ValueError, match="NaN"):
        data.tensor_to_image(torch.full((3, 4, 4), float("nan")))  # used to give grey level 0
    with pytest.raises(TypeError, match="floating"):
        data.tensor_to_image(torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        data.tensor_to_image(torch.full((3, 4, 4), 255.0))  # a [0, 255] image, not ours
    assert (data.tensor_to_image(torch.full((3, 2, 2), 1.2)) == 255).all()  # small overshoot clamps
