"""What each report figure plots: run directories written by hand with known records, loaded as the
report loads them, and every trace's data checked against values computed here from the raw JSON
records (plain Python, not the loaders' pandas). No torch, no training."""

import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dtlab.analysis import figures, tables
from dtlab.analysis.loaders import load
from tests.analysis.fixtures import SPEC
from tests.records import evals, records

T = 16  # positions in a sequence
ROUTED_LAYERS = ("1", "3", "10")  # "10" sorts before "3" as text: the figures must order layers as numbers
STEPS = (0, 10, 20)
TOKENS_PER_STEP = 64
DTF_STATS = ("s_ce", "s_cu", "temp_ce", "temp_cu")

# The experiment: run -> (variant, seed, layers, capacity, flops per token, loss offset, tokens/s by logged step)
EXPERIMENT = {
    "standard-seed0": ("standard", 0, 12, None, 1.0e6, 0.00, (1000.0, 1200.0)),
    "standard-seed1": ("standard", 1, 12, None, 1.0e6, 0.13, (900.0, 1000.0)),
    "control": ("standard", 0, 6, None, 0.5e6, 0.40, (2000.0, 2100.0)),
    "mod-seed0": ("mod", 0, 12, 0.125, 0.6e6, 0.21, (1500.0, 1700.0)),
    "mod-seed1": ("mod", 1, 12, 0.125, 0.6e6, 0.05, (1400.0, 1450.0)),
    "mod-seed2": ("mod", 2, 12, 0.125, 0.6e6, -0.50, (1300.0, 1350.0)),  # the best loss, but it diverged
    "dtf-seed0": ("dtf", 0, 12, 0.25, 0.62e6, 0.09, (1350.0, 1250.0)),
}
DIVERGED = {"mod-seed2"}
LABEL = {"standard-seed0": "standard", "standard-seed1": "standard", "control": "dense control (6 layers)",
         "mod-seed0": "mod c=0.125", "mod-seed1": "mod c=0.125", "dtf-seed0": "dtf c=0.25",
         "a-standard": "standard", "b-standard": "standard"}  # the last two: a test of their own


def write_run(root: Path, name: str, variant: str, seed: int = 0, layers: int = 12, capacity: float | None = None,
              fpt: float = 1e6, offset: float = 0.0, tps: tuple[float, ...] = (1000.0, 1000.0),
              steps: tuple[int, ...] = STEPS, tokens_seen: bool = True, causal: bool = True,
              evaluations: bool = True) -> Path:
    """A run directory as the training loop writes it (current record format: `val_loss` is the
    headline, `val_loss_topk` and `val_loss_causal` beside it), every number distinct."""
    rng = random.Random(name)
    run = root / name
    run.mkdir(parents=True)
    spec = json.loads(json.dumps(SPEC))
    spec["model"]["type"], spec["seed"] = variant, seed
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    (run / "run.json").write_text(json.dumps({
        "name": "fx", "variant": variant, "seed": seed, "commit": "abc123def4567", "dirty": False,
        "training": {"variant": variant, "capacity": capacity, "device": "cpu", "precision": "fp32",
                     "world_size": 1, "total_steps": steps[-1], "tokens_per_step": TOKENS_PER_STEP,
                     "parameters": 1000, "flops_per_token": fpt, "flop_ratio_vs_dense": 1.0 if variant == "standard"
                     else fpt / 1e6, "seq_len": T,
                     "model_config": {"num_hidden_layers": layers, "hidden_size": 64}}}))
    routed = variant != "standard"

    def stats(extra: tuple[str, ...] = ()) -> dict:
        return {layer: {s: round(rng.uniform(0.05, 0.95), 6) for s in
                        ("selected_frac", "gate_mean", "gate_std", "causal_agreement", *extra)}
                for layer in ROUTED_LAYERS} if routed else {}

    lines = []
    for i, step in enumerate(steps):
        if step:
            lines.append({"kind": "train", "step": step, "loss": 7.0 - i, "lm_loss": 6.9 - i, "lr": 1e-3,
                          "grad_norm": 1.0, "tokens_per_s": tps[(i - 1) % len(tps)],
                          "tokens_seen": step * TOKENS_PER_STEP,
                          "peak_rss_gib": 0.5, "routing": stats(DTF_STATS if variant == "dtf" else ())})
        if not evaluations:
            continue
        topk = round(5.0 + offset + (steps[-1] - step) * 0.05 + rng.uniform(0, 0.01), 6)
        ev = {"kind": "eval", "step": step, "train_flops": step * TOKENS_PER_STEP * fpt, "flops_per_token": fpt,
              "done": step == steps[-1], "val_loss_topk": topk, "val_ppl_topk": math.exp(topk),
              "routing": {k: {**v, "selected_by_pos": [round(rng.random(), 6) for _ in range(T)]}
                          for k, v in stats().items()}}
        if tokens_seen:
            ev["tokens_seen"] = step * TOKENS_PER_STEP
        if routed and causal:
            loss = round(topk + 0.02 + rng.uniform(0, 0.01), 6)
            ev.update(val_loss_causal=loss, val_ppl_causal=math.exp(loss), routing_causal={
                k: {**v, "selected_by_pos": [round(rng.random(), 6) for _ in range(T)]} for k, v in stats().items()})
        else:
            loss = topk
        ev.update(val_loss=loss, val_ppl=math.exp(loss), routing_mode="causal" if routed and causal else "topk")
        lines.append(ev)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def experiment(root: Path, **kw) -> Path:
    for name, (variant, seed, layers, cap, fpt, offset, tps) in EXPERIMENT.items():
        write_run(root, name, variant, seed, layers, cap, fpt, offset, tps, **kw)
    for name in DIVERGED:
        (root / name / "diverged.json").write_text(json.dumps({"step": 20, "reason": "loss is nan"}))
    return root


