"""Shared test setup: a headless matplotlib, checkpoints/run folders kept out of the repo, and (in CI)
no test allowed to skip."""
import os

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per
    process oversubscribe the cores (measured: 36 s vs 8 s for test_lm.py). A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored after it."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    """Anything a test trains or saves through minivl.data_dir() lands in a temp folder."""
    monkeypatch.setenv("MINIVL_DATA", str(tmp_path / "data"))
    yield


def pytest_sessionfinish(session, exitstatus):
    """With MINIVL_NO_SKIP=1 (.ci/run sets it) a skipped test fails the run: after the README's
    install every test must run, the parity tests against the reference implementations above all."""
    if os.environ.get("MINIVL_NO_SKIP") != "1" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.ensure_newline()
        reporter.write_line(f"MINIVL_NO_SKIP=1: {len(skipped)} test(s) skipped; the install is incomplete", red=True)
        session.exitstatus = 1
