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



def _counted_forward_per_token(model, x, grad: bool) -> float:
    """Matmul FLOPs of one forward per token, counted by torch (attention in SDPA's math kernel, which
    computes the full [S, S] scores of a causal block: the masked half too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.set_grad_enabled(grad), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / x.numel()


def _uncounted(cfg, S_by_layer: dict[int, int], T: int) -> float:
    """What `forward_flops_per_token` counts and FlopCounterMode does not (DTF's elementwise surprise
    reductions), minus what the math kernel computes beyond it (the masked half of causal scores)."""
    D = cfg.hidden_size
    extra = sum(2 * 3 * D for kind in cfg.layer_kinds if kind == "dtf_dynamic")
    masked = sum((S / T) * 2 * D * (S - 1) for S in S_by_layer.values())
    return extra - masked


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_routed_flops_agree_with_counted_flops_at_capacity_a_quarter(variant):
    """`flops_per_token` of a routed debug model at c = 0.25 is what torch counts for it: top-k routing
    runs each routed block on the k = 16 gathered tokens of 64 (and the LM head, routers and priors)."""
    cfg = models.make_config(variant, "debug", **{f"{variant}_capacity": 0.25})
    model = models.VARIANTS[variant](cfg).eval()
    T = 64
    x = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    counted = _counted_forward_per_token(model, x, grad=False)
    S = {i: (16 if kind in ("mod", "dtf_dynamic") else T) for i, kind in enumerate(cfg.layer_kinds)}
    assert counted == pytest.approx(forward_flops_per_token(cfg, T) - _uncounted(cfg, S, T), rel=1e-9)
    assert models.flops_per_token(cfg, T) == 3 * forward_flops_per_token(cfg, T)
    # precondition: a count at capacity 1 would differ
    full = models.make_config(variant, "debug", **{f"{variant}_capacity": 1.0})
    assert abs(forward_flops_per_token(full, T) - forward_flops_per_token(cfg, T)) > 0.1 * counted


@pytest.mark.parametrize("variant", ["mod", "dtf"])
def test_causal_mode_training_counts_what_it_computes(variant):
    """Training in `causal` routing runs routed blocks in their static masked form, every token: the
    FLOPs recorded for it are those (not k tokens' worth, which it does not save)."""
    cfg = models.make_config(variant, "debug", routing_mode="causal", **{f"{variant}_capacity": 0.25})
    model = models.VARIANTS[variant](cfg).train()
    T = 64
    x = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    counted = _counted_forward_per_token(model, x, grad=True)
    S = dict.fromkeys(range(cfg.num_hidden_layers), T)
    assert counted == pytest.approx(forward_flops_per_token(cfg, T) - _uncounted(cfg, S, T), rel=1e-9)
    topk = models.make_config(variant, "debug", **{f"{variant}_capacity": 0.25})
    assert models.flops_per_token(cfg, T) > 1.2 * models.flops_per_token(topk, T)
