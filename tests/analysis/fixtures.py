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


def set_epochs(run: Path, planned: float | None, per_step: float) -> None:
    """A run that planned `planned` passes over its training rows (run.json's `training.epochs`, None: not
    recorded) and whose training records carry the 0-based pass of each step (`per_step` passes a step)."""
    info = json.loads((run / "run.json").read_text())
    if planned is not None:
        info["training"]["epochs"] = planned
    (run / "run.json").write_text(json.dumps(info))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if r["kind"] == "train":
            r["epoch"] = int((r["step"] - 1) * per_step)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


# ---- isoFLOP studies ---------------------------------------------------------------------------------------
VOCAB = 512
TOKENS_PER_STEP = 1024


def make_isoflop_study(root: Path, budgets: list[float], sizes: dict[str, tuple[int, int]], variants: list[str],
                       seeds: list[int], loss, unfinished: tuple[str, ...] = (), val_bytes: int | None = 4000,
                       tied: bool = True) -> Path:
    """An isoFLOP study directory as `dtlab isoflop` writes it: `isoflop.json` and one run directory per
    budget x size x variant x seed, each trained to its budget (flops per token 6N, steps = budget / (6N x
    tokens per step), rounded), its final loss `loss(variant, budget, parameters, seed)`. `sizes`: name ->
    (parameters, hidden size). Runs named in `unfinished` stop halfway (`done` false)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for budget in budgets:
        for size, (params, hidden) in sizes.items():
            for variant in variants:
                for seed in seeds:
                    name = f"{variant}-{size}-c{budget:.0e}-s{seed}"
                    fpt = 6.0 * params
                    steps = max(2, round(budget / (fpt * TOKENS_PER_STEP)))
                    final = float(loss(variant, budget, params, seed))
                    _isoflop_run(root / "runs" / name, variant, seed, params, hidden, fpt, steps, final,
                                 name in unfinished, val_bytes, tied)
                    entries.append({"dir": f"runs/{name}", "variant": variant, "size": size, "budget": budget,
                                    "seed": seed, "steps": steps, "planned_flops": steps * TOKENS_PER_STEP * fpt})
    (root / "isoflop.json").write_text(json.dumps({
        "budgets": budgets, "sizes": [{"name": s, "overrides": {"hidden_size": h}} for s, (_, h) in sizes.items()],
        "variants": variants, "seeds": seeds, "runs": entries}))
    return root


def _isoflop_run(run: Path, variant: str, seed: int, params: int, hidden: int, fpt: float, steps: int, final: float,
                 unfinished: bool, val_bytes: int | None, tied: bool) -> None:
    run.mkdir(parents=True)
    spec = json.loads(json.dumps(SPEC))
    spec["model"]["type"], spec["seed"] = variant, seed
    spec["model"]["hidden_size"], spec["training"]["max_steps"] = hidden, steps  # as the study sets them,
    spec["training"]["scheduler"] = {"warmup_steps": min(5000, steps // 10)}  # at most a tenth of a run, as there
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    data = {"val_tokens": 2000, **({"val_bytes": val_bytes} if val_bytes else {})}
    (run / "run.json").write_text(json.dumps({
        "name": "iso", "variant": variant, "seed": seed, "commit": "abc123def4567", "dirty": False, "data": data,
        "training": {"variant": variant, "capacity": None if variant == "standard" else 0.125, "device": "cpu",
                     "precision": "fp32", "world_size": 1, "total_steps": steps, "tokens_per_step": TOKENS_PER_STEP,
                     "parameters": params, "flops_per_token": fpt, "flop_ratio_vs_dense": 1.0, "seq_len": 16,
                     "epochs": 0.5,
                     "model_config": {"num_hidden_layers": 4, "hidden_size": hidden, "vocab_size": VOCAB,
                                      "tie_word_embeddings": tied}}}))
    last = steps // 2 if unfinished else steps
    lines = []
    for step in sorted({0, steps // 2, last}):
        loss = final + (steps - step) / steps
        lines.append({"kind": "eval", "step": step, "tokens_seen": step * TOKENS_PER_STEP,
                      "train_flops": step * TOKENS_PER_STEP * fpt, "done": step == steps, "val_loss": loss,
                      "val_loss_topk": loss - 0.01, "routing_mode": "topk" if variant == "standard" else "causal"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
