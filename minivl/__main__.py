"""Command line: `python -m minivl {data,train,bench,course,exercises,quiz} ...`.

Each sub-command lives next to the code it drives; this file only dispatches. The families it
offers are found, not listed: every module in `minivl/recipes/` is a `train` target and every
module in `minivl/bench/` a `bench` target, so a new family is added by adding its files. The
heavy modules are imported only once a command is chosen, so `--help` answers at once.

    python -m minivl data bench            scenes/s of Shapes World (render + all text)
    python -m minivl data preview --out F  a grid of samples with captions and boxes
    python -m minivl train clip [--preset cpu|tiny|gpu] [--steps N] [--out DIR] [--resume|--force]
    python -m minivl train vqa --data DIR  (recipes that take your own data; --stage for staged ones)
    python -m minivl bench {vit,clip,metrics,data}
    python -m minivl course [--fast] [--only NN ...]   run the notebooks, check their claims, time them
    python -m minivl exercises [--out DIR]             student notebooks: solutions become stubs
    python -m minivl quiz [--only NN ...] [--shuffle]  interview questions, answers on request
    python -m minivl quiz --list [--answers]           the questions as a handout (and the key)
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def modules(folder: str) -> list[str]:
    """The public modules of minivl/<folder>/, without importing them."""
    return sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE / folder)]) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minivl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="Shapes World: bench the generator or preview samples")
    data.add_argument("action", choices=["bench", "preview"])
    data.add_argument("--out", default="data/shapes_world_grid.png", help="preview PNG path")
    data.add_argument("--image-size", type=int, default=64)
    data.add_argument("--n", type=int, default=None, help="scenes to bench / images to preview")
    data.add_argument("--split", default="train")

    train = sub.add_parser("train", help="train a model and write a checkpoint + run folder")
    train.add_argument("model", choices=modules("recipes"))
    train.add_argument("--preset", default="cpu", help="a preset of the recipe's RECIPES: tiny, cpu, gpu (some have more)")
    train.add_argument("--device", default=None, help="cuda / mps / cpu (default: best available)")
    train.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    train.add_argument("--out", default=None, help="run folder (default data/runs/<model>-<preset>)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too")
    # options of some recipes only: a recipe takes one when its run() has a parameter of that name
    train.add_argument("--data", default=None, help="train on your own data in this folder (recipes that take it)")
    train.add_argument("--stage", default=None, help="which training stage(s) to run (recipes that have stages)")
    again = train.add_mutually_exclusive_group()  # an interrupted run is never overwritten silently
    again.add_argument("--resume", action="store_true",
                       help="continue from the training checkpoint in the run folder (with --steps N: train longer)")
    again.add_argument("--force", action="store_true",
                       help="start afresh even over an interrupted or longer run in the run folder")

    course = sub.add_parser("course", help="run the notebooks in order, check every claim, write a report")
    course.add_argument("--fast", action="store_true", help="fast mode (MINIVL_FAST=1): tiny models, seconds each")
    course.add_argument("--only", nargs="+", default=None, metavar="NN", help="notebook numbers, e.g. --only 01 03")
    course.add_argument("--out", default=None, help="report folder (default data/runs/course[-fast])")
    course.add_argument("--dir", default=None, help="run the notebooks of this folder (e.g. a student's) instead")
    course.add_argument("--stamp", action="store_true",
                        help="write the measured run times (data/runs/course/times.json) into the title cells")

    exercises = sub.add_parser("exercises", help="write the student versions of the notebooks (solutions as stubs)")
    exercises.add_argument("--out", default=None, help="folder (default data/exercises)")

    quiz = sub.add_parser("quiz", help="the notebooks' interview questions, one at a time, answers on request")
    quiz.add_argument("--only", nargs="+", default=None, metavar="NN", help="notebook numbers, e.g. --only 03 08")
    quiz.add_argument("--shuffle", action="store_true", help="ask in a random order")
    quiz.add_argument("--seed", type=int, default=0, help="the order's seed (with --shuffle)")
    quiz.add_argument("--n", type=int, default=None, help="ask this many only")
    quiz.add_argument("--list", action="store_true", help="print the questions (a handout) instead of asking")
    quiz.add_argument("--answers", action="store_true", help="print the questions with their answers (the key)")
    quiz.add_argument("--out", default=None, help="write the handout to this markdown file")
    quiz.add_argument("--dir", default=None, help="read the notebooks of this folder instead")

    bench = sub.add_parser("bench", help="measure speed against a reference in the same run")
    bench.add_argument("what", choices=modules("bench"))
    bench.add_argument("--device", default=None)
    bench.add_argument("--steps", type=int, default=None)
    bench.add_argument("--preset", default=None, help="a bench preset, e.g. clip: vit-b-32 (OpenAI's full size)")

    args = parser.parse_args(argv)
    # Bad input (a negative --steps, a device this machine lacks, a missing file) is the user's
    # to fix: one line and exit status 2, like argparse's own errors. Anything else is a bug in
    # minivl and keeps its traceback.
    try:
        return _dispatch(parser, args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


def _check_device(name) -> None:
    """torch.device("nonsense") raises RuntimeError; for the CLI it is bad input, so ValueError."""
    if name is None:
        return
    import torch
    try:
        torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda, cuda:N or mps, got {name!r}") from None


def _dispatch(parser, args) -> int:
    _check_device(getattr(args, "device", None))
    if args.command == "data":
        from minivl.bench import data as data_cli
        return data_cli.main(args)
    if args.command in ("course", "exercises", "quiz"):
        return importlib.import_module(f"minivl.{args.command}").main(args)
    folder = {"train": "recipes", "bench": "bench"}[args.command]
    name = args.model if args.command == "train" else args.what
    module = importlib.import_module(f"minivl.{folder}.{name}")
    if not callable(getattr(module, "main", None)):
        parser.error(f"minivl/{folder}/{name}.py has no main(args): it is not a {args.command} target")
    if args.command == "bench" and getattr(args, "preset", None) is not None \
            and args.preset not in getattr(module, "PRESETS", ()):
        parser.error(f"bench {name}: unknown --preset {args.preset!r}; it has "
                     f"{list(getattr(module, 'PRESETS', ())) or 'none (it benches the course preset of the device)'}")
    if args.command == "train":
        presets = getattr(module, "RECIPES", {})
        if args.preset not in presets:
            parser.error(f"train {name}: unknown preset {args.preset!r}; choose one of {sorted(presets)}")
        takes = inspect.signature(module.run).parameters
        for option in ("data", "stage"):
            if getattr(args, option) is not None and option not in takes:
                parser.error(f"train {name} has no --{option} option")
    return module.main(args)


if __name__ == "__main__":
    sys.exit(main())