def loaded(root: Path):
    """What the report hands the figures: the RunSet, and the runs that are results, labelled."""
    rs = load([root])
    runs = tables.results(rs.runs)
    assert dict(zip(runs["run_id"], runs["label"], strict=True)) == {r: LABEL[r] for r in runs["run_id"]}
    return rs, runs


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    root = experiment(tmp_path_factory.mktemp("figures") / "exp")
    return root, *loaded(root)


def results_ids(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in DIVERGED)


def final(root: Path, run_id: str) -> dict:
    """A run's last evaluation record, straight from its metrics.jsonl."""
    return max(evals(root / run_id), key=lambda r: r["step"])


def best_run(root: Path, label: str) -> str:
    return min((r for r in results_ids(root) if LABEL[r] == label), key=lambda r: final(root, r)["val_loss"])


def hover_run(trace) -> str:
    return trace.hovertemplate.split("<br>")[0]


# ---- validation loss during training -------------------------------------------------------------------------

def test_val_loss_curves_are_each_runs_eval_records(exp):
    root, rs, runs = exp
    fig = figures.val_loss_curves(rs.evals, runs)
    got = {hover_run(t): t for t in fig.data}
    assert sorted(got) == results_ids(root) and len(fig.data) == len(got)  # one trace per run; no diverged run
    for run_id, trace in got.items():
        recs = sorted(evals(root / run_id), key=lambda r: r["step"])
        assert list(trace.x) == [r["tokens_seen"] for r in recs]
        # the headline: causal routing for a routed model, which is not the top-k loss
        assert list(trace.y) == pytest.approx([r["val_loss_causal"] if "val_loss_causal" in r else r["val_loss_topk"]
                                               for r in recs], abs=1e-12)
        assert trace.name == LABEL[run_id] and trace.legendgroup == LABEL[run_id]
    assert fig.layout.xaxis.title.text == "tokens seen"
    # one legend entry per label, one colour per label
    shown = [t.name for t in fig.data if t.showlegend]
    assert sorted(shown) == sorted(set(LABEL.values()))
    colors = {t.name: {u.line.color for u in fig.data if u.name == t.name} for t in fig.data}
    assert all(len(c) == 1 for c in colors.values()) and len({c.pop() for c in colors.values()}) == len(colors)


def test_val_loss_curves_follow_steps_when_a_run_has_no_token_counts(tmp_path):
    write_run(tmp_path, "standard-seed0", "standard", tokens_seen=False)
    write_run(tmp_path, "mod-seed0", "mod", capacity=0.125, fpt=0.6e6, steps=(0, 5, 10, 15))
    rs, runs = loaded(tmp_path)
    fig = figures.val_loss_curves(rs.evals, runs)
    assert fig.layout.xaxis.title.text == "step"
    for trace in fig.data:
        recs = evals(tmp_path / hover_run(trace))
        assert list(trace.x) == [r["step"] for r in recs]
        assert list(trace.y) == pytest.approx([r["val_loss"] for r in recs], abs=1e-12)
    assert sorted(len(t.x) for t in fig.data) == [3, 4]


