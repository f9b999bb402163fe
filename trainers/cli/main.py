"""The `dtlab` command."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

log = logging.getLogger(__name__)


def _train(args: argparse.Namespace) -> int:
    from dtlab.analysis import tables
    from dtlab.analysis.loaders import load
    from dtlab.trainers.monitor.progress import RESULT
    from dtlab.trainers.orchestrate.runner import default_run_dir, run_training
    from dtlab.trainers.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    out = args.out or default_run_dir(spec)
    run_training(spec, out=out, resume=args.resume, force=args.force, use_ray=False if args.no_ray else None)
    log.info("\n" + tables.text_table(tables.closing(tables.results(load([out]).runs))), extra=RESULT)
    log.info(f"run: {Path(out).resolve()} (dtlab report {out} compares it with others)", extra=RESULT)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import time

    from dtlab.trainers.monitor.progress import RESULT
    from dtlab.trainers.orchestrate.sweep import run_sweep
    from dtlab.trainers.spec import SpecError, load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.resume and not args.out:
        raise SpecError("--resume needs --out DIR: the sweep to continue")
    out = args.out or f"runs/sweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_sweep(spec, out, resume=args.resume, force=args.force, source=args.spec)
    if (Path(out) / "trials").is_dir():
        from dtlab.analysis import tables
        from dtlab.analysis.loaders import load

        runs = tables.results(load([Path(out) / "trials"]).runs)  # a diverged trial is no result
        log.info("\n" + tables.text_table(tables.closing(runs, per_run=True)), extra=RESULT)
        log.info(f"sweep: {Path(out).resolve()} (summary.json; dtlab report {out} for the report)", extra=RESULT)
    if summary.get("interrupted"):
        print(f"dtlab sweep: interrupted; continue with: dtlab sweep {args.spec} --out {out} --resume", file=sys.stderr)
        return 130
    return _sweep_code("sweep", summary)


def _sweep_code(command: str, summary: dict) -> int:
    """1 when a trial failed or diverged (said once more, last), else 0."""
    counts = summary.get("counts", {})
    bad = {k: counts.get(k, 0) for k in ("failed", "diverged") if counts.get(k, 0)}
    if bad:
        print(f"dtlab {command}: " + ", ".join(f"{n} trial(s) {k}" for k, n in bad.items()) +
              " (summary.json lists them)", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from dtlab.trainers.orchestrate.experiment import run_experiment
    from dtlab.trainers.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if spec.isoflop is not None:  # a spec with an isoflop: section is an isoFLOP study
        return _isoflop(args)
    result = run_experiment(spec, args.out, resume=args.resume, force=args.force,
                            use_ray=False if args.no_ray else None, source=args.spec)
    return _sweep_code("run", result.get("sweep") or {})


def _isoflop(args: argparse.Namespace) -> int:
    from dtlab.trainers.orchestrate.isoflop import run_isoflop
    from dtlab.trainers.spec import SpecError, load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.resume and not args.out:
        raise SpecError("--resume needs --out DIR: the isoFLOP study to continue")
    run_isoflop(spec, args.out, resume=args.resume, force=args.force, use_ray=False if args.no_ray else None,
                source=args.spec)
    return 0


def _add_isoflop(sub) -> None:
    cmd = sub.add_parser("isoflop", help="an isoFLOP study: the spec's sizes x variants x seeds, each trained to "
                                         "each budget of training FLOPs, then the report")
    _debug_flag(cmd)
    cmd.add_argument("spec", help="a spec with an isoflop: section, e.g. experiments/isoflop_smoke.yaml")
    cmd.add_argument("overrides", nargs="*", help="key.path=value, e.g. seeds=[0,1]")
    cmd.add_argument("--out", type=_path, help="study directory (default under runs/)")
    cmd.add_argument("--resume", action="store_true", help="continue: finished runs are kept, the others resumed")
    cmd.add_argument("--force", action="store_true", help="set an existing study in --out aside, start afresh")
    cmd.add_argument("--no-ray", action="store_true", help="train in this process, one run at a time, without Ray")
    cmd.add_argument("-v", "--verbose", action="store_true",
                     help="show every log line instead of progress; without it they go to output.log in --out")
    cmd.set_defaults(func=_isoflop)


def _prepare(args: argparse.Namespace) -> int:
    import time

    from dtlab.trainers.orchestrate.runner import check_out
    from dtlab.trainers.run.data import data_key, load_prepared, prepare_data, prepared_folder
    from dtlab.trainers.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    update: dict[str, object] = {"num_proc": args.workers} if args.workers else {}
    if args.out:
        check_out(Path(args.out), "data")
        update["cache_dir"] = str(Path(args.out).resolve())
    spec_data = spec.data.model_copy(update=update)
    started = time.perf_counter()
    folder = prepared_folder(spec_data, data_key(spec_data))
    done = (folder / "meta.json").is_file()
    if done:
        data = load_prepared(folder)
    elif args.ray:
        from dtlab.trainers.orchestrate.prepare_ray import prepare_with_ray

        data = prepare_with_ray(spec_data, actors=args.workers)
    else:
        data = prepare_data(spec_data)
    meta = data.meta
    shards = sum(len(v) for v in meta.get("shards", {}).values())
    print(f"{meta['tokens']:,} tokens from {meta['documents']:,} documents ({meta['source']}): "
          f"train {meta['train_tokens']:,}, validation {meta['val_tokens']:,} ({meta['split']})")
    print(f"{shards} shards of {meta['dtype']} ({_size(data.path)}), tokenizer {meta['tokenizer']} "
          f"({meta['vocab_size']:,} tokens), block_size {meta['block_size']}")
    engine = meta.get("engine") or f"{meta['workers']} process(es)"
    if done:
        print(f"already prepared ({time.perf_counter() - started:.1f} s, nothing read); prepared in "
              f"{meta['seconds']:,.1f} s at {meta['tokens_per_s']:,.0f} tokens/s with {engine}")
    else:
        print(f"prepared in {meta['seconds']:,.1f} s: {meta['tokens_per_s']:,.0f} tokens/s with {engine}")
    hint = f" (train with data.cache_dir={Path(args.out).resolve()})" if args.out else ""
    print(f"shards: {data.path}{hint}")
    return 0


def _size(folder: Path) -> str:
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return ""


def _report(args: argparse.Namespace) -> int:
    from dtlab.analysis.report import write_report

    report = write_report(args.dirs, args.out, force=args.force)
    for p in report.problems:
        print(f"note: {p}", file=sys.stderr)
    print(report.table_text())
    print(f"report: {report.html} ({report.charts} charts); tables: {report.markdown}, {report.tables_dir}/")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dtlab.trainers.tools.bench import format_table, run_bench, write_rows

    if args.out and Path(args.out).is_dir():
        print(f"dtlab bench: --out {args.out} is a directory; expected the path of a JSON file", file=sys.stderr)
        return 2
    if args.out and Path(args.out).exists() and not args.force:
        print(f"dtlab bench: --out {args.out} already exists; pass --force to replace it", file=sys.stderr)
        return 2
    if args.out:
        _check_writable_file(Path(args.out))  # before the bench runs, not after
    try:
        if args.decode:
            from dtlab.trainers.tools.decode_bench import format_decode_table, run_decode_bench

            variants = [v for v in args.variants if v != "hf-qwen2"]
            rows = run_decode_bench(preset=args.preset, device=args.device,
                                    batches=(args.batch,) if args.batch else (1, 8), prompt=args.prompt_tokens,
                                    new_tokens=args.new_tokens, repeats=args.steps, capacity=min(args.capacities),
                                    variants=tuple(variants))
            table = format_decode_table(rows)
        else:
            rows = run_bench(preset=args.preset, device=args.device, batch=args.batch, seq=args.seq,
                             compile=args.compile, steps=args.steps, warmup=args.warmup,
                             capacities=tuple(args.capacities), variants=tuple(args.variants))
            table = format_table(rows)
    except ValueError as err:
        print(f"dtlab bench: {err}", file=sys.stderr)
        return 2
    print(table)
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {args.out}")
    return 0


def _check_writable_file(path: Path, flag: str = "--out") -> None:
    """A file a command writes at its end can be written there: checked before the work, so that nothing
    runs for minutes and then fails to save."""
    from dtlab.trainers.spec import SpecError

    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise SpecError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"{flag} {path}: {parent} is not writable; choose another {flag}")


def _sample(args: argparse.Namespace) -> int:
    from dtlab.trainers.run.device import detect_device
    from dtlab.trainers.spec import SpecError
    from dtlab.trainers.tools.sample import generate_text, load_run, routed_fractions

    prompt = args.prompt or ""
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise SpecError(f"--prompt-file {args.prompt_file}: not UTF-8 text ({err.reason})") from err
    run = load_run(args.run_dir, device=detect_device(args.device))
    text, ids, prompt_len = generate_text(run, prompt, args.max_new_tokens, args.temperature, args.top_k,
                                          args.top_p, args.seed)
    print(prompt + text)
    if args.stats:
        new = ids.shape[1] - prompt_len
        print(f"\n[{run.checkpoint} (step {run.step}), causal routing, {new} tokens generated]", file=sys.stderr)
        for layer, frac in routed_fractions(run.model, ids, prompt_len).items():
            print(f"  layer {layer}: processed {frac:.3f} of the generated tokens", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dtlab.trainers.monitor.progress import RESULT, current
    from dtlab.trainers.run.device import detect_device
    from dtlab.trainers.spec import SpecError
    from dtlab.trainers.tools.downstream import LOCAL_TASKS, check_tasks, evaluate_run

    # `--tasks ''` is a list of no names, as `--tasks ,` is: refused, never "every default task"
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks is not None else list(LOCAL_TASKS)
    check_tasks(tasks, args.routing, known=False)  # what needs no lm-eval first
    runs = []
    for d in map(Path, args.run_dirs):  # a run, or an experiment or sweep holding runs
        found = [d] if (d / "run.json").is_file() else sorted(p.parent for p in d.rglob("run.json"))
        if not found:
            raise SpecError(f"{d}: no dtlab run here (no run.json in it or below it)")
        runs += found
    _check_eval_outputs(runs, Path(args.out) if args.out else None, args.force)
    device = detect_device(args.device)
    _quiet_lm_eval()
    check_tasks(tasks, args.routing)
    folder = Path(args.out) if args.out else runs[0]
    folder.mkdir(parents=True, exist_ok=True)
    current().capture(folder)  # lm-eval's and git's output goes to output.log there (-v shows it)
    for run in runs:
        for r in evaluate_run(run, tasks, limit=args.limit, batch_size=args.batch_size, out=args.out, device=device):
            value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
            err = "" if r["stderr"] is None else f" ± {r['stderr']:.4f}"
            log.info(f"{run}: {r['task']} {r['metric']} {value}{err} ({r['routing_mode']} routing, step {r['step']})",
                     extra=RESULT)
    return 0


def _check_eval_outputs(runs: list[Path], out: Path | None, force: bool) -> None:
    """Before any work: `--out` can be a folder of results, and no file there is replaced (without
    `--force`), nor written twice by two runs of the same names."""
    from dtlab.trainers.orchestrate.runner import check_out
    from dtlab.trainers.spec import SpecError
    from dtlab.trainers.tools.downstream import results_path

    if out is None:
        return
    check_out(out, "results")
    targets = [results_path(run, out) for run in runs]
    twice = sorted({t.name for t in targets if targets.count(t) > 1})
    if twice:
        raise SpecError(f"--out {out}: two runs would write {twice[0]} (runs of the same names in folders of the "
                        "same name); evaluate them into different --out folders")
    taken = [t for t in targets if t.exists()]
    if taken and not force:
        raise SpecError(f"--out {out}: {taken[0].name} exists" + (f" (and {len(taken) - 1} more)" if len(taken) > 1
                                                                    else "") + "; --force replaces it")


def _quiet_lm_eval() -> None:
    """lm-eval's warnings about a model passed as an object, and its progress bars, say nothing here."""
    import logging
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def _path(text: str) -> str:
    """A path given on the command line: an empty one would quietly mean the current directory or the
    default, so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a path")
    return text


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return value


def _temperature(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0 (0 = greedy)")
    return value


def _probability(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a probability in (0, 1]")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


def _non_negative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def _capacity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a capacity in (0, 1]")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with one line for bad arguments (not the whole usage), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")


def _add_report(sub) -> None:
    report = sub.add_parser("report", help="compare runs and sweeps in one HTML report with CSV/Markdown tables")
    _debug_flag(report)
    report.add_argument("dirs", nargs="+", help="run, sweep or experiment directories")
    report.add_argument("--out", type=_path,
                        help="HTML file (default DIR/report.html for one directory, else report.html)")
    report.add_argument("--force", action="store_true", help="replace an --out file not written by dtlab")
    report.set_defaults(func=_report)


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="time training steps of every variant against transformers' Qwen2")
    _debug_flag(bench)
    bench.add_argument("--preset", help="model shape (default: debug on CPU, 0.5B on CUDA)")
    bench.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: what is there")
    bench.add_argument("--batch", type=_positive, help="default 8")
    bench.add_argument("--seq", type=_positive, help="default 256 on CPU, 2048 on CUDA")
    bench.add_argument("--compile", action="store_true", help="torch.compile every model, the baseline too")
    bench.add_argument("--steps", type=_positive, default=10, help="timed steps (the median is reported)")
    bench.add_argument("--warmup", type=_non_negative, default=3)
    bench.add_argument("--capacities", type=_capacity, nargs="+", default=[0.125, 0.25, 0.5])
    bench.add_argument("--variants", nargs="+", default=["hf-qwen2", "standard", "mod", "dtf"])
    bench.add_argument("--decode", action="store_true",
                       help="time generation instead: prefill and per-token decode with the KV cache, batch 1 and 8 "
                            "(or --batch), at the smallest --capacities; --steps is the number of repeats")
    bench.add_argument("--prompt-tokens", type=_positive, help="--decode: prompt length (default 128 CPU, 512 CUDA)")
    bench.add_argument("--new-tokens", type=_positive, help="--decode: tokens generated (default 64 CPU, 128 CUDA)")
    bench.add_argument("--out", type=_path, help="JSON file for the rows")
    bench.add_argument("--force", action="store_true", help="replace an existing --out file")
    bench.set_defaults(func=_bench)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="downstream tasks with lm-evaluation-harness on runs' best checkpoints "
                                     "(causal routing)")
    _debug_flag(ev)
    ev.add_argument("run_dirs", nargs="+", help="run directories, or experiments holding them")
    ev.add_argument("--tasks", help="comma-separated lm-eval task names (default: the shipped offline tasks "
                                    "dtlab_next_line,dtlab_cloze; hub tasks need the network)")
    ev.add_argument("--limit", type=_positive, help="examples per task (default: all)")
    ev.add_argument("--batch-size", type=_positive, default=8)
    ev.add_argument("--out", type=_path, help="folder for lm-eval's results JSON (default: each run directory)")
    ev.add_argument("--force", action="store_true", help="replace files of the same names already in --out")
    ev.add_argument("-v", "--verbose", action="store_true",
                    help="show lm-eval's own output instead of writing it to output.log (in --out, or the first run)")
    ev.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: what is there")
    ev.add_argument("--routing", default="causal", help="causal only: top-k routing would look at the answers")
    ev.set_defaults(func=_eval)


def _ls(args: argparse.Namespace) -> int:
    from dtlab.trainers.cli.listing import format_listing, listing
    from dtlab.trainers.spec import SpecError

    root = Path(args.dir)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "no such directory"
        raise SpecError(f"{root}: {what} (dtlab ls lists the runs, experiments and sweeps under a directory)")
    rows = listing(root)
    if not rows:
        print(f"no dtlab runs under {root}")
        return 0
    print(format_listing(rows))
    return 0


def _add_ls(sub) -> None:
    ls = sub.add_parser("ls", help="the runs, experiments and sweeps under a directory: status, steps, best "
                                   "validation loss, age")
    _debug_flag(ls)
    ls.add_argument("dir", nargs="?", default="runs", help="default: runs/")
    ls.set_defaults(func=_ls)


def _add_sample(sub) -> None:
    sample = sub.add_parser("sample", help="generate text from a run's best checkpoint (causal routing)")
    _debug_flag(sample)
    sample.add_argument("run_dir", help="a run directory (`dtlab train --out`, or one run of an experiment)")
    given = sample.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="text to continue (default: start of a document)")
    given.add_argument("--prompt-file", help="a UTF-8 file whose text to continue")
    sample.add_argument("--max-new-tokens", type=_positive, default=64)
    sample.add_argument("--temperature", type=_temperature, default=0.0, help="0 (default): greedy")
    sample.add_argument("--top-k", type=_positive, help="sample from the k likeliest tokens")
    sample.add_argument("--top-p", type=_probability, help="nucleus sampling")
    sample.add_argument("--seed", type=_non_negative, default=0)
    sample.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: what is there")
    sample.add_argument("--stats", action="store_true",
                        help="also print, per routed layer, the fraction of generated tokens its block processed")
    sample.set_defaults(func=_sample)


def _plan(args: argparse.Namespace) -> int:
    from dtlab.trainers.spec import SpecError, load_spec
    from dtlab.trainers.tools.plan import (
        device_cluster,
        format_plan,
        parse_cluster,
        plan_runs,
        prepared_here,
        read_bench,
        refusal,
    )

    spec = load_spec(args.spec, args.overrides)
    cluster = parse_cluster(args.cluster) if args.cluster else device_cluster(spec)
    if cluster is None:
        raise SpecError(f"resources.device={spec.resources.device!r}: this machine has no such device; describe the "
                        "cluster the runs go to with --cluster, e.g. --cluster 4x8xH100-80GB")
    bench = read_bench(args.bench) if args.bench else None
    command = "sweep" if spec.sweep else "run" if spec.variants or spec.seeds else "train"
    data = prepared_here(spec) if spec.training.from_scratch or spec.training.max_steps is None else None
    vocab = data.vocab_size if data is not None and spec.training.from_scratch else None
    runs = plan_runs(spec, cluster, command, vocab_size=vocab, rows=None if data is None else len(data.train),
                     bench=bench)
    print(format_plan(runs, spec, cluster, command))
    bad = [r for r in runs if not r.fits]
    for run in bad:
        print(f"dtlab plan: {refusal(run, spec)}", file=sys.stderr)
    return 2 if bad else 0


def _add_plan(sub) -> None:
    plan = sub.add_parser("plan", help="the plan of a spec before any work: devices, strategy, memory per device, "
                                       "steps, tokens, FLOPs, time; runs nothing, writes nothing")
    _debug_flag(plan)
    plan.add_argument("spec", help="experiment spec (YAML), e.g. experiments/sweep_multigpu.yaml")
    plan.add_argument("overrides", nargs="*", help="key.path=value, e.g. training.batch_size=4")
    plan.add_argument("--cluster", help="plan for a described cluster instead of this machine: NODESxGPUSxTYPE, "
                                        "e.g. 4x8xH100-80GB (types: H100-80GB, H200-141GB, A100-80GB, A100-40GB, "
                                        "L40S-48GB, L4-24GB)")
    plan.add_argument("--bench", type=_path, help="a `dtlab bench --out` JSON file, for the estimated time")
    plan.set_defaults(func=_plan)


def _add_prepare(sub) -> None:
    prep = sub.add_parser("prepare", help="tokenize the spec's data into token shards once, before a study "
                                          "(train, run and sweep do it themselves when it is not done)")
    _debug_flag(prep)
    prep.add_argument("spec", help="experiment spec (YAML), e.g. experiments/sweep_multigpu.yaml")
    prep.add_argument("overrides", nargs="*", help="key.path=value, e.g. data.max_tokens=100000000")
    prep.add_argument("--out", type=_path, help="cache folder for the shards (sets data.cache_dir; default "
                                                "$DTLAB_CACHE or ~/.cache/dtlab): on a cluster, one every node sees")
    prep.add_argument("--workers", type=_positive,
                      help="processes that tokenize (sets data.num_proc; default 1); with --ray, tokenizing actors "
                           "(default: the cluster's CPUs)")
    prep.add_argument("--ray", action="store_true",
                      help="tokenize with Ray Data on the cluster at RAY_ADDRESS (or a local Ray instance): for "
                           "billions of tokens; give --out a folder every node sees")
    prep.set_defaults(func=_prepare)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dtlab", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, func, what, doc, resume_help, ray in (
        ("train", _train, "run", "train one variant (model.type) as a spec file says",
         "continue the run in --out from its last checkpoint", True),
        ("sweep", _sweep, "sweep", "Ray Tune + Optuna over the spec's sweep.search_space, with ASHA",
         "continue an interrupted sweep in --out: finished trials are kept", False),
        ("run", _run, "experiment", "the whole experiment: train every variant (or sweep), then the report",
         "continue: finished runs are kept, the others resumed", True),
    ):
        cmd = sub.add_parser(name, help=doc)
        _debug_flag(cmd)
        cmd.add_argument("spec", help="experiment spec (YAML), e.g. experiments/quick.yaml")
        cmd.add_argument("overrides", nargs="*", help="key.path=value, e.g. model.type=mod training.max_steps=120")
        cmd.add_argument("--out", type=_path, help=f"{what} directory (default under runs/)")
        cmd.add_argument("--resume", action="store_true", help=resume_help)
        cmd.add_argument("--force", action="store_true", help=f"set an existing {what} in --out aside, start afresh")
        if ray:
            cmd.add_argument("--no-ray", action="store_true", help="train in this process, without Ray")
        cmd.add_argument("-v", "--verbose", action="store_true",
                         help="show every log line (Ray's, the training loop's, lm-eval's) instead of progress; "
                              "without it they go to output.log in the output directory")
        cmd.set_defaults(func=func)

    for add in (_add_prepare, _add_report, _add_bench, _add_eval, _add_sample, _add_ls, _add_isoflop):
        add(sub)
    _add_plan(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Bad input (a spec, a path, an output that would be overwritten) exits with code 2 and one line
    that names the culprit; a run that fails once started exits with 1 and says how to continue.
    `dtlab --debug ...` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        with _console(args):
            return args.func(args)
    except KeyboardInterrupt:
        print(f"dtlab {args.command}: interrupted; --resume continues (with the same --out)", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        code, line = explain(err)
        print(f"dtlab {args.command}: {line}", file=sys.stderr)
        return code


def _console(args: argparse.Namespace):
    """The command's console, with the `dtlab` log on it: train, run and sweep show progress (their
    libraries' output goes to a file); the other commands show every line."""
    from dtlab.trainers.monitor.progress import console

    if not hasattr(args, "verbose"):
        return console(verbose=True)
    return console(verbose=args.verbose, stop_ray=True)


def explain(err: Exception) -> tuple[int, str]:
    """(exit code, one line) for an error: 2 for bad input, 1 for a failure once work had started."""
    from dtlab.analysis.report import ReportError
    from dtlab.trainers.orchestrate.runner import RunFailed
    from dtlab.trainers.run.checkpoint import CheckpointError
    from dtlab.trainers.spec import SpecError

    text = " ".join(str(err).split())
    if isinstance(err, (SpecError, ReportError, CheckpointError)):
        return 2, text
    if isinstance(err, RunFailed):
        return 1, text
    if isinstance(err, OSError):
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        return 2, f"{where}{err.strerror or text}"
    if isinstance(err, ValueError):  # a model or data value that the checks before did not catch
        return 2, text
    return 1, f"unexpected {type(err).__name__}: {text[:300]} (dtlab --debug {' '.join(sys.argv[1:2])} ... shows where)"


if __name__ == "__main__":
    sys.exit(main())
