"""Runs, experiments and sweeps: the run driver, Ray Train, Ray Tune with Optuna, seed replicates."""
