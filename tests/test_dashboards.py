"""The Grafana dashboard shows exactly the metrics the runs export."""

import json
import re
from pathlib import Path

from dtlab.dashboards.metrics import DESCRIPTIONS, export_record

ROOT = Path(__file__).resolve().parents[1]


def test_grafana_dashboard_queries_exported_metrics():
    board = json.loads((ROOT / "dashboards" / "grafana_dtlab.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    used = {m.removeprefix("ray_") for e in exprs for m in re.findall(r"ray_dtlab_\w+", e)}
    assert used == set(DESCRIPTIONS), used ^ set(DESCRIPTIONS)
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_export_record_sets_gauges(monkeypatch):
    import dtlab.dashboards.metrics as m

    seen = []

    class FakeGauge:
        def __init__(self, name, description, tag_keys):
            self.name, self.keys = name, tag_keys

        def set(self, value, tags):
            assert set(tags) == set(self.keys)
            seen.append((self.name, value, tags.get("layer")))

    import ray.util.metrics

    monkeypatch.setattr(ray.util.metrics, "Gauge", FakeGauge)
    monkeypatch.setattr(m, "_GAUGES", {})
    export_record({"run": "r", "variant": "mod", "loss": 2.5, "tokens_per_s": 100.0,
                   "routing": {"1": {"selected_frac": 0.125, "gate_mean": 0.4, "causal_agreement": 0.9}}})
    assert ("dtlab_loss", 2.5, None) in seen and ("dtlab_selected_frac", 0.125, "1") in seen
    assert ("dtlab_causal_agreement", 0.9, "1") in seen
