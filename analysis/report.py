"""`dtlab report`: run and sweep directories into one self-contained HTML report, plus CSV and
Markdown tables. Every number in it is recomputed from the runs' own files."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dtlab.dashboards.layout import GENERATOR, Section, render

from . import figures, isoflop, tables
from .loaders import RunSet, load, version_problem


@dataclass
class Report:
    html: Path
    markdown: Path
    tables_dir: Path
    charts: int
    problems: list[str]
    closing: pd.DataFrame | None = None  # the terminal's table (`tables.closing`)

    def table_text(self) -> str:
        return tables.text_table(self.closing if self.closing is not None else pd.DataFrame())


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


def _sweep_space(paths: list[Path]) -> dict[str, Any]:
    for p in paths:
        for f in [p / "sweep.json", *p.glob("*/sweep.json")] if p.is_dir() else []:
            if f.is_file():
                try:
                    return json.loads(f.read_text()).get("search_space", {})
                except json.JSONDecodeError:
                    pass
    return {}


STUDY_FILES = ("optuna.journal", "optuna.db")  # a sweep's Optuna study: the journal file; SQLite before it


def _studies(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        for folder in [p, *sorted(p.glob("*/"))] if p.is_dir() else []:
            study = next((folder / n for n in STUDY_FILES if (folder / n).is_file()), None)
            if study is not None:
                found.append(study)
    return found


def _importance(runs: pd.DataFrame, space: dict[str, Any], studies: Sequence[Path]) -> pd.DataFrame:
    """From the sweeps' Optuna studies (one trial per configuration) where there are any, else the runs."""
    study = pd.concat([tables.study_trials(db) for db in studies]) if studies else pd.DataFrame()
    return tables.importances(study if not study.empty else runs, space)


