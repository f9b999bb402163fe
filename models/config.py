"""Model configurations: one `PretrainedConfig` subclass per variant, presets as data.

Field names follow Hugging Face `Qwen2Config` for the shape and the original project for the
routing knobs, so a spec file, a Qwen2.5 `config.json` and a saved dtlab checkpoint all speak
the same names. Validation happens in `__init__` and raises `ValueError` naming the bad key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any, ClassVar

from transformers import PretrainedConfig

# Shapes. Qwen2.5 sizes come from the architecture spec's table; `debug` trains a step in
# well under a second on one CPU core; `small` (~20M parameters) is for real CPU experiments.
# `vocab_size` of the small presets is a default: the trainer sets it from the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "small": dict(
        hidden_size=384, intermediate_size=1152, num_hidden_layers=10, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
    "0.5B": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
    ),
    "1.5B": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
    ),
    "3B": dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
    ),
}

ROUTING_MODES = ("topk", "causal")

# Shape fields shared by every variant (Hugging Face Qwen2 names) with their defaults.
SHAPE_DEFAULTS: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=True,
)
# Behaviour fields shared by every variant.
COMMON_DEFAULTS: dict[str, Any] = dict(
    routing_mode="topk",
    # Ablation switch: routed blocks apply their full update (gate = 1). Used to check that a
    # routed model at capacity 1 is exactly the dense model (contract item 4).
    force_unit_gate=False,
    # Tokens per chunk of the LM-head cross-entropy; fp32 logits never exist for more than this.
    loss_chunk_tokens=4096,
)


def did_you_mean(name: str, choices: Iterable[object]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''. The one helper for every
    unknown-name message of dtlab (configs, specs, sweeps)."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# The largest value of a shape key the code can hold (others: 2**31 - 1, the int32 index of GPU kernels).
SHAPE_LIMITS = {"num_hidden_layers": 10_000, "num_attention_heads": 65_536, "num_key_value_heads": 65_536}


def _check_capacity(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r}: capacity must be a number in (0, 1]")


def check_rope(rope_scaling: Any, rope_parameters: Any, kwargs: dict[str, Any]) -> None:
    """Only the default RoPE is implemented: a scaled one (linear, dynamic, yarn, ...) is refused,
    never dropped. Qwen2.5 checkpoints carry `rope_scaling: null`; transformers 5 writes
    `rope_parameters: {rope_type: default, rope_theta: ...}`, whose theta is taken."""
    for name, value in (("rope_scaling", rope_scaling), ("rope_parameters", rope_parameters)):
        if value is None:
            continue
        kind = value.get("rope_type", value.get("type", "default")) if isinstance(value, dict) else value
        if kind != "default":
            raise ValueError(f"{name}={value!r}: only the default rotary embedding is supported "
                             "(no RoPE scaling); expected null or rope_type 'default'")
    if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters:
        kwargs.setdefault("rope_theta", rope_parameters["rope_theta"])


class DTLabConfig(PretrainedConfig):
    """Standard (Qwen2.5) decoder; the base of the routed variants' configs."""

    model_type = "dtlab_standard"
    variant: ClassVar[str] = "standard"
    VARIANT_DEFAULTS: ClassVar[dict[str, Any]] = {}
    # The field holding the fraction of tokens a routed block takes (None: nothing is routed).
    capacity_key: ClassVar[str | None] = None

    def __init__(self, **kwargs: Any) -> None:
        check_rope(kwargs.pop("rope_scaling", None), kwargs.pop("rope_parameters", None), kwargs)
        own = self.defaults()
        for key, default in own.items():
            setattr(self, key, kwargs.pop(key, default))
        tie = self.tie_word_embeddings
        self.check_types()  # before transformers' own checks, which divide by what may be a string
        super().__init__(**kwargs)
        self.tie_word_embeddings: bool = tie
        self.check_fields()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(cls.defaults())

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_kinds(self) -> list[str]:
        """Per-layer structure as data: the forward loop never branches on the variant."""
        return ["dense"] * self.num_hidden_layers

    @property
    def capacity(self) -> float | None:
        """The fraction of tokens each routed block processes; None for a dense model."""
        return getattr(self, self.capacity_key) if self.capacity_key else None

    @property
    def routing_modes(self) -> tuple[str, ...]:
        """The routing modes that mean something for this model: a dense model has one."""
        return ROUTING_MODES if self.capacity_key else ROUTING_MODES[:1]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {**SHAPE_DEFAULTS, **COMMON_DEFAULTS, **cls.VARIANT_DEFAULTS}

    def check_types(self) -> None:
        """Each field has its default's type (an int where a float is expected is fine), and no
        number is NaN or infinite: `mod_aux_loss_weight=abc` or `.nan` is refused by name."""
        for key, default in self.defaults().items():
            value = getattr(self, key)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, (int, float)):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                ok = ok and (isinstance(value, int) or not isinstance(default, int))
            else:
                ok = isinstance(value, type(default))
            if not ok:
                kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
                raise ValueError(f"{key}={value!r}: expected {kind.get(type(default), type(default).__name__)}")

    def check_fields(self) -> None:
        self.check_types()
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "loss_chunk_tokens"):
            value, most = getattr(self, key), SHAPE_LIMITS.get(key, 2**31 - 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r}: expected a positive integer")
            if value > most:  # beyond what a tensor's dimension (int32 kernels) or a layer list can hold
                raise ValueError(f"{key}={value:,} is out of range: expected at most {most:,}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}: expected hidden_size % num_attention_heads == 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}: grouped-query attention needs it")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (hidden_size / num_attention_heads) must be even for RoPE")
        if self.capacity_key:
            _check_capacity(self.capacity_key, self.capacity)
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(f"routing_mode={self.routing_mode!r}: expected one of {ROUTING_MODES}")
        for key in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{key}={value!r}: expected a positive number")


