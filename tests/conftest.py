"""Shared test setup: a headless matplotlib, and checkpoints/run folders kept out of the repo."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    """Anything a test trains or saves through minivl.data_dir() lands in a temp folder."""
    monkeypatch.setenv("MINIVL_DATA", str(tmp_path / "data"))
    yield
