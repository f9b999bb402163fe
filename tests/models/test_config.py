"""Configs, presets, registry and bad input."""

import pytest
import torch

from dtlab import models
from dtlab.models.config import PRESETS


def test_registry_and_presets():
    assert set(models.VARIANTS) == {"standard", "mod", "dtf"}
    assert {"debug", "small", "0.5B", "1.5B", "3B"} <= set(PRESETS)
    c = models.make_config("standard", "0.5B")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (896, 24, 14, 2, 4864, 151936, True)
    assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6
    c = models.make_config("dtf", "3B")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (2048, 36, 16, 11008)


def test_small_preset_is_about_20m_parameters():
    n = models.param_count(models.make_config("standard", "small"))
    assert 15e6 < n < 25e6, n


def test_original_knob_names_and_defaults():
    mod = models.make_config("mod")
    assert (mod.mod_capacity, mod.mod_aux_loss_weight) == (0.125, 0.01)
    dtf = models.make_config("dtf")
    assert (dtf.dtf_capacity, dtf.beta_ce_init, dtf.beta_cu_init, dtf.prior_ffn_intermediate_size_factor,
            dtf.prior_loss_weight, dtf.ma_window) == (0.125, -0.5, -0.8, 0.0625, 0.05, 100)
    assert models.make_config("dtf", "0.5B").prior_intermediate_size == 56  # ceil(0.0625 * 896), even


def test_config_is_a_pretrained_config_that_round_trips(tmp_path):
    from transformers import AutoConfig, PretrainedConfig

    c = models.make_config("dtf", beta_ce_init=-1.5, routing_mode="causal")
    assert isinstance(c, PretrainedConfig)
    c.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is type(c) and again.beta_ce_init == -1.5 and again.routing_mode == "causal"


@pytest.mark.parametrize("call,match", [
    (lambda: models.make_config("moe"), r"unknown variant 'moe'.*\['dtf', 'mod', 'standard'\]"),
    (lambda: models.build_model("mdo"), r"unknown variant 'mdo' \(did you mean 'mod'\?\)"),
    (lambda: models.make_config("mod", "7B"), r"unknown preset '7B'"),
    (lambda: models.make_config("mod", mod_capacty=0.5), r"'mod_capacty'.*did you mean 'mod_capacity'"),
    (lambda: models.make_config("standard", mod_capacity=0.5), r"'mod_capacity' for variant 'standard'.*\['mod'\]"),
    (lambda: models.make_config("mod", mod_capacity=0.0), r"mod_capacity=0.0: capacity must be a number in \(0, 1\]"),
    (lambda: models.make_config("dtf", dtf_capacity=1.5), r"dtf_capacity=1.5"),
    (lambda: models.make_config("dtf", dtf_capacity="half"), r"dtf_capacity='half'"),
    (lambda: models.make_config("standard", hidden_size=30, num_attention_heads=4),
     r"num_attention_heads=4 does not divide hidden_size=30"),
    (lambda: models.make_config("standard", num_key_value_heads=3), r"num_key_value_heads=3 does not divide"),
    (lambda: models.make_config("standard", routing_mode="greedy"), r"routing_mode='greedy'"),
    (lambda: models.make_config("dtf", beta_mode="fixed"), r"beta_mode='fixed'"),
    (lambda: models.make_config("dtf", o_ce_init=0.0), r"o_ce_init=0.0"),
    (lambda: models.make_config("standard", hidden_size=0), r"hidden_size=0"),
])
def test_bad_input_is_a_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sequence_longer_than_positions_is_refused():
    model = models.build_model("standard", max_position_embeddings=16)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