def test_val_loss_curves_is_none_without_evaluations(tmp_path):
    write_run(tmp_path, "standard-seed0", "standard", evaluations=False)
    rs = load([tmp_path])
    runs = tables.results(rs.runs)
    assert rs.evals.empty and len(rs.steps) == 2
    assert figures.val_loss_curves(rs.evals, runs) is None
    assert figures.val_loss_curves(pd.DataFrame({"run_id": ["x"], "step": [0]}), runs) is None  # no val_loss


# ---- final loss per label ------------------------------------------------------------------------------------

# two-sided 95% Student-t quantiles by degrees of freedom, in closed form (not the code's scipy): with 1 degree
# the t is Cauchy, quantile tan(pi (p - 1/2)); with 2, (2p - 1) / sqrt(2p(1 - p)) = sqrt(2) 0.95 / sqrt(1 - 0.95^2)
T95 = {1: math.tan(0.475 * math.pi), 2: math.sqrt(2) * 0.95 / math.sqrt(1 - 0.95 ** 2)}


def test_final_loss_bars_are_the_mean_and_interval_over_seeds(exp):
    root, rs, runs = exp
    fig = figures.final_loss_bars(tables.final_loss(runs))
    (bars,) = fig.data
    finals: dict[str, list[float]] = {}
    for run_id in results_ids(root):
        finals.setdefault(LABEL[run_id], []).append(final(root, run_id)["val_loss"])
    labels = sorted(finals)
    assert list(bars.x) == labels
    assert list(bars.y) == pytest.approx([statistics.fmean(finals[lab]) for lab in labels], abs=1e-12)
    halves = [T95[len(finals[lab]) - 1] * statistics.stdev(finals[lab]) / math.sqrt(len(finals[lab]))
              if len(finals[lab]) > 1 else 0.0 for lab in labels]
    assert list(bars.error_y.array) == pytest.approx(halves, abs=1e-12)
    assert halves[labels.index("standard")] > 0 and halves[labels.index("mod c=0.125")] > 0  # two seeds each
    assert list(bars.text) == [f"n={len(finals[lab])}" for lab in labels]
    every = [v for vs in finals.values() for v in vs]
    assert list(fig.layout.yaxis.range) == pytest.approx([min(every) * 0.98, max(every) * 1.02])


def test_final_loss_bars_is_none_without_a_final_loss(tmp_path):
    write_run(tmp_path, "standard-seed0", "standard", evaluations=False)
    rs = load([tmp_path])
    assert figures.final_loss_bars(tables.final_loss(tables.results(rs.runs))) is None
    assert figures.final_loss_bars(pd.DataFrame()) is None


def test_final_loss_bars_of_a_sweep_are_the_best_configuration_and_the_spread_over_configurations(tmp_path):
    """A sweep's variant with two configurations (two seeds each): the bar is the better configuration's mean
    over its seeds with its seed interval; the spread over configurations is a trace of its own, the range
    of the configurations' means, never folded into the seed interval."""
    finals = {"a": [], "b": []}
    for config, cap, offset in (("a", 0.2, 0.0), ("b", 0.4, 0.6)):
        for seed in (0, 1):
            run = write_run(tmp_path, f"trial-{config}-{seed}", "mod", seed=seed, capacity=cap,
                            offset=offset + seed / 10)
            (run / "params.json").write_text(json.dumps({"trial_id": config, "seed": seed,
                                                         "params": {"model.type": "mod", "model.mod_capacity": cap}}))
            finals[config].append(final(tmp_path, run.name)["val_loss"])
    assert statistics.fmean(finals["a"]) < statistics.fmean(finals["b"])  # precondition: a is the best
    rs = load([tmp_path])
    table = tables.final_loss(tables.results(rs.runs))
    fig = figures.final_loss_bars(table)
    bars, spread = fig.data
    assert list(bars.x) == ["mod"] and list(bars.y) == pytest.approx([statistics.fmean(finals["a"])], abs=1e-12)
    half = T95[1] * statistics.stdev(finals["a"]) / math.sqrt(2)
    assert list(bars.error_y.array) == pytest.approx([half], abs=1e-12)
    assert list(bars.text) == ["n=2, best of 2 configs"]
    means = sorted(statistics.fmean(v) for v in finals.values())
    assert list(spread.y) == pytest.approx([means[0]]) and list(spread.error_y.array) == pytest.approx(
        [means[1] - means[0]])
    assert "not a seed interval" in spread.name and "best configuration" in fig.layout.title.text
    row = table.iloc[0]
    assert row["configurations"] == 2 and row["runs"] == 2 and json.loads(row["configuration"])[
        "model.mod_capacity"] == 0.2