class MoDConfig(DTLabConfig):
    """Mixture-of-Depths (Raposo et al. 2024): every other block routed by a learned top-k router."""

    model_type = "dtlab_mod"
    variant: ClassVar[str] = "mod"
    capacity_key: ClassVar[str | None] = "mod_capacity"

    def __init__(self, **kwargs: Any) -> None:  # explicit: transformers would generate one otherwise
        super().__init__(**kwargs)
    VARIANT_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        mod_capacity=0.125,
        mod_aux_loss_weight=0.01,
        mod_use_predictor=False,
        mod_predictor_loss_weight=0.01,
    )

    @property
    def layer_kinds(self) -> list[str]:
        # Layers 1, 3, 5, ... are routed; layer 0 stays dense (spec section 2).
        return ["mod" if i % 2 else "dense" for i in range(self.num_hidden_layers)]

    def check_fields(self) -> None:
        super().check_fields()
        for key in ("mod_aux_loss_weight", "mod_predictor_loss_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected a weight >= 0")


BETA_MODES = ("learnable", "schedule")
BETA_SCHEDULES = ("linear", "cosine")


class DTFConfig(DTLabConfig):
    """Dynamic Transformer: decision/dynamic layer pairs routed by predictive surprise."""

    model_type = "dtlab_dtf"
    variant: ClassVar[str] = "dtf"
    capacity_key: ClassVar[str | None] = "dtf_capacity"

    def __init__(self, **kwargs: Any) -> None:  # explicit: transformers would generate one otherwise
        saved = "transformers_version" in kwargs  # read from a config.json, not built here
        if saved and kwargs.get("beta_mode") == "schedule" and "beta_schedule_values" not in kwargs:
            raise ValueError("beta_mode='schedule' in a checkpoint saved before dtlab scheduled the temperatures "
                             "themselves (its beta_*_start/end went through softplus): set beta_*_start/end to "
                             "softplus of the saved values and beta_schedule_values='temperature' in its config.json")
        super().__init__(**kwargs)
    VARIANT_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        dtf_capacity=0.125,
        beta_ce_init=-0.5,
        beta_cu_init=-0.8,
        o_ce_init=1.025,
        m_cu_init=1.1,
        prior_ffn_intermediate_size_factor=0.0625,
        prior_loss_weight=0.05,
        ma_window=100,
        # Alternative to learnable temperatures: a schedule of the temperatures themselves (the
        # factors of CE and CU; learnable mode uses softplus(beta)). Defaults: softplus of the inits.
        beta_mode="learnable",
        beta_schedule="linear",
        beta_ce_start=0.474077, beta_ce_end=0.474077,
        beta_cu_start=0.371101, beta_cu_end=0.371101,
        beta_schedule_steps=1000,
        beta_schedule_values="temperature",  # what beta_*_start/end are (older checkpoints: raw betas)
        # EMA momentum of the per-layer causal threshold (the (1 - c) quantile of G).
        dtf_threshold_momentum=0.99,
    )

    @property
    def layer_kinds(self) -> list[str]:
        # Pairs (decision at even index, dynamic at odd); an odd last layer is a plain dense block.
        kinds = []
        for i in range(self.num_hidden_layers):
            if i % 2:
                kinds.append("dtf_dynamic")
            else:
                kinds.append("dtf_decision" if i + 1 < self.num_hidden_layers else "dense")
        return kinds

    @property
    def prior_intermediate_size(self) -> int:
        width = max(2, math.ceil(self.prior_ffn_intermediate_size_factor * self.hidden_size))
        return width + width % 2

    def check_fields(self) -> None:
        super().check_fields()
        if self.prior_ffn_intermediate_size_factor <= 0:
            raise ValueError(f"prior_ffn_intermediate_size_factor={self.prior_ffn_intermediate_size_factor!r}: "
                             "expected a number > 0")
        if self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight={self.prior_loss_weight!r}: expected a weight >= 0")
        if self.o_ce_init <= 0:
            raise ValueError(f"o_ce_init={self.o_ce_init!r}: o_ce is kept positive, expected > 0")
        if not isinstance(self.ma_window, int) or self.ma_window < 1:
            raise ValueError(f"ma_window={self.ma_window!r}: expected a positive integer")
        if self.beta_mode not in BETA_MODES:
            raise ValueError(f"beta_mode={self.beta_mode!r}: expected one of {BETA_MODES}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={self.beta_schedule!r}: expected one of {BETA_SCHEDULES}")
        scheduled = ("beta_ce_start", "beta_ce_end", "beta_cu_start", "beta_cu_end")
        for key in scheduled if self.beta_mode == "schedule" else ():
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{key}={value!r}: a scheduled temperature multiplies CE or CU; expected a "
                                 "finite number > 0 (learnable mode's equivalent is softplus(beta))")
        if self.beta_schedule_values != "temperature":
            raise ValueError(f"beta_schedule_values={self.beta_schedule_values!r}: expected 'temperature'")
        if not isinstance(self.beta_schedule_steps, int) or self.beta_schedule_steps < 1:
            raise ValueError(f"beta_schedule_steps={self.beta_schedule_steps!r}: expected a positive integer")
        if not 0.0 <= self.dtf_threshold_momentum < 1.0:
            raise ValueError(f"dtf_threshold_momentum={self.dtf_threshold_momentum!r}: expected a number in [0, 1)")


