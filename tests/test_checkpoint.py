"""Checkpoints: config + safetensors round trip, tied weights, named mismatches, atomic writes."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import minivl.checkpoint as ckpt
from minivl.checkpoint import Checkpointable, config_from_dict, load_model, load_state, load_state_dict_checked, \
    save_model, save_state


@dataclass
class PartConfig:
    width: int = 8  # hidden width
    sizes: tuple[int, int] = (2, 3)  # a tuple field: JSON turns it into a list


@dataclass
class CkptTinyConfig:
    vocab: int = 11  # token ids
    part: PartConfig = field(default_factory=PartConfig)  # nested config, like CLIP's vision/text
    tie: bool = True  # share the embedding with the output layer
    note: str | None = None  # an optional field


class CkptTiny(Checkpointable, nn.Module):
    config_class = CkptTinyConfig

    def __init__(self, config: CkptTinyConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab, config.part.width)
        self.norm = nn.LayerNorm(config.part.width)
        self.head = nn.Linear(config.part.width, config.vocab, bias=False)
        if config.tie:
            self.head.weight = self.emb.weight


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return CkptTiny(CkptTinyConfig(**kw))


def test_save_load_round_trip_rebuilds_nested_config_and_weights(tmp_path):
    m = _model(part=PartConfig(width=6, sizes=(4, 5)), note="hi")
    with torch.no_grad():
        m.norm.weight.uniform_()
    m.save(tmp_path / "m")
    for loaded in (CkptTiny.load(tmp_path / "m"), load_model(tmp_path / "m")):  # explicit cls and registry
        assert isinstance(loaded, CkptTiny)
        assert loaded.config == m.config and isinstance(loaded.config.part, PartConfig)
        assert loaded.config.part.sizes == (4, 5)
        for (k, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), k


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    m = _model(tie=True)
    save_model(m, tmp_path / "m")
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert sorted(stored) == ["emb.weight", "norm.bias", "norm.weight"]
    loaded = CkptTiny.load(tmp_path / "m")
    assert loaded.head.weight is loaded.emb.weight
    assert torch.equal(loaded.head.weight, m.head.weight)
    full = _model(seed=3).state_dict()  # both names of the tied pair, as nn.Module gives them
    load_state_dict_checked(loaded, full)
    assert torch.equal(loaded.emb.weight, full["emb.weight"]) and loaded.head.weight is loaded.emb.weight
    only_alias = {k: v for k, v in _model(seed=4).state_dict().items() if k != "emb.weight"}
    load_state_dict_checked(loaded, only_alias)  # stored under the other name of the pair
    assert torch.equal(loaded.emb.weight, only_alias["head.weight"])
    untied = _model(tie=False)
    save_model(untied, tmp_path / "u")
    assert "head.weight" in load_file(str(tmp_path / "u" / "model.safetensors"))


def test_mismatch_names_missing_unexpected_and_both_shapes():
    m = _model(tie=False)
    sd = m.state_dict()
    sd.pop("norm.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["emb.weight"] = torch.zeros(5, 8)
    with pytest.raises(ValueError) as err:
        load_state_dict_checked(m, sd)
    msg = str(err.value)
    assert "missing from checkpoint (1): norm.bias" in msg
    assert "unexpected in checkpoint (1): extra.weight" in msg
    assert "emb.weight: checkpoint (5, 8) vs model (11, 8)" in msg


def test_loading_into_another_config_says_which_tensors_differ(tmp_path):
    save_model(_model(part=PartConfig(width=8)), tmp_path / "m")
    other = _model(part=PartConfig(width=4))
    with pytest.raises(ValueError, match=r"norm.weight: checkpoint \(8,\) vs model \(4,\)"):
        load_state_dict_checked(other, load_file(str(tmp_path / "m" / "model.safetensors")))
    with pytest.raises(ValueError, match="missing from checkpoint.*head.weight"):
        load_state_dict_checked(_model(tie=False), load_file(str(tmp_path / "m" / "model.safetensors")))


def test_failed_save_leaves_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    old = _model(seed=1)
    save_model(old, tmp_path / "m")

    def broken_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    with monkeypatch.context() as mp, pytest.raises(OSError, match="disk full"):
        mp.setattr(ckpt, "save_file", broken_writer)
        save_model(_model(seed=2), tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(CkptTiny.load(tmp_path / "m").emb.weight, old.emb.weight)
    new = _model(seed=2)
    save_model(new, tmp_path / "m")  # and a good save does replace it
    assert torch.equal(CkptTiny.load(tmp_path / "m").emb.weight, new.emb.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_config_from_dict_rejects_unknown_keys_and_types():
    cfg = config_from_dict(CkptTinyConfig, {"vocab": 3, "part": {"width": 2, "sizes": [1, 1]}})
    assert cfg == CkptTinyConfig(vocab=3, part=PartConfig(2, (1, 1)))
    with pytest.raises(ValueError, match=r"PartConfig has no field\(s\) \['depth'\]"):
        config_from_dict(CkptTinyConfig, {"part": {"depth": 2}})
    with pytest.raises(TypeError):
        config_from_dict(dict, {})


def test_load_model_checks_class_and_folder(tmp_path):
    save_model(_model(), tmp_path / "m")

    class Other(nn.Module):
        config_class = CkptTinyConfig

    with pytest.raises(ValueError, match="holds a 'CkptTiny', not a 'Other'"):
        load_model(tmp_path / "m", cls=Other)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="self.config"):
        save_model(nn.Linear(2, 2), tmp_path / "x")


def test_state_round_trip_keeps_int_keys_tuples_and_tensors(tmp_path):
    state = {"opt": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 2)}}, "betas": (0.9, 0.95),
             "rng": (3, (1, 2), None), "list": [1, "a", True, 0.5]}
    save_state(tmp_path, "s", state)
    back = load_state(tmp_path, "s")
    assert back["betas"] == (0.9, 0.95) and back["rng"] == (3, (1, 2), None) and back["list"] == [1, "a", True, 0.5]
    assert list(back["opt"]) == [0] and torch.equal(back["opt"][0]["m"], state["opt"][0]["m"])
    with pytest.raises(TypeError, match="without pickle"):
        save_state(tmp_path, "bad", {"x": object()})


def test_two_classes_with_one_name_cannot_share_the_registry():
    """A second, different `CkptTiny` would make every CkptTiny checkpoint load as the wrong class."""
    with pytest.raises(ValueError, match="checkpoint name 'CkptTiny' is taken"):
        type("CkptTiny", (Checkpointable, nn.Module), {"config_class": CkptTinyConfig, "__module__": "elsewhere"})
    assert ckpt.MODELS["CkptTiny"] is CkptTiny
    # the same class defined again at the same place (a notebook cell run twice) replaces the old one
    again = type("CkptTiny", (Checkpointable, nn.Module), {"config_class": CkptTinyConfig, "__module__": __name__,
                                                            "__qualname__": "CkptTiny"})
    assert ckpt.MODELS["CkptTiny"] is again
    ckpt.MODELS["CkptTiny"] = CkptTiny
    # a checkpoint_name lets two classes that share a class name live side by side
    other = type("CkptTiny", (Checkpointable, nn.Module), {"config_class": CkptTinyConfig, "__module__": "elsewhere",
                                                            "checkpoint_name": "OtherTiny"})
    assert ckpt.MODELS["OtherTiny"] is other and ckpt.MODELS["CkptTiny"] is CkptTiny
    del ckpt.MODELS["OtherTiny"]


def test_tokenizer_is_saved_with_the_weights_and_attached_on_load(tmp_path):
    from minivl.tokenizer import Tokenizer
    tok = Tokenizer.train(["a red circle", "a blue square"] * 5, vocab_size=256 + len(Tokenizer.SPECIAL_TOKENS) + 4)
    model = CkptTiny(CkptTinyConfig())
    model.save(tmp_path / "m", tokenizer=tok)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    back = load_model(tmp_path / "m")
    assert back.tokenizer.encode("a red circle") == tok.encode("a red circle")
    back.save(tmp_path / "again")  # a loaded model carries its tokenizer on to the next save
    assert load_model(tmp_path / "again").tokenizer.merges == tok.merges
    assert not hasattr(load_model(_saved(tmp_path / "plain")), "tokenizer")
    with pytest.raises(TypeError, match="tokenizer must have a save"):
        model.save(tmp_path / "bad", tokenizer="not a tokenizer")


def _saved(path):
    save_model(CkptTiny(CkptTinyConfig()), path)
    return path
