"""Run directories written by hand, the way the training loop writes them (no torch needed)."""

import json
from pathlib import Path

import yaml

SPEC = {"name": "fx", "seed": 0, "model": {"type": "mod", "size": "debug"},
        "data": {"source": "builtin", "block_size": 16}, "training": {"max_steps": 20}}


def make_run(root: Path, name: str, variant: str, seed: int = 0, final: float = 5.0, layers: int = 4,
             steps: int = 20, params: dict | None = None, spec: dict | None = None, cut: bool = False,
             tps: float = 1000.0) -> Path:
    run = root / name
    run.mkdir(parents=True)
    spec = json.loads(json.dumps(spec or SPEC))
    spec["model"]["type"], spec["seed"] = variant, seed
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    flop_ratio = {"standard": 1.0, "mod": 0.6, "dtf": 0.62}[variant]
    (run / "run.json").write_text(json.dumps({
        "name": "fx", "variant": variant, "seed": seed, "commit": "abc123def4567", "dirty": False,
        "training": {"variant": variant, "capacity": None if variant == "standard" else 0.125, "device": "cpu",
                     "precision": "fp32", "world_size": 1, "total_steps": steps,
                     "tokens_per_step": 64, "parameters": 1000, "flops_per_token": 1e6 * flop_ratio,
                     "flop_ratio_vs_dense": flop_ratio, "seq_len": 16,
                     "model_config": {"num_hidden_layers": layers, "hidden_size": 64}}}))
    if params is not None:
        (run / "params.json").write_text(json.dumps({"trial_id": name, "params": params, "seed": seed}))
    lines = []
    for step in range(0, steps + 1, 10):
        loss = final + (steps - step) * 0.1
        routing = {}
        if variant != "standard":
            stats = {"selected_frac": 0.125, "gate_mean": 0.5 + step / 100, "gate_std": 0.1,
                     "router_logit_mean": 0.0, "router_logit_std": 1.0, "causal_agreement": 0.8 + step / 1000}
            if variant == "dtf":
                stats.update(s_ce=0.5, s_cu=0.4, temp_ce=0.47, temp_cu=0.37, d_st=1.0, d_ch=0.5, o_ce=1.0, m_cu=1.1)
            routing = {"1": stats, "3": stats}
        if step:
            lines.append({"kind": "train", "step": step, "loss": loss + 0.1, "lm_loss": loss, "lr": 1e-3,
                          "grad_norm": 1.0, "tokens_per_s": tps, "tokens_seen": step * 64, "peak_rss_gib": 0.5,
                          "routing": routing})
        ev = {"kind": "eval", "step": step, "tokens_seen": step * 64, "train_flops": step * 64 * 1e6 * flop_ratio,
              "done": step == steps, "val_loss": loss, "val_ppl": 2.718 ** loss, "routing_mode": "topk"}
        if routing:
            by_pos = [0.1 * (i % 3) for i in range(16)]
            ev["routing"] = {k: {**v, "selected_by_pos": by_pos} for k, v in routing.items()}
            ev["val_loss_causal"] = loss + 0.01
            ev["routing_causal"] = {k: {**v, "selected_frac": 0.2} for k, v in routing.items()}
        lines.append(ev)
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if cut:
        text = text[: len(text) - 40]  # a crash in the middle of the last line
    (run / "metrics.jsonl").write_text(text)
    return run
