"""dtlab models: Standard (Qwen2.5), Mixture-of-Depths and Dynamic Transformer.

    import models
    model = models.build_model("mod", preset="debug", mod_capacity=0.25)
    out = model(input_ids, labels=input_ids)  # out.loss, out.lm_loss, out.aux_losses, out.routing_stats

Importing this package registers the configs and models with the transformers Auto classes,
so a saved checkpoint reloads through `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM

from .config import CONFIG_CLASSES, PRESETS, DTFConfig, DTLabConfig, MoDConfig, config_class, make_config
from .flops import flop_ratio_vs_dense, flops_per_token, forward_flops_per_token, param_count
from .modeling import DTFForCausalLM, DTLabCausalLMOutput, DTLabForCausalLM, MoDForCausalLM, StandardForCausalLM

# Variant registry: specs hold these strings; the classes stay here.
VARIANTS: dict[str, type[DTLabForCausalLM]] = {
    "standard": StandardForCausalLM,
    "mod": MoDForCausalLM,
    "dtf": DTFForCausalLM,
}

for _variant, _model_cls in VARIANTS.items():
    AutoConfig.register(CONFIG_CLASSES[_variant].model_type, CONFIG_CLASSES[_variant], exist_ok=True)
    AutoModelForCausalLM.register(CONFIG_CLASSES[_variant], _model_cls, exist_ok=True)


def build_model(
    variant: str,
    preset: str = "debug",
    pretrained: str | os.PathLike | None = None,
    **overrides: Any,
) -> DTLabForCausalLM:
    """A `variant` model from `preset` + overrides, or with shape and weights from `pretrained`
    (a hub name or a local Qwen2/Qwen2.5 checkpoint directory; the preset is then ignored)."""
    config_class(variant)
    if pretrained is not None:
        from .loading import build_pretrained

        return build_pretrained(variant, pretrained, overrides)
    return VARIANTS[variant](make_config(variant, preset, **overrides))


__all__ = [
    "PRESETS", "VARIANTS", "DTLabConfig", "MoDConfig", "DTFConfig", "DTLabForCausalLM", "StandardForCausalLM",
    "MoDForCausalLM", "DTFForCausalLM", "DTLabCausalLMOutput", "build_model", "make_config", "flops_per_token",
    "forward_flops_per_token", "flop_ratio_vs_dense", "param_count",
]
