"""dtlab models: Standard (Qwen2.5), Mixture-of-Depths and Dynamic Transformer.

    from dtlab import models
    model = models.build_model("mod", preset="debug", mod_capacity=0.25)
    out = model(input_ids, labels=input_ids)  # out.loss, out.lm_loss, out.aux_losses, out.routing_stats

The names below load on first use, so `dtlab.models.flops` (compute accounting) imports without
torch. Using any of them registers the configs and models with the transformers Auto classes,
so a saved checkpoint reloads through `AutoModelForCausalLM.from_pretrained` (in a process that
has not touched `dtlab.models` yet, call `models.register_auto_classes()` first).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "config": ("PRESETS", "ROUTING_MODES", "DTLabConfig", "MoDConfig", "DTFConfig", "make_config", "config_class"),
    "flops": ("flops_per_token", "forward_flops_per_token", "flop_ratio_vs_dense", "param_count", "capacity_k"),
    "registry": ("VARIANTS", "build_model", "register_auto_classes"),
    "modeling": ("DTLabForCausalLM", "StandardForCausalLM", "MoDForCausalLM", "DTFForCausalLM", "DTLabCausalLMOutput"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:  # a submodule not imported yet (models.layers), or nothing
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    importlib.import_module(".registry", __name__)  # registers the Auto classes
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
