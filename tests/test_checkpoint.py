"""Checkpoints: config + safetensors round trip, tied weights, named mismatches, atomic writes that never
delete the user's files, recovery after a kill mid-save, and clear errors for damaged checkpoints."""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import minivl.checkpoint as ckpt
from minivl.checkpoint import (
    Checkpointable,
    config_from_dict,
    load_model,
    load_state,
    load_state_dict_checked,
    save_model,
    save_state,
)


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


# ---------------------------------------------------------------- nothing lost: whose folder is it
def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_saving_over_a_folder_of_the_users_files_is_refused_and_keeps_them(tmp_path):
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "paper.pdf").write_bytes(b"%PDF-1.7 months of work")
    (user / "notes.txt").write_text("do not lose me")
    before = _tree(user)
    for save in (lambda: _model().save(user), lambda: save_model(_model(), user)):
        with pytest.raises(ValueError, match=r"refusing to save a checkpoint to .*thesis.*notes.txt, paper.pdf.*"
                                             r"new or empty folder"):
            save()
    with pytest.raises(ValueError, match="files minivl did not write"), ckpt.atomic_dir(user) as tmp:
        (tmp / "config.json").write_text("{}")
    assert _tree(user) == before and [p.name for p in tmp_path.iterdir()] == ["thesis"]  # no temporaries either
    # a real checkpoint that the user dropped a file into is theirs too
    save_model(_model(), tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes.txt"):
        save_model(_model(seed=1), tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_only_empty_folders_and_minivl_checkpoints_are_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    save_model(_model(), tmp_path / "empty")  # an empty folder is fine
    save_model(_model(seed=1), tmp_path / "empty")  # and so is a minivl checkpoint
    assert torch.equal(load_model(tmp_path / "empty").emb.weight, _model(seed=1).emb.weight)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert"}')  # someone else's config.json
    with pytest.raises(ValueError, match="not a minivl checkpoint"):
        save_model(_model(), foreign)
    assert (foreign / "config.json").read_text() == '{"model_type": "bert"}'
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_model(_model(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_trainer_checkpoint_folder_can_be_written_again(tmp_path):
    """run_dir/checkpoint holds train state and history too: all of it is minivl's to replace."""
    for step in (1, 2):
        with ckpt.atomic_dir(tmp_path / "checkpoint") as tmp:
            ckpt.write_model_files(_model(seed=step), tmp)
            save_state(tmp, "train_state", {"step": step})
            ckpt.write_json(tmp / "history.json", {"train": []})
    assert load_state(tmp_path / "checkpoint", "train_state")["step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == sorted(ckpt.CHECKPOINT_FILES - {"tokenizer.json"})


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_folders_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_model(_model(), tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "m" / "config.json").stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------- a kill mid-save
def _weights_of(path):
    return CkptTiny.load(path).emb.weight


def test_load_recovers_a_checkpoint_killed_between_the_two_renames(tmp_path):
    """What a SIGKILL after `path -> .NAME.old-*` leaves: no `path`, the old and the new folder beside it."""
    old, new = _model(seed=1), _model(seed=2)
    save_model(old, tmp_path / "m")
    save_model(new, tmp_path / "n")
    os.rename(tmp_path / "m", tmp_path / ".m.old-0000aaaa")
    os.rename(tmp_path / "n", tmp_path / ".m.new-0000bbbb")
    assert torch.equal(_weights_of(tmp_path / "m"), new.emb.weight)  # the newer whole version wins
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.old-0000aaaa", "m"]
    save_model(old, tmp_path / "m")  # the next save removes what the kill left
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    os.rename(tmp_path / "m", tmp_path / ".m.old-0000cccc")  # only the old copy: that one comes back
    assert torch.equal(load_model(tmp_path / "m").emb.weight, old.emb.weight)
    os.rename(tmp_path / "m", tmp_path / ".m.old-0000dddd")  # and a save brings it back before replacing it
    save_model(new, tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and torch.equal(_weights_of(tmp_path / "m"), new.emb.weight)


def test_a_half_written_temp_folder_is_never_loaded(tmp_path):
    save_model(_model(seed=1), tmp_path / "n")
    os.rename(tmp_path / "n", tmp_path / ".m.tmp-0000aaaa")  # looks whole, but was never marked finished
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "m")


def test_stale_temporaries_are_cleaned_at_the_next_save_and_nothing_else(tmp_path):
    save_model(_model(), tmp_path / "m")
    ours = [".m.tmp-deadbeef", ".m.old-0123abcd", ".m.new-0123abce", ".m.tmp-ab_cd9xz"]  # uuid and mkdtemp names
    theirs = [".m.tmp-keep", ".m.old-backup-2024", ".m.notes", ".other.tmp-deadbeef", ".m.tmp-deadbeef.bak", "m2"]
    for name in ours + theirs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "big.bin").write_bytes(b"0" * 1000)
    (tmp_path / ".m.old-file1234").write_text("a file, not one of our folders")
    theirs.append(".m.old-file1234")
    save_model(_model(seed=1), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs + ["m"])
    assert all((tmp_path / n / "big.bin").is_file() for n in theirs if n != ".m.old-file1234")
    # write_json's temp files a kill left behind, the same way
    (tmp_path / ".metrics.json.tmp-deadbeef").write_text("{half")
    (tmp_path / ".metrics.json.tmp-keepme").write_text("not ours")
    ckpt.write_json(tmp_path / "metrics.json", {"a": 1})
    assert not (tmp_path / ".metrics.json.tmp-deadbeef").exists() and (tmp_path / ".metrics.json.tmp-keepme").exists()


# ---------------------------------------------------------------- loading fails clearly
def _exactly(exc_type, match):
    """pytest.raises that also refuses subclasses: JSONDecodeError is a ValueError, but not a clear one."""
    class Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc_type, match=match)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.cm.__exit__(*exc)
            assert type(self.info.value) is exc_type, f"{type(self.info.value).__name__}: {self.info.value}"
            return out
    return Ctx()


def test_truncated_or_corrupt_weights_name_the_file(tmp_path):
    path = _saved(tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b"\x00" * 64, b""):
        weights.write_bytes(broken)
        with _exactly(ValueError, r"model.safetensors is truncated or corrupt"):
            load_model(path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors in"):
        load_model(path)


def test_broken_or_foreign_config_names_the_file_and_the_problem(tmp_path):
    path = _saved(tmp_path / "m")
    cfg = path / "config.json"
    good = json.loads(cfg.read_text())
    cases = [("{not json", ValueError, r"config.json is not valid JSON"),
             ("[1, 2]", ValueError, r"config.json is not a minivl model config"),
             (json.dumps({"config": good["config"]}), ValueError, r"config.json is not a minivl model config"),
             (json.dumps({**good, "class": "BertModel"}), ValueError, r"config.json.*'BertModel', which is not registered"),
             (json.dumps({**good, "config": {**good["config"], "vocab": "11"}}), TypeError,
              r"config.json: CkptTinyConfig.vocab expects int, got str '11'"),
             (json.dumps({**good, "config": {**good["config"], "part": {"width": 2.5, "sizes": [2, 3]}}}), TypeError,
              r"CkptTinyConfig.part.width expects int, got float 2.5"),
             (json.dumps({**good, "config": {**good["config"], "tie": 1}}), TypeError, r"\.tie expects bool"),
             (json.dumps({**good, "config": {**good["config"], "vocab": -3}}), ValueError, r"cannot build a CkptTiny")]
    for text, exc, match in cases:
        cfg.write_text(text)
        with _exactly(exc, match):
            load_model(path)
    cfg.write_bytes(b"\xff\xfe\x00garbage")
    with _exactly(ValueError, "not valid JSON"):
        load_model(path)


def test_config_from_dict_checks_every_field_against_its_annotation():
    ok = config_from_dict(CkptTinyConfig, {"vocab": 3, "note": None, "part": {"width": 2, "sizes": [1, 2]}})
    assert ok.note is None and ok.part.sizes == (1, 2)
    for bad, match in [({"note": 3}, r"CkptTinyConfig.note expects str, got int 3"),
                       ({"part": {"sizes": [1, 2, 3]}}, r"CkptTinyConfig.part.sizes expects 2 items, got 3"),
                       ({"part": {"sizes": [1, "x"]}}, r"part.sizes\[1\] expects int"),
                       ({"part": 4}, r"CkptTinyConfig.part expects a PartConfig"),
                       ({"vocab": True}, r"vocab expects int, got bool")]:
        with _exactly(TypeError, match):
            config_from_dict(CkptTinyConfig, bad)


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path):
    m = _model()
    with torch.no_grad():
        m.norm.weight[0] = float("nan")
        m.norm.bias[1] = float("inf")
    save_model(m, tmp_path / "m")
    with _exactly(ValueError, r"non-finite \(NaN/inf\) values in 2 tensor\(s\): norm.bias, norm.weight"):
        load_model(tmp_path / "m")


def test_damaged_train_state_names_the_file(tmp_path):
    save_state(tmp_path, "s", {"x": torch.ones(2)})
    (tmp_path / "s.json").write_text('{"x": ')
    with _exactly(ValueError, r"s.json is not valid JSON"):
        load_state(tmp_path, "s")
    (tmp_path / "s.json").write_text('{"__tensor__": "7"}')
    with _exactly(ValueError, r"s.json is not a minivl state file"):
        load_state(tmp_path, "s")
    (tmp_path / "s.safetensors").write_bytes(b"12345678")
    with _exactly(ValueError, r"s.safetensors is truncated or corrupt"):
        load_state(tmp_path, "s")


# ---------------------------------------------------------------- tokenizer and model must agree
@dataclass
class VocabTextConfig:
    vocab_size: int = 270  # nested like CLIP's config.text.vocab_size
    width: int = 4  # embedding width


@dataclass
class VocabTinyConfig:
    text: VocabTextConfig = field(default_factory=VocabTextConfig)  # the text tower's config


class VocabTiny(Checkpointable, nn.Module):
    config_class = VocabTinyConfig

    def __init__(self, config: VocabTinyConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.text.vocab_size, config.text.width)


def test_a_tokenizer_that_does_not_fit_the_vocabulary_is_refused_on_save_and_load(tmp_path):
    from minivl.tokenizer import Tokenizer
    n_min = 256 + len(Tokenizer.SPECIAL_TOKENS)
    fits = Tokenizer.train(["a red circle", "a blue square"] * 5, vocab_size=n_min + 4)
    other = Tokenizer.train(["a red circle", "a blue square"] * 5, vocab_size=n_min + 2)
    model = VocabTiny(VocabTinyConfig(VocabTextConfig(vocab_size=fits.vocab_size)))
    with pytest.raises(ValueError, match=rf"tokenizer has vocab_size {other.vocab_size} but the VocabTiny config "
                                         rf"has vocab_size \[{fits.vocab_size}\]"):
        model.save(tmp_path / "m", tokenizer=other)
    assert not (tmp_path / "m").exists()
    model.save(tmp_path / "m", tokenizer=fits)
    assert load_model(tmp_path / "m").tokenizer.vocab_size == fits.vocab_size
    other.save(tmp_path / "m" / "tokenizer.json")  # a tokenizer swapped in by hand
    with pytest.raises(ValueError, match=r"tokenizer.json does not belong to this checkpoint.*vocab_size"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{broken")
    with _exactly(ValueError, r"tokenizer.json is not a readable minivl tokenizer"):
        load_model(tmp_path / "m")
