"""dtlab trainers: data, the per-worker training loop, Ray drivers, benchmarks and the CLI.

Kept import-light: `dtlab report` must not pay for torch or Ray.
"""