def _relabel(runs: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    if not labels or runs.empty:
        return runs
    runs = runs.copy()
    runs["label"] = [labels.get(r, lab) for r, lab in zip(runs["run_id"], runs["label"], strict=True)]
    return runs


def build_sections(rs: RunSet, space: dict[str, Any], studies: Sequence[Path] = (),
                   isoflops: Sequence[isoflop.Isoflop] = ()) -> tuple[list[Section], dict[str, pd.DataFrame]]:
    labels = {k: v for study in isoflops for k, v in study.labels.items()}
    runs = _relabel(tables.results(rs.runs), labels)
    swept = runs["params"].notna().any()
    if swept:  # a trial stopped early has a loss from fewer steps: compared, it would look worse or better
        runs = runs[runs["done"].astype(bool)]
    final = tables.final_loss(runs)
    speed = tables.speed(runs, rs.benches)
    best = tables.best_configs(runs)
    imp = _importance(runs, space, studies) if swept else pd.DataFrame()
    facts = tables.facts(_relabel(tables.label_runs(rs.runs), labels))
    out: dict[str, pd.DataFrame] = {"final_loss": final, "speed": speed, "best_configs": best,
                                    "importance": imp, "runs": facts}
    first: dict[str, pd.DataFrame] = {}  # an isoFLOP study's tables come first, as its sections do
    s = [section for i, study in enumerate(isoflops)
         for section in _isoflop_sections(study, first, f"_{i + 1}" if len(isoflops) > 1 else "")]
    out = {**first, **out}
    curves = figures.val_loss_curves(rs.evals, runs)
    s.append(Section("Validation loss", "LM loss on the fixed validation set (aux losses excluded), per run, "
                     "coloured by variant; routed models in causal routing. Then the final loss per variant: "
                     "mean, a 95% Student-t interval when there are two seeds or more, the training-mode "
                     "(top-k) loss beside it, and whether the difference from Standard (and from the dense "
                     "control) is established: not when a side has a single seed, the difference is within the "
                     "seed-to-seed spread, or Welch's 95% interval of the difference holds 0. Runs of different "
                     "hyperparameters are not seeds: where a variant has several configurations (a sweep), its "
                     "headline is its best finished configuration, the mean and interval over that configuration's "
                     "seeds, and the range of its configurations' means is shown apart, as the spread over "
                     "configurations.",
                     [x for x in (curves, figures.final_loss_bars(final), final) if x is not None]))
    s.append(Section("Loss against compute", "Final validation loss against training FLOPs (forward + backward, "
                     "counted from the config); the dashed line is the Pareto front. Standard runs shallower than "
                     "the rest are compute-matched dense controls (diamonds).",
                     [figures.pareto(runs) or "no run has both a final loss and a FLOP count"]))
    s.append(Section("Speed and memory", "Median training tokens/s of each variant's runs, the time per token "
                     "relative to Standard next to the FLOP ratio, and peak memory (GPU runs: allocated; CPU "
                     "runs: resident set); then `dtlab bench` files found in these directories, decode "
                     "benchmarks (`--decode`: generated tokens/s, routed blocks at their realised capacity) "
                     "included. Ratios compare runs of one machine only.",
                     [x for x in (figures.speed_bars(speed), speed) if x is not None]))
    s += _routing_sections(rs, runs)
    tasks = tables.downstream(runs, rs.downstream)
    if not tasks.empty:
        out["downstream"] = tasks
        s.append(Section("Downstream tasks", "lm-evaluation-harness scores of each run's best checkpoint (`dtlab "
                         "eval`), always in causal routing (top-k routing would look at the answers): mean over "
                         "seeds with a 95% Student-t interval when there are two or more; a single run shows "
                         "lm-eval's standard error. The shipped offline tasks come from the builtin corpus, so "
                         "a model trained on it has seen their text.",
                         [x for x in (tasks, figures.task_vs_flops(runs, rs.downstream)) if x is not None]))
    shown = tables.samples(runs, rs.samples)
    if not shown.empty:
        out["samples"] = shown
        s.append(Section("Samples", "Greedy continuations of fixed prompts by each variant's best checkpoint "
                         "(first seed), generated with the KV cache in causal routing, as `dtlab sample` does.",
                         [shown]))
    s += _sweep_sections(rs, runs, best, imp, out)
    s.append(Section("Facts of each run", "Device, precision, the routing modes its evaluations used, seed, tokens "
                     "seen and the git commit (dirty: uncommitted changes when it ran).", [facts]))
    return s, out


ISOFLOP_BLURB = (
    "At each training-compute budget, models of several sizes were trained to exactly that budget (the "
    "schedule spanning each run). Each point is a finished run's final validation loss (causal routing for "
    "routed models) against its parameters; the line is a quadratic in log parameters fitted with a Huber "
    "loss, so that one bad run does not carry it. An optimum (star, with the 95% bootstrap interval over "
    "the runs) is shown only where the sizes tried bracket it: a larger loss on both sides. Elsewhere the "
    "optimum lies beyond the sizes tried (triangle, pointing where), a bound with the sizes to add. The "
    "table gives every budget and variant against parameters with and without the embeddings and against "
    "training tokens; then the compute-optimal loss and size as power laws in C, and what is established.")


def _isoflop_sections(study: isoflop.Isoflop, out: dict[str, pd.DataFrame], suffix: str) -> list[Section]:
    """An isoFLOP study: its curves, the optima per budget and variant, the power laws, the verdicts."""
    out[f"isoflop_optima{suffix}"] = study.optima
    out[f"isoflop_points{suffix}"] = study.points
    out[f"isoflop_power_laws{suffix}"] = study.laws
    out[f"isoflop_verdicts{suffix}"] = pd.DataFrame({"verdict": study.sentences})
    shown = [c for c in ("budget", "variant", "axis", "optimum [95%] or bound", "loss at optimum [95%]",
                         "loss_bpb", "sizes", "points", "note") if c in study.optima]
    curves = figures.isoflop_curves(study.points, study.optima)
    frontier = figures.compute_optimal_loss(study.optima, study.laws)
    return [
        Section(f"isoFLOP study: {study.root.name}", ISOFLOP_BLURB,
                [*study.sentences, curves or "no finished runs to plot",
                 study.optima[shown] if shown else "no budget could be fitted"]),
        Section("Compute-optimal loss and size across budgets",
                "Per variant, the bracketed optima against the budget C, with L*(C) = A C^s and N*(C) = k C^e "
                "fitted in log-log (an interval of the exponent needs three budgets or more).",
                [x for x in (frontier, study.laws if not study.laws.empty else None) if x is not None]
                or ["no variant has a bracketed optimum at a budget"]),
    ]


def _sweep_sections(rs: RunSet, runs: pd.DataFrame, best: pd.DataFrame, imp: pd.DataFrame,
                    out: dict[str, pd.DataFrame]) -> list[Section]:
    """A sweep's best configurations, what mattered, and every trial at a common step."""
    if not runs["params"].notna().any():
        return [Section("Best run per variant", "", [best])]
    s = [Section("Sweep: best configurations and what mattered",
                 "The best configuration per variant (the mean over its seeds) with its hyperparameters, and "
                 "Optuna's fANOVA importance of each swept hyperparameter for the final validation loss.",
                 [best, imp if not imp.empty else "too few finished trials to estimate importance"])]
    common = tables.common_step(tables.results(rs.runs), rs.evals)
    if not common.empty:
        out["common_step"] = common
        s.append(Section("Sweep: every trial at a common step",
                         f"Each trial's validation loss (the mean over its seeds) at step {common['step'].iloc[0]}, "
                         "the last step every trial that did not diverge was evaluated at: the finished trials and "
                         "those ASHA stopped, side by side at equal training.", [common]))
    return s


def _routing_sections(rs: RunSet, runs: pd.DataFrame) -> list[Section]:
    """Which tokens the routed blocks took, and the routers' statistics over training."""
    if not runs["variant"].isin(["mod", "dtf"]).any():
        return [Section("Routing", "", ["no routed (MoD or DTF) runs in these directories"])]
    over = figures.stat_over_training
    stats = [
        over(rs.routing, runs, ["gate_mean"], "Gate mean per layer"),
        over(rs.routing, runs, ["causal_agreement"], "Causal routing agrees with top-k (mean over layers)",
             per_layer=False),
        over(rs.routing, runs, ["s_ce", "s_cu"], "DTF: S_CE and S_CU (mean over layers)", ("dtf",), per_layer=False),
        over(rs.routing, runs, ["temp_ce", "temp_cu"], "DTF: temperatures (softplus(beta), or scheduled)", ("dtf",)),
    ]
    return [
        Section("Routing", "Which tokens the routed blocks took: by layer (causal routing shows the realised "
                "capacity) and by position in the sequence.",
                [figures.selected_by_layer(rs.routing, runs) or "no routing statistics recorded",
                 *figures.selected_by_position(rs.positions, runs)]),
        Section("Router statistics over training", "Gate mean and causal-vs-top-k agreement of the best run per "
                "variant, and DTF's surprise gates and temperatures.",
                [x for x in stats if x is not None] or ["no routing statistics in the training records"]),
    ]


def _md_text(text: str) -> str:
    """Text from run directories, safe in Markdown: HTML-like strings are shown, never interpreted."""
    return html.escape(text, quote=False)


def _markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "_no data_\n"

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.4g}"
        return _md_text(str(v)).replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")  # one line per row

    head = "| " + " | ".join(cell(str(c)) for c in df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_path(out: Path) -> Path:
    return out.with_name(f".{out.stem}.dtlab-report.json")


def _targets(out: Path) -> tuple[Path, Path]:
    """(the Markdown file, the tables folder) that go with the HTML file `out`."""
    return out.with_suffix(".md"), out.with_name(out.stem + "_tables")


def check_report_targets(out: Path, tables: list[str] | None = None, force: bool = False) -> None:
    """Refuse to replace anything dtlab did not write there: ownership is the manifest of the files
    an earlier report wrote, with their hashes (a file changed since is the user's now), never the
    file's contents. `tables`: the CSV names about to be written (None: whatever the folder holds)."""
    if out.is_dir():
        raise ReportError(f"--out {out}: is a directory; expected the path of an .html file")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"--out {out}: expected a path ending in .html")
    markdown, tables_dir = _targets(out)
    if tables_dir.exists() and not tables_dir.is_dir():
        raise ReportError(f"{tables_dir} is a file; the report's tables go in a folder of that name")
    manifest = {}
    if _manifest_path(out).is_file():
        try:
            manifest = json.loads(_manifest_path(out).read_text()).get("files", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            manifest = {}
    names = tables if tables is not None else ([p.name for p in tables_dir.iterdir()] if tables_dir.is_dir() else [])
    for path in [out, markdown, *(tables_dir / n if n.endswith(".csv") else tables_dir / f"{n}.csv" for n in names)]:
        if force or not path.exists():
            continue
        key = str(path.relative_to(out.parent))
        if path.is_dir() or manifest.get(key) != _sha256(path):
            raise ReportError(f"{path} exists and was not written by dtlab report (or was changed since); "
                              "choose another --out or pass --force to replace it")


def write_report(paths: Sequence[str | Path], out: str | Path | None = None, force: bool = False) -> Report:
    """The report of every run under `paths`: `out` (HTML), its Markdown twin and CSV tables."""
    import plotly.offline

    roots = [Path(p) for p in paths]
    out = Path(out) if out else (roots[0] / "report.html" if len(roots) == 1 and roots[0].is_dir()
                                 else Path("report.html"))
    check_report_targets(out, force=force)
    rs = load(roots)
    if rs.empty:
        why = "; ".join(rs.problems)
        raise ReportError(f"no runs found under {', '.join(map(str, roots))}: a run directory holds metrics.jsonl "
                          f"(dtlab train, sweep or run writes one){'; ' + why if why else ''}")
    problems = list(rs.problems)
    studies = []
    for root in isoflop.find_studies(roots):
        try:
            studies.append(isoflop.analyse(root, rs.runs))
        except isoflop.IsoflopError as err:
            problems.append(f"isoFLOP study not analysed: {err}")
    problems += [p for study in studies for p in study.problems]
    in_study = {r for study in studies for r in study.labels}
    if studies and set(rs.runs["run_id"]) <= in_study:  # sizes and steps differ by design: the rest must not
        problems = [p for p in problems if p != version_problem(rs.runs)]
        if (line := version_problem(rs.runs, "spec_version_any_length")) is not None:
            problems.append(line.replace("spec versions (data, shape or training settings differ)",
                                         "spec versions beyond their sizes and steps (data or training settings "
                                         "differ)"))
    problems += tables.repeated_data(rs.runs)
    sections, frames = build_sections(rs, _sweep_space(roots), _studies(roots), studies)
    stopped = (rs.runs[rs.runs["params"].notna() & ~rs.runs["done"].astype(bool) & rs.runs["diverged"].isna()]
               if "params" in rs.runs else rs.runs.iloc[0:0])
    if len(stopped):  # a replicate trial's seeds stop together: counted once
        steps = sorted({int(s) for s in stopped["final_step"].dropna()})
        n = stopped["trial_id"].fillna(stopped["run_id"]).nunique()
        problems.append(f"{n} trial(s) stopped early by ASHA (at step {', '.join(map(str, steps))}) are "
                        "left out of the loss comparisons, which compare finished trials only")
    check_report_targets(out, list(frames), force)
    subtitle = f"{len(rs.runs)} run(s) from {', '.join(map(str, roots))} · generated {time.strftime('%Y-%m-%d %H:%M')}"
    lead = lead_sentence(rs.runs)
    page, charts = render("dtlab comparison report", subtitle, sections, problems, plotly.offline.get_plotlyjs(),
                          lead=lead)
    markdown, tables_dir = _targets(out)
    md = [f"# dtlab comparison report\n\n{_md_text(subtitle)}\n\n{_md_text(lead)}\n"]
    if problems:
        md.append("## What is missing or odd\n\n" + "".join(f"- {_md_text(p)}\n" for p in problems))
    md += [f"## {name.replace('_', ' ')}\n\n{_markdown(df)}" for name, df in frames.items()]
    written = _write_all(out, page, markdown, "\n".join(md), tables_dir, frames)
    _manifest_path(out).write_text(json.dumps({"generator": GENERATOR, "files": written}, indent=1))
    runs = _relabel(tables.results(rs.runs), {k: v for study in studies for k, v in study.labels.items()})
    closing = tables.closing(runs, per_run=bool(runs["params"].notna().any()))
    return Report(out, markdown, tables_dir, charts, problems, closing)


def _write_all(out: Path, page: str, markdown: Path, md: str, tables_dir: Path,
               frames: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Write the files; returns their hashes by path relative to the report's folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    markdown.write_text(md)
    tables_dir.mkdir(exist_ok=True)
    for name, df in frames.items():
        df.to_csv(tables_dir / f"{name}.csv", index=False)
    files = [out, markdown, *(tables_dir / f"{name}.csv" for name in frames)]
    return {str(p.relative_to(out.parent)): _sha256(p) for p in files}