# ---- loss against compute ------------------------------------------------------------------------------------

def non_dominated(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both FLOPs and loss (at least as good on both, better on one)."""
    return sorted(p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points))


def pareto_points(root: Path, ids: list[str]) -> dict[str, tuple[float, float]]:
    return {r: (final(root, r)["train_flops"], final(root, r)["val_loss"]) for r in ids}


def check_pareto(fig, root: Path, ids: list[str], exact_front: bool = True) -> None:
    """One marker per run at its (training FLOPs, final loss), grouped by label, and the front: exactly
    the non-dominated runs, by FLOPs (or, `exact_front=False`, at least those, and only runs' points)."""
    points = pareto_points(root, ids)
    *per_label, front = fig.data
    assert front.name == "Pareto front" and front.mode == "lines"
    assert sorted(t.name for t in per_label) == sorted({LABEL[r] for r in ids})
    seen = set()
    for trace in per_label:
        assert {LABEL[r] for r in trace.text} == {trace.name}
        for run_id, x, y in zip(trace.text, trace.x, trace.y, strict=True):
            assert (x, y) == pytest.approx(points[run_id], abs=1e-12)
            seen.add(run_id)
        assert trace.marker.symbol == ("diamond" if trace.name.startswith("dense control") else "circle")
    assert sorted(seen) == sorted(ids)
    want = non_dominated(list(points.values()))
    got = list(zip(front.x, front.y, strict=True))
    if exact_front:
        assert list(front.x) == pytest.approx([f for f, _ in want], abs=1e-12)
        assert list(front.y) == pytest.approx([v for _, v in want], abs=1e-12)
    else:
        assert set(want) <= set(got) <= set(points.values())
        assert list(front.x) == sorted(front.x)


def test_pareto_points_are_each_runs_flops_and_final_loss(exp):
    root, rs, runs = exp
    fig = figures.pareto(runs)
    check_pareto(fig, root, results_ids(root), exact_front=False)  # seeds tie in FLOPs here: see below
    assert 1 < len(non_dominated(list(pareto_points(root, results_ids(root)).values()))) < len(results_ids(root))
    assert fig.layout.xaxis.type == "log"


def test_pareto_front_is_exactly_the_non_dominated_runs(tmp_path):
    """One run per configuration (no two at equal FLOPs): DTF costs more than MoD and is worse, so it is
    off the front; the dense control, MoD and Standard are on it."""
    for name, (variant, seed, layers, cap, fpt, offset, tps) in EXPERIMENT.items():
        if name in ("standard-seed0", "control", "mod-seed0", "dtf-seed0"):
            offset = 0.35 if variant == "dtf" else offset  # above MoD's 0.21
            write_run(tmp_path, name, variant, seed, layers, cap, fpt, offset, tps)
    rs, runs = loaded(tmp_path)
    ids = sorted(runs["run_id"])
    check_pareto(figures.pareto(runs), tmp_path, ids)
    front = non_dominated(list(pareto_points(tmp_path, ids).values()))
    assert len(front) == 3 and pareto_points(tmp_path, ["dtf-seed0"])["dtf-seed0"] not in front


def test_pareto_front_holds_exactly_the_non_dominated_runs_at_equal_flops(tmp_path):
    """Seeds of one configuration have equal FLOPs: the worse seed is dominated, whichever is read first."""
    write_run(tmp_path, "a-standard", "standard", offset=0.3)  # read first, and worse than its twin
    write_run(tmp_path, "b-standard", "standard", offset=0.0)
    write_run(tmp_path, "mod-seed0", "mod", capacity=0.125, fpt=0.6e6, offset=0.5)
    rs, runs = loaded(tmp_path)
    points = pareto_points(tmp_path, ["a-standard", "b-standard", "mod-seed0"])
    assert points["a-standard"][0] == points["b-standard"][0] and points["a-standard"][1] > points["b-standard"][1]
    check_pareto(figures.pareto(runs), tmp_path, ["a-standard", "b-standard", "mod-seed0"])


def test_pareto_is_none_without_flops(tmp_path):
    write_run(tmp_path, "standard-seed0", "standard", steps=(0,))  # one evaluation, at step 0: no FLOPs yet
    rs, runs = loaded(tmp_path)
    assert runs["train_flops"].tolist() == [0] and figures.pareto(runs) is None


# ---- downstream tasks ----------------------------------------------------------------------------------------

TASKS = {"standard-seed0": {"arc": 0.31, "hella": 0.52}, "standard-seed1": {"arc": 0.33, "hella": 0.5},
         "mod-seed0": {"arc": 0.29}, "dtf-seed0": {"arc": 0.35, "hella": 0.55}}


def write_tasks(root: Path, scores: dict[str, dict[str, float]]) -> None:
    for run_id, tasks in scores.items():
        rows = [{"task": task, "metric": metric, "value": value + bump, "stderr": 0.01, "routing_mode": "causal",
                 "step": 20, "limit": 100, "samples": 100}
                for task, value in tasks.items() for metric, bump in (("acc", 0.0), ("acc_norm", 0.07))]
        (root / run_id / "eval_tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_task_vs_flops_is_each_runs_accuracy_at_its_flops(tmp_path):
    root = experiment(tmp_path)
    write_tasks(root, TASKS)
    rs, runs = loaded(root)
    fig = figures.task_vs_flops(runs, rs.downstream)
    want: dict[str, dict[str, tuple[float, float]]] = {}  # trace name -> run -> (flops, accuracy)
    for run_id in TASKS:
        for r in records(root / run_id / "eval_tasks.jsonl"):
            if r["metric"] == "acc":
                want.setdefault(f"{LABEL[run_id]}: {r['task']}", {})[run_id] = (final(root, run_id)["train_flops"],
                                                                              r["value"])
    assert sorted(t.name for t in fig.data) == sorted(want) and len(fig.data) == len(want)
    for trace in fig.data:
        got = {r: (x, y) for r, x, y in zip(trace.text, trace.x, trace.y, strict=True)}
        assert sorted(got) == sorted(want[trace.name])
        for run_id, point in got.items():
            assert point == pytest.approx(want[trace.name][run_id], abs=1e-12)
    # one colour per label, one symbol per task
    assert len({t.marker.color for t in fig.data if t.name.startswith("standard:")}) == 1
    assert len({t.marker.symbol for t in fig.data if t.name.endswith(": arc")}) == 1
    assert {t.marker.symbol for t in fig.data if t.name.endswith(": arc")} != \
        {t.marker.symbol for t in fig.data if t.name.endswith(": hella")}


def test_task_vs_flops_is_none_without_accuracies(exp, tmp_path):
    root, rs, runs = exp
    assert rs.downstream.empty and figures.task_vs_flops(runs, rs.downstream) is None
    write_run(tmp_path, "standard-seed0", "standard")
    (tmp_path / "standard-seed0" / "eval_tasks.jsonl").write_text(json.dumps(
        {"task": "arc", "metric": "acc_norm", "value": 0.3, "step": 20}) + "\n")
    rs, runs = loaded(tmp_path)
    assert len(rs.downstream) == 1 and figures.task_vs_flops(runs, rs.downstream) is None


# ---- speed ---------------------------------------------------------------------------------------------------

def test_speed_bars_are_the_flop_and_time_ratios_to_standard(exp, tmp_path):
    root, rs, runs = exp
    bench = [{"variant": "mod", "capacity": 0.125, "tokens_per_s": 99.0, "flop_ratio_vs_dense": 0.9,
              "step_ratio_vs_dense": 7.0, "device": "cpu", "preset": "debug"}]
    fig = figures.speed_bars(tables.speed(runs, pd.DataFrame(bench)))  # bench rows are not bars
    flops, times = fig.data
    assert flops.name == "FLOP ratio vs dense" and times.name == "time per token vs dense (measured)"
    ids = results_ids(root)
    labels = sorted({LABEL[r] for r in ids})
    info = {r: json.loads((root / r / "run.json").read_text())["training"] for r in ids}
    tps = {r: statistics.median(t["tokens_per_s"] for t in records(root / r, "train")) for r in ids}
    dense_fpt = statistics.median(info[r]["flops_per_token"] for r in ids if LABEL[r] == "standard")
    dense_tps = statistics.median(tps[r] for r in ids if LABEL[r] == "standard")
    of = {lab: [r for r in ids if LABEL[r] == lab] for lab in labels}
    assert list(flops.x) == labels and list(times.x) == labels
    assert list(flops.y) == pytest.approx(
        [statistics.fmean(info[r]["flops_per_token"] / dense_fpt for r in of[lab]) for lab in labels], abs=1e-12)
    assert list(times.y) == pytest.approx(
        [dense_tps / statistics.median(tps[r] for r in of[lab]) for lab in labels], abs=1e-12)
    assert dict(zip(flops.x, flops.y, strict=True))["dense control (6 layers)"] == pytest.approx(0.5)  # not 1
    assert fig.layout.barmode == "group"


def test_speed_bars_is_none_without_measured_speed(tmp_path):
    write_run(tmp_path, "standard-seed0", "standard", steps=(0,))  # an evaluation, no training record
    rs, runs = loaded(tmp_path)
    table = tables.speed(runs, rs.benches)
    assert len(table) == 1 and figures.speed_bars(table) is None
    assert figures.speed_bars(pd.DataFrame()) is None


# ---- routing: selected fraction by layer and by position -----------------------------------------------------

def layer_order(layers) -> list[int]:
    return sorted(int(k) for k in layers)


def test_selected_by_layer_is_the_last_evaluations_causal_fraction(exp):
    root, rs, runs = exp
    fig = figures.selected_by_layer(rs.routing, runs)
    (heat,) = fig.data
    routed = [r for r in results_ids(root) if EXPERIMENT[r][0] != "standard"]
    layers = layer_order(ROUTED_LAYERS)
    assert list(heat.y) == [f"{LABEL[r]} · {r}" for r in sorted(routed)]
    assert list(heat.x) == [f"layer {n}" for n in layers]
    want = [[final(root, r)["routing_causal"][str(n)]["selected_frac"] for n in layers] for r in sorted(routed)]
    assert [list(row) for row in heat.z] == [pytest.approx(row, abs=1e-12) for row in want]
    topk = [[final(root, r)["routing"][str(n)]["selected_frac"] for n in layers] for r in sorted(routed)]
    assert want != topk  # the two modes differ here: the test can tell which one is shown
    assert "causal routing" in fig.layout.title.text


def test_selected_by_layer_shows_top_k_when_no_run_has_causal_routing(tmp_path):
    write_run(tmp_path, "mod-seed0", "mod", capacity=0.125, fpt=0.6e6, causal=False)
    write_run(tmp_path, "standard-seed0", "standard")
    rs, runs = loaded(tmp_path)
    (heat,) = figures.selected_by_layer(rs.routing, runs).data
    assert list(heat.y) == ["mod c=0.125 · mod-seed0"]
    assert list(heat.z[0]) == pytest.approx(
        [final(tmp_path, "mod-seed0")["routing"][str(n)]["selected_frac"] for n in layer_order(ROUTED_LAYERS)])


def test_selected_by_layer_is_none_without_routing(tmp_path):
    write_run(tmp_path, "standard-seed0", "standard")
    rs, runs = loaded(tmp_path)
    assert rs.routing.empty and figures.selected_by_layer(rs.routing, runs) is None
    write_run(tmp_path, "mod-seed0", "mod", capacity=0.125, evaluations=False)  # training statistics only
    rs, runs = loaded(tmp_path)
    assert not rs.routing.empty and figures.selected_by_layer(rs.routing, runs) is None


@pytest.mark.parametrize("bins", [64, 4])
def test_selected_by_position_is_the_best_runs_last_top_k_fraction(exp, bins):
    root, rs, runs = exp
    figs = figures.selected_by_position(rs.positions, runs, bins=bins)
    labels = sorted({LABEL[r] for r in results_ids(root) if EXPERIMENT[r][0] != "standard"})
    assert len(figs) == len(labels)
    width = T // min(bins, T)
    for label, fig in zip(labels, figs, strict=True):
        best = best_run(root, label)
        assert fig.layout.title.text.startswith(f"{label}: ") and f"({best}," in fig.layout.title.text
        (heat,) = fig.data
        by_pos = final(root, best)["routing"]  # top-k routing; the causal one is recorded too, and differs
        layers = layer_order(by_pos)
        assert list(heat.y) == [f"layer {n}" for n in layers]
        assert list(heat.x) == list(range(0, T, width))
        want = [[statistics.fmean(by_pos[str(n)]["selected_by_pos"][b:b + width]) for b in range(0, T, width)]
                for n in layers]
        assert [list(row) for row in heat.z] == [pytest.approx(row, abs=1e-12) for row in want]
    assert "mod-seed1" in figs[labels.index("mod c=0.125")].layout.title.text  # the better seed; not the diverged


def test_selected_by_position_is_empty_without_positions(tmp_path):
    write_run(tmp_path, "standard-seed0", "standard")
    rs, runs = loaded(tmp_path)
    assert rs.positions.empty and figures.selected_by_position(rs.positions, runs) == []


# ---- router statistics over training -------------------------------------------------------------------------

def train_series(root: Path, run_id: str, stat: str) -> dict[int, tuple[list[int], list[float]]]:
    """layer -> (steps, values) of one statistic in a run's training records."""
    recs = sorted(records(root / run_id, "train"), key=lambda r: r["step"])
    return {int(k): ([r["step"] for r in recs], [r["routing"][k][stat] for r in recs]) for k in ROUTED_LAYERS}


def test_stat_over_training_per_layer_is_the_best_runs_training_records(exp):
    root, rs, runs = exp
    fig = figures.stat_over_training(rs.routing, runs, ["gate_mean"], "Gate mean per layer")
    want = {}
    for label in ("mod c=0.125", "dtf c=0.25"):
        for layer, series in train_series(root, best_run(root, label), "gate_mean").items():
            want[f"{label} gate_mean L{layer}"] = series
    assert sorted(t.name for t in fig.data) == sorted(want) and len(fig.data) == len(want)
    for trace in fig.data:
        steps, values = want[trace.name]
        assert list(trace.x) == steps and list(trace.y) == pytest.approx(values, abs=1e-12)
        assert hover_run(trace) == best_run(root, trace.name.split(" gate_mean")[0])
    assert fig.layout.title.text == "Gate mean per layer"


def test_stat_over_training_mean_over_layers(exp):
    root, rs, runs = exp
    fig = figures.stat_over_training(rs.routing, runs, ["s_ce", "s_cu"], "DTF: S_CE and S_CU", ("dtf",),
                                     per_layer=False)
    run_id = best_run(root, "dtf c=0.25")
    assert sorted(t.name for t in fig.data) == ["dtf c=0.25 s_ce", "dtf c=0.25 s_cu"]
    for trace in fig.data:
        stat = trace.name.split()[-1]
        series = train_series(root, run_id, stat)
        steps = series[1][0]
        mean = [statistics.fmean(series[n][1][i] for n in series) for i in range(len(steps))]
        assert list(trace.x) == steps and list(trace.y) == pytest.approx(mean, abs=1e-12)


def test_stat_over_training_is_none_without_the_statistic(exp, tmp_path):
    root, rs, runs = exp
    assert figures.stat_over_training(rs.routing, runs, ["s_ce"], "MoD has no S_CE", ("mod",)) is None
    assert figures.stat_over_training(rs.routing, runs, ["no_such_stat"], "nothing") is None
    write_run(tmp_path, "standard-seed0", "standard")
    rs, runs = loaded(tmp_path)
    assert rs.routing.empty and figures.stat_over_training(rs.routing, runs, ["gate_mean"], "none") is None


def test_every_figure_function_is_tested():
    """A figure added to analysis/figures.py gets a test here."""
    public = {n for n, f in vars(figures).items() if callable(f) and not n.startswith("_")
              and getattr(f, "__module__", "") == figures.__name__}
    tested = {n.split("test_", 1)[1] for n in globals() if n.startswith("test_")}
    untested = {n for n in public if not any(t.startswith(n) for t in tested)}
    assert len(public) >= 8 and not untested, untested


# ---- isoFLOP studies -----------------------------------------------------------------------------------------

def _isoflop(tmp_path):
    """Two budgets x five sizes x Standard and MoD: Standard's optimum bracketed at 1e15 and below the sizes
    tried at 1e16; MoD's bracketed at both."""
    from tests.analysis.fixtures import make_isoflop_study

    sizes = {f"s{i}": (int(1e6 * 2 ** i), 64 + 32 * i) for i in range(5)}

    def loss(variant, budget, params, seed):
        x_star = 5.7 if (variant == "standard" and budget == 1e16) else 6.55
        return 3.0 + 0.8 * (math.log10(params) - x_star) ** 2 + random.Random(f"{variant}{budget}{params}{seed}").gauss(
            0, 0.01)

    root = make_isoflop_study(tmp_path / "iso", [1e15, 1e16], sizes, ["standard", "mod"], [0, 1], loss)
    from dtlab.analysis import isoflop

    return root, isoflop.analyse(root, load([root]).runs, bootstrap=100)


def test_isoflop_curves_are_each_runs_loss_the_fits_and_the_optima(tmp_path):
    root, study = _isoflop(tmp_path)
    fig = figures.isoflop_curves(study.points, study.optima)
    by_name = {}
    for trace in fig.data:
        by_name.setdefault(trace.legendgroup, []).append(trace)
    assert sorted(by_name) == sorted(f"{v} · {b:.3g} FLOPs" for v in ("standard", "mod") for b in (1e15, 1e16))
    info = {json.loads((d / "run.json").read_text())["training"]["parameters"] for d in (root / "runs").iterdir()}
    for name, traces in by_name.items():
        variant, budget = name.split(" · ")[0], float(name.split(" · ")[1].split()[0])
        runs, line, mark = traces
        for run_id, x, y in zip(runs.text, runs.x, runs.y, strict=True):  # each run at its parameters and loss
            rec = final(root / "runs", run_id)
            assert y == rec["val_loss"] and x in info and run_id.startswith(f"{variant}-")
        assert len(runs.x) == 10 and runs.marker.color == line.line.color == mark.marker.color
        # the fitted parabola passes near each size's mean loss (noise 0.01) and its lowest point is the optimum
        row = study.optima[(study.optima["variant"] == variant) & (study.optima["budget"] == budget)
                           & (study.optima["axis"] == "parameters")].iloc[0]
        sizes = pd.DataFrame({"x": runs.x, "y": runs.y}).groupby("x")["y"].mean()
        curve = np.interp(np.log10(sizes.index), np.log10(line.x), line.y)
        assert np.abs(curve - sizes.to_numpy()).max() < 0.03
        if variant == "standard" and budget == 1e16:  # below the sizes tried: a triangle at the smallest, leftward
            assert row["status"] == "below the smallest size tried" and mark.marker.symbol == "triangle-left"
            assert (mark.x[0], mark.y[0]) == (1e6, pytest.approx(sizes.iloc[0]))
        else:
            assert row["status"] == "optimum" and mark.marker.symbol == "star"
            assert (mark.x[0], mark.y[0]) == (row["optimum"], row["loss"])
            assert line.x[int(np.argmin(line.y))] == pytest.approx(row["optimum"], rel=0.05)
            assert mark.error_x.array[0] == pytest.approx(row["optimum_high"] - row["optimum"])
            assert mark.error_x.arrayminus[0] == pytest.approx(row["optimum"] - row["optimum_low"])
    assert fig.layout.xaxis.type == "log"


def test_isoflop_curves_is_none_without_points(tmp_path):
    assert figures.isoflop_curves(pd.DataFrame(), pd.DataFrame()) is None


def test_compute_optimal_loss_is_the_bracketed_optima_and_their_power_law(tmp_path):
    root, study = _isoflop(tmp_path)
    fig = figures.compute_optimal_loss(study.optima, study.laws)
    names = [t.name for t in fig.data]
    law = study.laws.set_index(["variant", "quantity"]).loc[("mod", "optimal loss (nats)")]
    assert names == ["mod", f"mod: {law['law']}", "standard"]  # Standard: one bracketed optimum, no law
    opt = study.optima[(study.optima["axis"] == "parameters") & (study.optima["status"] == "optimum")]
    mod, line, standard = fig.data
    want = opt[opt["variant"] == "mod"].sort_values("budget")
    assert list(mod.x) == [1e15, 1e16] and list(mod.y) == list(want["loss"])
    assert list(mod.error_y.array) == pytest.approx(list(want["loss_high"] - want["loss"]))
    assert list(standard.x) == [1e15]
    assert line.y[0] == pytest.approx(law["coefficient"] * line.x[0] ** law["exponent"])
    assert line.y[-1] == pytest.approx(want["loss"].iloc[-1], rel=1e-9)  # exact through two points
    assert fig.layout.xaxis.type == fig.layout.yaxis.type == "log"


def test_compute_optimal_loss_is_none_without_a_bracketed_optimum(tmp_path):
    assert figures.compute_optimal_loss(pd.DataFrame(), pd.DataFrame()) is None
    root, study = _isoflop(tmp_path)
    nothing = study.optima.assign(status="below the smallest size tried")
    assert figures.compute_optimal_loss(nothing, study.laws) is None
