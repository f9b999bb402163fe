"""The variants by name: specs hold these strings, this module maps them to classes and builds models.

Importing it registers the configs and models with transformers' Auto classes (names only), so a saved
checkpoint reloads through `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import os
from typing import Any

from .config import CONFIG_CLASSES, config_class, make_config
from .loading import build_pretrained
from .modeling import DTFForCausalLM, DTLabForCausalLM, MoDForCausalLM, StandardForCausalLM

VARIANTS: dict[str, type[DTLabForCausalLM]] = {
    "standard": StandardForCausalLM,
    "mod": MoDForCausalLM,
    "dtf": DTFForCausalLM,
}


def register_auto_classes() -> None:
    """Let `AutoConfig` / `AutoModelForCausalLM.from_pretrained` reload saved dtlab checkpoints."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for variant, model_cls in VARIANTS.items():
        AutoConfig.register(CONFIG_CLASSES[variant].model_type, CONFIG_CLASSES[variant], exist_ok=True)
        AutoModelForCausalLM.register(CONFIG_CLASSES[variant], model_cls, exist_ok=True)


register_auto_classes()


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
        model = build_pretrained(VARIANTS[variant], variant, pretrained, overrides)
        assert isinstance(model, DTLabForCausalLM)
        return model
    return VARIANTS[variant](make_config(variant, preset, **overrides))
