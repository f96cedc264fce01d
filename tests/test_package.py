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


# ---------------------------------------------------------------- the house rules, checked on the source
FAMILIES = ("clip", "captioner", "vqa", "grounding", "mllm")
TOP_FLOOR = ("recipes", "bench", "viz", "train", "__main__")  # may import anything below them


def _import_graph() -> dict[str, set[str]]:
    """minivl module -> the minivl modules it imports, at the top or inside functions (read with ast)."""
    import ast
    from pathlib import Path
    root = Path(minivl.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d.startswith("minivl.")}
    modules = set(graph)
    return {m: {d for d in deps if d in modules and d != m} for m, deps in graph.items()}


def _area(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_library_code_never_imports_recipes_bench_or_viz():
    bad = [(m, d) for m, deps in _import_graph().items() if _area(m) not in TOP_FLOOR
           for d in deps if _area(d) in ("recipes", "bench", "viz")]
    assert not bad, f"library modules importing the top floor: {bad}"


def test_families_import_building_blocks_and_clip_but_not_each_other():
    bad = [(m, d) for m, deps in _import_graph().items() if _area(m) in FAMILIES
           for d in deps if _area(d) in FAMILIES and _area(d) not in (_area(m), "clip")]
    assert not bad, f"families importing each other: {bad}"
    assert not any(_area(d) in FAMILIES for m, deps in _import_graph().items()
                   if _area(m) in ("world", "world_text", "tokenizer", "transformer", "vit", "text", "lm",
                                   "generation", "data", "metrics", "checkpoint") for d in deps)


def test_no_import_cycles():
    graph = _import_graph()
    # a module importing its own package's __init__ (for a re-export) is not a cycle of floors
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, f"import cycles: {cycle[:3]}"


# ---------------------------------------------------------------- CLI: bad input is one line, exit 2
def test_cli_bad_input_is_one_error_line_and_exit_2_not_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minivl", "train", "clip", "--steps", "-1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "steps" in lines[0], out.stderr


@pytest.mark.parametrize("argv, word", [
    (["train", "clip", "--steps", "0", "--preset", "tiny"], "steps"),
    (["train", "clip", "--device", "nonsense", "--preset", "tiny"], "--device"),
    (["bench", "metrics", "--device", "nonsense"], "--device"),
])
def test_cli_main_returns_2_with_the_message(argv, word, tmp_path, capsys):
    from minivl.__main__ import main
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and word in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_cli_cuda_without_cuda_and_unknown_preset(tmp_path, capsys):
    from minivl.__main__ import main
    if not torch.cuda.is_available():
        assert main(["train", "clip", "--device", "cuda", "--preset", "tiny", "--out", str(tmp_path / "r")]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own error: also one usage line and exit 2
        main(["train", "clip", "--preset", "huge"])
    assert exc.value.code == 2


def test_cli_data_preview_with_a_too_small_image_exits_2(tmp_path, capsys):
    from minivl.__main__ import main
    assert main(["data", "preview", "--image-size", "3", "--out", str(tmp_path / "g.png")]) == 2
    captured = capsys.readouterr()
    assert "image_size" in captured.out + captured.err


def test_cli_real_bugs_keep_their_traceback(monkeypatch):
    import minivl.__main__ as cli

    def bug(parser, args):
        raise RuntimeError("a bug in minivl")
    monkeypatch.setattr(cli, "_dispatch", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["bench", "metrics"])


@pytest.mark.parametrize("argv, words", [
    (["train", "clip", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "clip", "--data", "somewhere"], "has no --data option"),
    (["train", "clip", "--stage", "1"], "has no --stage option"),
    (["bench", "vit", "--preset", "vit-b-32"], "unknown --preset"),
])
def test_cli_refuses_options_a_recipe_or_bench_does_not_take(argv, words):
    out = subprocess.run([sys.executable, "-m", "minivl", *argv], capture_output=True, text=True)
    assert out.returncode == 2 and words in out.stderr, out.stderr
