"""`dtlab report`: run and sweep directories into one self-contained HTML report, plus CSV and
Markdown tables. Every number in it is recomputed from the runs' own files."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dtlab.dashboards.layout import GENERATOR, Section, render

from . import figures, tables
from .loaders import RunSet, load


@dataclass
class Report:
    html: Path
    markdown: Path
    tables_dir: Path
    charts: int
    problems: list[str]


HEADLINE = ("Validation losses of routed models (MoD, DTF) are in causal routing, the routing a model can use "
            "token by token; their top-k losses, which look ahead within the row, appear beside them as "
            "training-mode figures.")


def lead_sentence(runs: pd.DataFrame) -> str:
    """What the headline losses are, said first; runs whose routed losses are top-k are named."""
    if runs.empty or "variant" not in runs:
        return ""
    routed = runs[runs["variant"].isin(["mod", "dtf"])]
    if routed.empty:
        return "No routed models here: every loss is a dense model's validation loss."
    topk = sorted(routed.loc[routed["headline_mode"] != "causal", "run_id"])
    if not topk:
        return HEADLINE
    return (HEADLINE + f" Except {', '.join(topk[:8])}{' ...' if len(topk) > 8 else ''}: evaluated without causal "
            "routing (training.eval_causal: false), their headline is the top-k loss.")


class ReportError(ValueError):
    """The report cannot be written where asked (it would replace something not made by dtlab)."""


def _sweep_space(paths: list[Path]) -> dict:
    for p in paths:
        for f in [p / "sweep.json", *p.glob("*/sweep.json")] if p.is_dir() else []:
            if f.is_file():
                try:
                    return json.loads(f.read_text()).get("search_space", {})
                except json.JSONDecodeError:
                    pass
    return {}


def build_sections(rs: RunSet, space: dict) -> tuple[list[Section], dict[str, pd.DataFrame]]:
    runs = tables.label_runs(rs.runs)
    final = tables.final_loss(runs)
    speed = tables.speed(runs, rs.benches)
    best = tables.best_configs(runs)
    imp = tables.importances(runs, space) if runs["params"].notna().any() else pd.DataFrame()
    facts = tables.facts(runs)
    routed = runs["variant"].isin(["mod", "dtf"]).any()
    out: dict[str, pd.DataFrame] = {"final_loss": final, "speed": speed, "best_configs": best,
                                    "importance": imp, "runs": facts}
    s = []
    curves = figures.val_loss_curves(rs.evals, runs)
    s.append(Section("Validation loss", "LM loss on the fixed validation set (aux losses excluded), per run, "
                     "coloured by variant; routed models in causal routing. Then the final loss per variant: "
                     "mean, a 95% Student-t interval when there are two seeds or more, the training-mode "
                     "(top-k) loss beside it, and whether the difference from Standard is established: not "
                     "when a side has a single seed or the difference is within the seed-to-seed spread.",
                     [x for x in (curves, figures.final_loss_bars(final), final) if x is not None]))
    s.append(Section("Loss against compute", "Final validation loss against training FLOPs (forward + backward, "
                     "counted from the config); the dashed line is the Pareto front. Standard runs shallower than "
                     "the rest are compute-matched dense controls (diamonds).",
                     [figures.pareto(runs) or "no run has both a final loss and a FLOP count"]))
    s.append(Section("Speed and memory", "Median training tokens/s of each variant's runs, the time per token "
                     "relative to Standard next to the FLOP ratio, and peak memory (GPU runs: allocated; CPU "
                     "runs: resident set). Ratios compare runs of one machine only.",
                     [x for x in (figures.speed_bars(speed), speed) if x is not None]))
    if routed:
        pos = figures.selected_by_position(rs.positions, runs)
        s.append(Section("Routing", "Which tokens the routed blocks took: by layer (causal routing shows the "
                         "realised capacity) and by position in the sequence.",
                         [figures.selected_by_layer(rs.routing, runs) or "no routing statistics recorded", *pos]))
        s.append(Section("Router statistics over training", "Gate mean and causal-vs-top-k agreement of the best "
                         "run per variant, and DTF's surprise gates and temperatures.",
                         [x for x in (
                             figures.stat_over_training(rs.routing, runs, ["gate_mean"], "Gate mean per layer"),
                             figures.stat_over_training(rs.routing, runs, ["causal_agreement"],
                                                        "Causal routing agrees with top-k (mean over layers)",
                                                        per_layer=False),
                             figures.stat_over_training(rs.routing, runs, ["s_ce", "s_cu"],
                                                        "DTF: S_CE and S_CU (mean over layers)", ("dtf",),
                                                        per_layer=False),
                             figures.stat_over_training(rs.routing, runs, ["temp_ce", "temp_cu"],
                                                        "DTF: temperatures (softplus(beta), or scheduled)", ("dtf",)),
                         ) if x is not None] or ["no routing statistics in the training records"]))
    else:
        s.append(Section("Routing", "", ["no routed (MoD or DTF) runs in these directories"]))
    if runs["params"].notna().any():
        s.append(Section("Sweep: best configurations and what mattered",
                         "The best run per variant with its hyperparameters, and Optuna's fANOVA importance of "
                         "each swept hyperparameter for the final validation loss.",
                         [best, imp if not imp.empty else "too few finished trials to estimate importance"]))
    else:
        s.append(Section("Best run per variant", "", [best]))
    s.append(Section("Facts of each run", "Device, precision, the routing modes its evaluations used, seed, tokens "
                     "seen and the git commit (dirty: uncommitted changes when it ran).", [facts]))
    return s, out


def _markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "_no data_\n"

    def cell(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def write_report(paths: list[str | Path], out: str | Path | None = None, force: bool = False) -> Report:
    import plotly.offline

    paths = [Path(p) for p in paths]
    out = Path(out) if out else (paths[0] / "report.html" if len(paths) == 1 and paths[0].is_dir()
                                 else Path("report.html"))
    if out.exists() and not force and GENERATOR not in out.read_text(errors="replace")[:2000]:
        raise ReportError(f"{out} exists and was not written by dtlab report; choose another --out or pass --force")
    rs = load(paths)
    problems = list(rs.problems)
    if rs.empty:
        sections = [Section("No runs", "", [f"no runs found under {', '.join(map(str, paths))}: a run directory "
                                            "holds metrics.jsonl (dtlab train, sweep or run writes one)"])]
        frames: dict[str, pd.DataFrame] = {}
    else:
        sections, frames = build_sections(rs, _sweep_space(paths))
    n_runs = len(rs.runs)
    subtitle = (f"{n_runs} run(s) from {', '.join(map(str, paths))} · generated {time.strftime('%Y-%m-%d %H:%M')}")
    page, charts = render("dtlab comparison report", subtitle, sections, problems, plotly.offline.get_plotlyjs(),
                          lead=lead_sentence(rs.runs))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    tables_dir = out.with_name(out.stem + "_tables")
    tables_dir.mkdir(exist_ok=True)
    md = [f"# dtlab comparison report\n\n{subtitle}\n\n{lead_sentence(rs.runs)}\n"]
    if problems:
        md.append("## What is missing or odd\n\n" + "".join(f"- {p}\n" for p in problems))
    for name, df in frames.items():
        df.to_csv(tables_dir / f"{name}.csv", index=False)
        md.append(f"## {name.replace('_', ' ')}\n\n{_markdown(df)}")
    markdown = out.with_suffix(".md")
    markdown.write_text("\n".join(md))
    return Report(out, markdown, tables_dir, charts, problems)
