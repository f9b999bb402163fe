"""One worker's run: the training loop, data, evaluation, checkpoints, device and precision. No Ray."""
