"""Shared builders for the model tests."""

import torch

from dtlab import models

VARIANTS = ("standard", "mod", "dtf")
# (variant, routing mode) pairs where the mode means something.
VARIANT_MODES = [("standard", "topk"), ("mod", "topk"), ("mod", "causal"), ("dtf", "topk"), ("dtf", "causal")]

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)


def build(variant: str, mode: str = "topk", seed: int = 0, **overrides):
    """A tiny model in eval mode, routing at capacity 0.5 so that routing decisions matter."""
    torch.manual_seed(seed)
    cap = {"mod": {"mod_capacity": 0.5}, "dtf": {"dtf_capacity": 0.5}}.get(variant, {})
    model = models.build_model(variant, **{**TINY, **cap, "routing_mode": mode, **overrides}).eval()
    if variant == "dtf" and mode == "causal":
        calibrate_dtf_threshold(model)
    return model


def calibrate_dtf_threshold(model, seed: int = 1):
    """Run training-mode forwards so the causal thresholds hold real quantiles of G."""
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, model.config.vocab_size, (4, 32), generator=g))
    model.train(was_training)


def tokens(B: int, T: int, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def routed_layers(model):
    """The routed layers of a routed model; refuses a model with none, so that a loop over them can
    never pass by checking nothing."""
    found = [i for i, kind in enumerate(model.config.layer_kinds) if kind in ("mod", "dtf_dynamic")]
    assert found, f"no routed layer in {model.config.layer_kinds}: routed_layers of a dense model checks nothing"
    return found


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"max |diff| {d.max().item():.3e}, mean {d.mean().item():.3e}"
