"""`python -m minivl data {bench,preview}`: how fast Shapes World is, and what it looks like.

bench   scenes/s on one core (render, then render + every task's text) at --image-size.
        The generator must stay far ahead of training (target >= 2,000 scenes/s at 64x64),
        so that data never needs to be cached on disk.
preview a grid of --n scenes from --split with captions and boxes drawn, written to --out.
"""
from __future__ import annotations

import os
import time

from minivl.world import VERSION, World, WorldConfig


def _one_core() -> str:
    """Pin this process to one core so the figure means 'per worker', whatever the machine."""
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"core {core}"
    return "unpinned"


def bench(world: World, n: int, split: str = "train", repeats: int = 5) -> dict:
    """Scenes/s, best of `repeats` runs of n // repeats scenes each (the least disturbed by
    other processes); also the median, so a noisy machine shows up as a gap between the two."""
    for i in range(50):  # warm-up: backgrounds, caches
        world.all_text(world.scene(i, split))
    chunk = max(1, n // repeats)
    out = {}
    for name, make in (("render", lambda i: world.scene(i, split)),
                       ("render+text", lambda i: world.all_text(world.scene(i, split)))):
        rates = []
        for r in range(repeats):
            t0 = time.perf_counter()
            for i in range(r * chunk, (r + 1) * chunk):
                make(i)
            rates.append(chunk / (time.perf_counter() - t0))
        out[name], out[name + " median"] = max(rates), sorted(rates)[len(rates) // 2]
    return out


def preview(world: World, n: int, split: str, out: str) -> str:
    from minivl import viz
    scenes = [world.scene(i, split) for i in range(n)]
    fig = viz.show_images([s.image for s in scenes], titles=[world.captions(s)[0] for s in scenes], wrap=26,
                          boxes=[[o.box for o in s.objects] for s in scenes],
                          ncols=min(6, n), title_size=6)
    viz.savefig(fig, out, dpi=110, close=True)
    return out


def main(args) -> int:
    # `python -m minivl data bench|preview` passes all four; `python -m minivl bench data` none of them
    for name, default in (("action", "bench"), ("image_size", 64), ("n", None), ("split", "train")):
        if not hasattr(args, name):
            setattr(args, name, default)
    world = World(WorldConfig(image_size=args.image_size))  # bad sizes: ValueError, one line from the CLI
    if args.action == "bench":
        n = args.n or 3000
        where = _one_core()
        r = bench(world, n, args.split)
        print(f"Shapes World {VERSION}, {args.image_size}x{args.image_size}, {n} {args.split} scenes, {where}:")
        print(f"  render only      : {r['render']:8.0f} scenes/s (median of 5 runs {r['render median']:.0f})")
        print(f"  render + all text: {r['render+text']:8.0f} scenes/s (median of 5 runs "
              f"{r['render+text median']:.0f}; target >= 2000)")
        return 0
    if args.action == "preview":
        path = preview(world, args.n or 12, args.split, args.out)
        print(f"wrote {path}")
        return 0
    raise ValueError(f"unknown action {args.action!r}: choose bench or preview")
