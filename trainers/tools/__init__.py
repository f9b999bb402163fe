"""What uses a trained model or a model shape: text generation, lm-eval tasks, benchmarks."""
