"""Run metrics exported to Ray's metrics system (Prometheus), shown by `grafana_dtlab.json`.

Ray prefixes custom metrics with `ray_`: `dtlab_loss` is scraped as `ray_dtlab_loss`.
Tags: `run`, `variant`, and `layer` for per-layer routing metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.util.metrics import Gauge

_GAUGES: dict[str, Gauge] = {}
DESCRIPTIONS = {
    "dtlab_loss": "training loss (LM + weighted aux)",
    "dtlab_lm_loss": "training LM loss",
    "dtlab_val_loss": "validation LM loss",
    "dtlab_tokens_per_s": "training tokens per second (all workers)",
    "dtlab_grad_norm": "gradient norm before clipping",
    "dtlab_selected_frac": "fraction of tokens a routed layer processed",
    "dtlab_gate_mean": "mean router gate of a routed layer",
    "dtlab_causal_agreement": "fraction of tokens where causal routing agrees with top-k",
}


def _gauge(name: str, layer: bool) -> Gauge:
    if name not in _GAUGES:
        from ray.util.metrics import Gauge

        keys = ("run", "variant", "layer") if layer else ("run", "variant")
        _GAUGES[name] = Gauge(name, description=DESCRIPTIONS[name], tag_keys=keys)
    return _GAUGES[name]


def export_record(record: dict[str, Any]) -> None:
    """Set the gauges from one `metrics.jsonl` record (train or eval)."""
    tags = {"run": str(record.get("run", "")), "variant": str(record.get("variant", ""))}
    for key in ("loss", "lm_loss", "val_loss", "tokens_per_s", "grad_norm"):
        value = record.get(key)
        if isinstance(value, (int, float)):
            _gauge(f"dtlab_{key}", False).set(float(value), tags=tags)
    for layer, stats in (record.get("routing") or {}).items():
        for key in ("selected_frac", "gate_mean", "causal_agreement"):
            value = stats.get(key)
            if isinstance(value, (int, float)):
                _gauge(f"dtlab_{key}", True).set(float(value), tags={**tags, "layer": str(layer)})
