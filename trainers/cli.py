"""The `dtlab` command."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from .runner import run_training
    from .spec import load_spec

    run_training(load_spec(args.spec, args.overrides), out=args.out, resume=args.resume, force=args.force,
                 use_ray=False if args.no_ray else None)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import time

    from .spec import SpecError, load_spec
    from .sweep import run_sweep

    spec = load_spec(args.spec, args.overrides)
    if args.resume and not args.out:
        raise SpecError("--resume needs --out DIR: the sweep to continue")
    out = args.out or f"runs/sweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_sweep(spec, out, resume=args.resume, force=args.force, source=args.spec)
    if summary.get("interrupted"):
        print(f"dtlab sweep: interrupted; continue with: dtlab sweep {args.spec} --out {out} --resume", file=sys.stderr)
        return 130
    return 0


def _run(args: argparse.Namespace) -> int:
    from .experiment import run_experiment
    from .spec import load_spec

    run_experiment(load_spec(args.spec, args.overrides), args.out, resume=args.resume, force=args.force,
                   use_ray=False if args.no_ray else None, source=args.spec)
    return 0


def _report(args: argparse.Namespace) -> int:
    from dtlab.analysis.report import write_report

    report = write_report(args.dirs, args.out, force=args.force)
    for p in report.problems:
        print(f"note: {p}", file=sys.stderr)
    print(f"report: {report.html} ({report.charts} charts); tables: {report.markdown}, {report.tables_dir}/")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import format_table, run_bench, write_rows

    if args.out and Path(args.out).is_dir():
        print(f"dtlab bench: --out {args.out} is a directory; expected the path of a JSON file", file=sys.stderr)
        return 2
    if args.out and Path(args.out).exists() and not args.force:
        print(f"dtlab bench: --out {args.out} already exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        rows = run_bench(preset=args.preset, device=args.device, batch=args.batch, seq=args.seq,
                         compile=args.compile, steps=args.steps, warmup=args.warmup,
                         capacities=tuple(args.capacities), variants=tuple(args.variants))
    except ValueError as err:
        print(f"dtlab bench: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {args.out}")
    return 0


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

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")


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
        cmd.add_argument("--out", help=f"{what} directory (default under runs/)")
        cmd.add_argument("--resume", action="store_true", help=resume_help)
        cmd.add_argument("--force", action="store_true", help=f"set an existing {what} in --out aside, start afresh")
        if ray:
            cmd.add_argument("--no-ray", action="store_true", help="train in this process, without Ray")
        cmd.set_defaults(func=func)

    report = sub.add_parser("report", help="compare runs and sweeps in one HTML report with CSV/Markdown tables")
    _debug_flag(report)
    report.add_argument("dirs", nargs="+", help="run, sweep or experiment directories")
    report.add_argument("--out", help="HTML file (default DIR/report.html for one directory, else report.html)")
    report.add_argument("--force", action="store_true", help="replace an --out file not written by dtlab")
    report.set_defaults(func=_report)

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
    bench.add_argument("--out", help="JSON file for the rows")
    bench.add_argument("--force", action="store_true", help="replace an existing --out file")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Bad input (a spec, a path, an output that would be overwritten) exits with code 2 and one line
    that names the culprit; a run that fails once started exits with 1 and says how to continue.
    `dtlab --debug ...` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
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


def explain(err: Exception) -> tuple[int, str]:
    """(exit code, one line) for an error: 2 for bad input, 1 for a failure once work had started."""
    from dtlab.analysis.report import ReportError

    from .checkpoint import CheckpointError
    from .runner import RunFailed
    from .spec import SpecError

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