CONFIG_CLASSES: dict[str, type[DTLabConfig]] = {"standard": DTLabConfig, "mod": MoDConfig, "dtf": DTFConfig}


def config_class(variant: str) -> type[DTLabConfig]:
    if variant not in CONFIG_CLASSES:
        raise ValueError(f"unknown variant {variant!r}{did_you_mean(str(variant), CONFIG_CLASSES)}: "
                         f"expected one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[variant]


def check_override_keys(variant: str, overrides: dict[str, Any]) -> None:
    """Refuse keys the variant does not have, naming the key and the closest valid one."""
    cls = config_class(variant)
    valid = cls.field_names()
    for key in overrides:
        if key not in valid:
            other = [v for v, c in CONFIG_CLASSES.items() if key in c.field_names()]
            where = f"; it belongs to variant(s) {other}" if other else did_you_mean(key, valid)
            raise ValueError(f"unknown override key {key!r} for variant {variant!r}{where}")


def make_config(variant: str, preset: str = "debug", **overrides: Any) -> DTLabConfig:
    """A validated config for `variant` ('standard' | 'mod' | 'dtf') from `preset` plus overrides.

    Overrides use the Hugging Face Qwen2 field names for the shape and the original project's
    names for the routing knobs; an unknown key raises `ValueError` with a did-you-mean.
    """
    cls = config_class(variant)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}{did_you_mean(str(preset), PRESETS)}: "
                         f"expected one of {list(PRESETS)}")
    check_override_keys(variant, overrides)
    return cls(**{**PRESETS[preset], **overrides})
