"""Compute accounting: pure functions of the config, checked against real models."""

import pytest
import torch

from dtlab import models
from dtlab.models.flops import flop_ratio_vs_dense, forward_flops_per_token


def test_mod_half_billion_flop_ratio():
    cfg = models.make_config("mod", "0.5B")
    assert flop_ratio_vs_dense(cfg, 2048) == pytest.approx(0.669, abs=0.001)


def test_lm_head_is_about_a_quarter_of_forward():
    cfg = models.make_config("standard", "0.5B")
    share = 2 * 896 * 151936 / forward_flops_per_token(cfg, 2048)
    assert 0.22 < share < 0.28


def test_ratios_order_and_limits():
    for variant, key in (("mod", "mod_capacity"), ("dtf", "dtf_capacity")):
        ratios = [flop_ratio_vs_dense(models.make_config(variant, "0.5B", **{key: c}), 2048)
                  for c in (0.125, 0.25, 0.5, 1.0)]
        assert ratios == sorted(ratios)
        assert ratios[-1] > 1.0  # at capacity 1 the routers (and DTF's prior) cost extra
        assert ratios[0] < 0.7


def _matmul_params(model) -> int:
    """Multiply-accumulate weights of every Linear, counting a tied head again (it is applied)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("variant,overrides", [
    ("standard", {}), ("mod", {"mod_capacity": 1.0}), ("mod", {"mod_capacity": 1.0, "mod_use_predictor": True}),
    ("dtf", {"dtf_capacity": 1.0}),
])
@pytest.mark.parametrize("preset", ["debug", "small"])
def test_flops_agree_with_the_instantiated_model(variant, overrides, preset):
    cfg = models.make_config(variant, preset, **overrides)
    model = models.VARIANTS[variant](cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert models.param_count(cfg) == n_params
    T = 64
    attention = cfg.num_hidden_layers * 2 * 2 * cfg.hidden_size * (T + 1) / 2
    fwd = forward_flops_per_token(cfg, T)
    # at capacity 1 every block sees every token: 2 FLOPs per matmul weight, plus attention
    extras = 0
    if variant == "dtf":
        extras = (cfg.num_hidden_layers // 2) * 2 * 3 * cfg.hidden_size  # DTF router reductions
    assert fwd == pytest.approx(2 * _matmul_params(model) + attention + extras)


@pytest.mark.parametrize("variant,overrides", [("mod", {}), ("dtf", {}), ("dtf", {"beta_mode": "schedule"}),
                                               ("mod", {"mod_use_predictor": True})])
def test_param_count_matches_debug_models(variant, overrides):
    cfg = models.make_config(variant, "debug", **overrides)
    assert models.param_count(cfg) == sum(p.numel() for p in models.VARIANTS[variant](cfg).parameters())

