"""dtlab trainers: everything that trains or uses a model, in sub-packages by what they hold.

- `cli`: the `dtlab` command and `dtlab ls`;
- `orchestrate`: the run driver, `dtlab run`, Ray Train, Ray Tune with Optuna, seed replicates;
- `tools`: what uses a trained model or a model shape (generation, lm-eval tasks, benchmarks);
- `monitor`: what runs report while they work (the terminal display, a logging handler; trackers);
- `run`: one worker's run (the loop, data, evaluation, checkpoints, device), no Ray;
- `spec`: experiment spec files.

Each imports only those below it (import-linter contracts in pyproject.toml). Kept import-light:
`dtlab report` must not pay for torch or Ray.
"""
