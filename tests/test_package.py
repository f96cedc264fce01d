"""The helpers every notebook starts with, and the command line answering --help."""
import subprocess
import sys

import pytest
import torch

import minivl


def test_device_is_cpu_here_and_explicit_choice_is_checked():
    dev = minivl.device()
    assert dev.type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        assert dev.type != "cuda"
        with pytest.raises(ValueError, match="CUDA is not available"):
            minivl.device("cuda")
    assert minivl.device("cpu") == torch.device("cpu")


def test_seed_everything_repeats_random_draws():
    minivl.seed_everything(123)
    a = (torch.rand(3), __import__("numpy").random.rand(2), __import__("random").random())
    minivl.seed_everything(123)
    b = (torch.rand(3), __import__("numpy").random.rand(2), __import__("random").random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]
    with pytest.raises(ValueError, match="non-negative int"):
        minivl.seed_everything(-1)


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("", False), ("true", True)])
def test_fast_mode_reads_env(monkeypatch, value, expected):
    monkeypatch.setenv("MINIVL_FAST", value)
    assert minivl.fast_mode() is expected


def test_data_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIVL_DATA", str(tmp_path))
    assert minivl.data_dir() == tmp_path
    monkeypatch.delenv("MINIVL_DATA")
    assert minivl.data_dir().name == "data"


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "minivl", "--help"], capture_output=True, text=True, check=True)
    for word in ("data", "train", "bench"):
        assert word in out.stdout
