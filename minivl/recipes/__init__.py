"""Training recipes: `python -m minivl train <model>` and the `run(...)` the notebooks call.

Each recipe module pairs a model preset with its training preset (steps, batch size, learning
rate, warmup...) as data, trains with `minivl.train.Trainer`, writes a checkpoint to
`data/checkpoints/<model>-<preset>` and a run folder `data/runs/<model>-<preset>` (metrics.json
and plots), and prints a short summary.
"""
