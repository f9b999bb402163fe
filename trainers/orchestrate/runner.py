"""The driver of one training run: checks everything, lays out the run directory, launches.

Everything that can be wrong with the input (spec, data, tokenizer against model, block size
against positions, an output directory that already holds a run) fails here, before any
work starts and before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtlab.analysis.rundir import METRICS, diverged_reason, write_atomic, write_status
from dtlab.trainers.monitor.progress import current
from dtlab.trainers.monitor.tracking import Tracking, TrackingError, check_tracking
from dtlab.trainers.run.checkpoint import CheckpointError
from dtlab.trainers.run.data import Prepared, prepare_data
from dtlab.trainers.spec import Spec, SpecError, dump_spec

if TYPE_CHECKING:
    from dtlab.trainers.run.loop import Hooks

log = logging.getLogger(__name__)

RUN_MARKERS = (METRICS, "spec.yaml", "run.json", "checkpoints")
# Set by `dtlab run` when an interrupt (Ctrl-C) reached it while runs train in its threads: a run that
# then ends with an error was stopped by it, and says "interrupted" (as a run in the main thread does).
INTERRUPTED = threading.Event()


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]  # the repository (trainers/orchestrate/runner.py)
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def model_shape(spec: Spec) -> dict[str, Any]:
    """vocab_size and max_position_embeddings the model will have."""
    if spec.training.from_scratch:
        from dtlab.models.config import make_config

        cfg = make_config(spec.model.type, spec.model.size, **spec.model.overrides_for(spec.model.type))
        explicit = "vocab_size" in spec.model.overrides()
        return {"vocab_size": cfg.vocab_size if explicit else None, "max_positions": cfg.max_position_embeddings}
    from dtlab.models.loading import checkpoint_shape, resolve_checkpoint

    try:
        shape = checkpoint_shape(resolve_checkpoint(spec.model.pretrained))
    except ValueError as err:
        raise SpecError(f"model.pretrained: {err}") from None
    return {"vocab_size": shape["vocab_size"], "max_positions": shape.get("max_position_embeddings", 32768)}


def check_fit(spec: Spec, data: Prepared, world: int, shape: dict[str, Any] | None = None, seeds: int = 1) -> Spec:
    """The run fits its data and its devices, before anything is written; returns the spec its workers
    get, with `auto` strategy and activation checkpointing decided by the memory plan (`check_memory`).
    `world` is one seed's workers; a sweep trial trains `seeds` of them side by side."""
    shape = shape or model_shape(spec)
    if not spec.training.from_scratch and not spec.data.tokenizer:
        raise SpecError("data.tokenizer: transfer from a pretrained checkpoint needs its tokenizer "
                        f"(for example data.tokenizer={spec.model.pretrained!r})")
    if shape["vocab_size"] is not None and data.vocab_size > shape["vocab_size"]:
        raise SpecError(f"data.tokenizer ({data.meta['tokenizer']}) has {data.vocab_size} tokens but the model's "
                        f"vocab_size is {shape['vocab_size']}: the vocabulary does not fit the model")
    if spec.data.block_size > shape["max_positions"]:
        raise SpecError(f"data.block_size={spec.data.block_size} exceeds the model's max_position_embeddings="
                        f"{shape['max_positions']}")
    need = spec.training.batch_size * world
    if len(data.train) < need:
        raise SpecError(f"data: {len(data.train)} training rows of {spec.data.block_size} tokens cannot fill one "
                        f"batch of training.batch_size={spec.training.batch_size} x {world} worker(s)")
    if len(data.val) < world:  # every rank evaluates at least one row (under fsdp each pass gathers on all)
        raise SpecError(f"data: {len(data.val)} validation row(s) of {spec.data.block_size} tokens cannot give each "
                        f"of {world} worker(s) one; raise data.val_fraction or use fewer workers")
    return check_memory(spec, data, world, seeds)


def check_memory(spec: Spec, data: Prepared, world: int, seeds: int = 1) -> Spec:
    """The run's memory plan (`tools/plan.py`: weights, gradients, AdamW state, buckets, activations, the
    loss chunk per device) before anything is written. On GPUs (this machine's, or the cluster that
    DTLAB_CLUSTER describes) a run that will not fit is refused with its estimate and what would fit;
    `auto` strategy and activation checkpointing are decided (ddp and no recomputation where they fit).
    On this machine's CPU the refusal is a model whose parameters alone cannot fit: fp32 weights,
    gradients and AdamW's two moments (16 bytes a parameter) per worker (`world` x `seeds` side by side),
    against the memory available now. Returns the spec with `auto` decided (ddp, no checkpointing where
    no plan can be made)."""
    from dtlab.models.config import make_config
    from dtlab.models.flops import param_count
    from dtlab.trainers.tools.bench import available_memory_gib
    from dtlab.trainers.tools.plan import check_plan, concrete, device_cluster, plan_run, resolve

    cluster = device_cluster(spec)
    if cluster is None:  # CUDA that this process does not see: the workers' GPUs are planned by the driver
        return concrete(spec)
    vocab = data.vocab_size if spec.training.from_scratch else None
    run = plan_run(spec, spec.model.type, cluster, vocab_size=vocab, rows=len(data.train))
    log.debug(f"memory plan of {spec.name}-{spec.model.type}: peak {run.memory.peak / 2**30:,.1f} GiB of "
              f"{run.budget / 2**30:,.1f} GiB per device, {run.strategy}, activation checkpointing "
              f"{'on' if run.checkpointing else 'off'}")
    if cluster.cuda:
        check_plan([run], spec, f"{spec.name} ({spec.model.type})")
        return resolve(spec, run)
    if spec.training.from_scratch and not os.environ.get("RAY_ADDRESS"):
        overrides = spec.model.overrides_for(spec.model.type)
        overrides.setdefault("vocab_size", data.vocab_size)
        params = param_count(make_config(spec.model.type, spec.model.size, **overrides))
        need, have = params * 16 * world * seeds / 2**30, available_memory_gib("cpu")
        if have is not None and need > have:
            ranks = f"{world} worker(s) x {seeds} seeds side by side" if seeds > 1 else f"{world} worker(s)"
            raise SpecError(f"model: {params:,} parameters need about {need:,.1f} GiB for weights, gradients and "
                            f"AdamW state ({ranks} x 16 bytes a parameter) but this machine has "
                            f"{have:,.1f} GiB available; choose a smaller model.size or shape (hidden_size, "
                            "num_hidden_layers, vocab_size)")
    return resolve(spec, run)


def check_out(path: Path, what: str = "run") -> None:
    """`--out` can become a directory of ours: not a file, not inside a file, somewhere writable."""
    if "://" in str(path) or str(path).startswith(("s3:", "gs:", "gcs:", "hdfs:", "abfs:")):
        raise SpecError(f"--out {path}: a URI is not a directory; the record (metrics, report) is written as files: "
                        "give --out a path (on a cluster, one every node shares) and put the URI in "
                        "resources.storage, where the checkpoints of record go")
    if path.exists() and not path.is_dir():
        raise SpecError(f"--out {path}: is a file, not a {what} directory; choose another --out")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise SpecError(f"--out {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"--out {path}: {parent} is not writable; choose another --out")


def check_resume(run_dir: Path, spec: Spec) -> None:
    """Before anything is written: the run in `run_dir` can continue where it stopped, with the same
    model and data, from a readable checkpoint (else its records would be logged twice)."""
    from dtlab.analysis.rundir import read_jsonl
    from dtlab.trainers.run.checkpoint import last_checkpoint, why_not_resumable

    old, new = _comparable(_read_mapping(run_dir / "spec.yaml")), _comparable(spec.model_dump(mode="json"))
    changed = [f"{section}.{key}: {old[section].get(key)!r} -> {new[section].get(key)!r}"
               for section in ("model", "data") for key in sorted(set(old[section]) | set(new[section]))
               if old[section].get(key) != new[section].get(key)]
    if changed:
        raise SpecError(f"--resume: {run_dir} was started with another model or data ({'; '.join(changed[:3])}); "
                        "resume it with the spec it was started with, or --force to set it aside")
    if (run_dir / "run.json").exists():
        _read_mapping(run_dir / "run.json")
    why = diverged_reason(run_dir)
    if why:
        raise SpecError(f"--resume: {run_dir} {why}; from its last checkpoint it would diverge again: change the "
                        "spec and start afresh (--force sets the run aside)")
    why = why_not_resumable(last_checkpoint(run_dir), deep=True)
    if why and spec.resources.storage and spec.resources.use_ray and storage_holds(run_dir, spec.resources.storage):
        return  # the checkpoint of record is in Ray's storage: the run reads it back from there
    saved = run_dir / "checkpoints"
    if why and not (saved.is_dir() and any(saved.iterdir())):
        # stopped before its first checkpoint (step 0 is evaluated, not saved): the run starts over and
        # logs its first records again, identically (the loop drops the old ones)
        log.info(f"--resume: {run_dir} stopped before its first checkpoint; it starts over")
        return
    if why and read_jsonl(run_dir / METRICS).records:
        raise SpecError(f"--resume: cannot continue {run_dir}: {why}, so its records would be repeated; "
                        "--force sets the run aside and starts afresh")


def _comparable(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The model and data sections with defaults filled in (a run of an older dtlab lacks the keys
    added since), less where the data are cached (a place, not the data)."""
    from pydantic import ValidationError

    from dtlab.trainers.spec import Spec

    try:
        raw = Spec.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        pass  # compared as written
    out = {section: dict(raw.get(section)) if isinstance(raw.get(section), dict) else {}
           for section in ("model", "data")}
    out["data"].pop("cache_dir", None)
    out["data"].pop("num_proc", None)  # how many processes prepared the data, not which data
    return out


def _read_mapping(path: Path) -> dict[str, Any]:
    """A run's `spec.yaml` or `run.json` (YAML reads both) as a mapping, or a refusal naming it."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SpecError(f"--resume: {path} is not readable ({type(err).__name__}); the run cannot continue") from None
    if not isinstance(raw, dict):
        raise SpecError(f"--resume: {path} is not a mapping; the run cannot continue")
    return raw


class RunFailed(RuntimeError):
    """Training started and then failed (a worker died, the disk filled up): the message says how
    to continue (`--resume`)."""


class RunDiverged(RunFailed):
    """Training stopped on a non-finite loss or gradient norm (`loop.Diverged`)."""


def check_resources(spec: Spec, use_ray: bool) -> None:
    """Workers, device and precision this machine can give, before anything is read or written (on
    a Ray cluster, RAY_ADDRESS set, the cluster's devices are not this machine's: Ray decides)."""
    res = spec.resources
    if res.num_workers > 1 and not use_ray:
        raise SpecError(f"resources.num_workers={res.num_workers} needs Ray (drop --no-ray, or "
                        "resources.use_ray=true) or a single worker")
    if res.storage and not use_ray:
        raise SpecError(f"resources.storage={res.storage!r}: the checkpoints go to storage through Ray; drop --no-ray "
                        "(resources.use_ray=true) or resources.storage")
    if res.storage:
        check_storage(res.storage)
    if use_ray and os.environ.get("RAY_ADDRESS"):
        return
    from dtlab.trainers.run.device import detect_device, detect_precision

    try:
        detect_precision(detect_device(res.device), res.precision)
    except ValueError as err:
        raise SpecError(f"resources: {err}") from None


def check_storage(uri: str) -> None:
    """`resources.storage` is a place Ray can write to, checked before any work: pyarrow opens it
    and lists it (a path must be absolute: every node reads it the same)."""
    import pyarrow.fs

    if "://" not in uri and not uri.startswith("/"):
        raise SpecError(f"resources.storage={uri!r}: expected a URI (s3://bucket/prefix, gs://...) or an absolute "
                        "path that every node shares")
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        fs.create_dir(path, recursive=True)
        fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except Exception as err:  # pyarrow's errors name the scheme, the bucket, the credentials
        raise SpecError(f"resources.storage={uri!r}: cannot be written ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:300]})") from None


def storage_holds(run_dir: Path, uri: str) -> bool:
    """Whether Ray's storage at `uri` holds checkpoints of the run in `run_dir` (its name there is
    in `run.json`)."""
    import pyarrow.fs

    try:
        name = json.loads((run_dir / "run.json").read_text()).get("storage_name")
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        return bool(name) and any(i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")
                                  for i in fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{name}",
                                                                                    allow_not_found=True)))
    except (OSError, ValueError, AttributeError):
        return False


def check_run_dir(run_dir: Path, resume: bool, force: bool, spec: Spec | None = None) -> None:
    """Everything about `--out`, `--resume` and `--force` that can be refused, refused; nothing written."""
    if resume and force:
        raise SpecError("--resume and --force contradict each other: resume keeps the run, force sets it aside")
    check_out(run_dir)
    if holds_run(run_dir):
        if resume and spec is not None:
            check_resume(run_dir, spec)
        elif not (resume or force):
            raise SpecError(f"{run_dir} already holds a run: pass --resume to continue it or --force to set it aside "
                            "and start afresh (nothing is overwritten)")
    elif resume:
        raise SpecError(f"--resume: {run_dir} holds no run to continue")
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise SpecError(f"--out {run_dir}: not empty and holds no dtlab run; choose an empty or new directory "
                        "(nothing there is overwritten)")


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    check_run_dir(run_dir, resume, force)
    if holds_run(run_dir):
        if resume:
            return
        backup = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), backup)
        log.info(f"moved the existing run to {backup}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"--out {run_dir}: cannot create it ({err.strerror})") from None


def default_run_dir(spec: Spec) -> Path:
    return Path("runs") / f"{spec.name}-{spec.model.type}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_run_files(run_dir: Path, spec: Spec, data: Prepared, resume: bool) -> None:
    spec_text = dump_spec(spec)
    if resume and (run_dir / "spec.yaml").is_file():  # the run's own files stay; a changed spec goes beside
        if (run_dir / "spec.yaml").read_text() != spec_text:
            (run_dir / f"spec.resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml").write_text(spec_text)
        return
    (run_dir / "spec.yaml").write_text(spec_text)
    if data.meta.get("tokenizer_file"):
        shutil.copyfile(data.meta["tokenizer_file"], run_dir / "tokenizer.json")
    import torch

    run = {"name": spec.name, "variant": spec.model.type, "seed": spec.seed, **git_commit(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv, "data": data.meta,
           "python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    write_atomic(run_dir / "run.json", json.dumps(run, indent=1))


def launch(config: dict[str, Any], spec: Spec, run_dir: Path, use_ray: bool, hooks: Hooks | None) -> dict[str, Any]:
    """Train; a failure once training has started is a `RunFailed` that says how to continue. Under
    Ray this is the run's one retry layer: a transient failure (a worker killed, a node lost or
    preempted) starts a new worker group from the run's last checkpoint, up to
    `resources.max_failures` times; a deterministic one (`failure_kind`) ends the run at once."""
    resume_hint = f"continue with --resume (--out {run_dir})"
    try:
        if use_ray:
            from dtlab.trainers.orchestrate.ray_train import train_with_ray

            for retry in range(spec.resources.max_failures + 1):
                try:
                    return train_with_ray(config, spec)
                except Exception as err:
                    if failure_kind(err) is not None or retry == spec.resources.max_failures:
                        raise
                    log.info(f"{run_dir.name}: training failed ({_one_line(err)}); starting again from the last "
                             f"checkpoint (retry {retry + 1} of resources.max_failures={spec.resources.max_failures})")
        from dtlab.trainers.run.loop import train

        return train(config, hooks)
    except (SpecError, CheckpointError):
        raise
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        raise RunFailed(f"training stopped: {err.strerror or err}{where}; {resume_hint}") from err
    except Exception as err:
        inner = _cause(err)
        if isinstance(inner, (SpecError, CheckpointError)):  # raised in a Ray worker: bad input all the same
            raise type(inner)(str(inner)) from err
        why = diverged_reason(run_dir)
        if why:
            raise RunDiverged(f"{run_dir.name}: {why}; the run stopped (--force starts it afresh)") from err
        first = _one_line(err)
        if failure_kind(err) == OOM:
            raise RunFailed(f"training ran out of memory ({_one_line(inner)}); not retried: it would again. A "
                            "smaller training.batch_size with more grad_accum_steps, or a smaller model, fits") from err
        if type(err).__module__.split(".")[0] == "ray":  # a worker died or its process group failed
            raise RunFailed(f"training failed in a Ray worker ({type(err).__name__}: {first}); {resume_hint}") from err
        if type(err).__name__ == "SafetensorError":  # e.g. the disk filled up while writing a checkpoint
            raise RunFailed(f"writing a checkpoint failed ({first}); {resume_hint}") from err
        raise RunFailed(f"training failed ({type(err).__name__}: {first}); {resume_hint}") from err


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


DIVERGED_KIND, OOM, REFUSED = "diverged", "out of memory", "refused"


def failure_kind(err: BaseException) -> str | None:
    """Why a run failed, when trying again cannot help: it diverged (`loop.Diverged`), ran out of
    memory, or its input was refused (`SpecError`, `ValueError`, an unreadable checkpoint), on any
    of its workers (Ray Train's `WorkerGroupError` holds each rank's error). None for a transient
    failure: a worker process killed, a node lost or preempted, a collective broken by either, or
    anything not known to repeat; those are retried up to `resources.max_failures`."""
    import torch

    from dtlab.trainers.run.loop import Diverged

    kinds = []
    for one in [err, *(getattr(err, "worker_failures", None) or {}).values()]:
        seen: set[int] = set()
        handled = False  # past an implicit `__context__`: an error raised while another was being handled
        while isinstance(one, BaseException) and id(one) not in seen:
            seen.add(id(one))
            if isinstance(one, Diverged):
                kinds.append(DIVERGED_KIND)
            elif isinstance(one, torch.OutOfMemoryError) or "CUDA out of memory" in str(one)[:500]:
                kinds.append(OOM)
            elif isinstance(one, (SpecError, CheckpointError, ValueError)) and not handled:
                kinds.append(REFUSED)  # a ValueError that was being handled when a transient failure came is not it
            explicit = one.__cause__ or getattr(one, "cause", None)
            handled = handled or explicit is None
            one = explicit or one.__context__
    return next((k for k in (DIVERGED_KIND, OOM, REFUSED) if k in kinds), None)


def _cause(err: BaseException) -> BaseException:
    """The innermost error of a chain (Ray wraps a worker's error in its own; of Ray Train's
    `WorkerGroupError`, which holds each rank's, the first rank's)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = list((getattr(err, "worker_failures", None) or {}).values())
        nxt = err.__cause__ or getattr(err, "cause", None) or err.__context__ or (failures[0] if failures else None)
        if not isinstance(nxt, BaseException):
            break
        err = nxt
    return err


def run_training(spec: Spec, out: str | Path | None = None, resume: bool = False, force: bool = False,
                 use_ray: bool | None = None, hooks: Hooks | None = None,
                 tracking: Tracking | None = None) -> dict[str, Any]:
    """Check, lay out and run one training run; returns the last evaluation record. Its progress
    shows on the command's console; `tracking` (a `tracking.Tracking`, else one of the run's own)
    sends its records to the spec's trackers."""
    use_ray = spec.resources.use_ray if use_ray is None else use_ray
    run_dir = Path(out) if out else default_run_dir(spec)
    check_resources(spec, use_ray)  # what needs no data is refused before data are prepared
    check_tracking(spec)
    check_run_dir(run_dir, resume, force, spec)
    shape = model_shape(spec)  # a checkpoint that is not there is said before data are prepared
    data = prepare_data(spec.data)
    run_spec = check_fit(spec, data, spec.resources.num_workers, shape)  # `auto` settings decided
    say_repeats(spec, data, spec.resources.num_workers)
    fresh = not run_dir.exists()
    try:
        prepare_run_dir(run_dir, resume, force)  # the first write
        write_run_files(run_dir, spec, data, resume)
    except OSError as err:
        if fresh:  # a failed start leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise RunFailed(f"could not write the run directory {run_dir} ({err.strerror or err})") from err
    config = {"spec": run_spec.model_dump(mode="json"), "run_dir": str(run_dir.resolve()), "data_dir": str(data.path),
              "resume": resume}
    current().capture(run_dir)  # from here on, what the libraries print goes to the run's output.log
    result = launch_watched(config, spec, run_dir, use_ray, hooks, tracking)
    from dtlab.trainers.tools.sample import ensure_samples

    ensure_samples(run_dir, replace=True)  # greedy samples of the best checkpoint, for the report
    record = {k: v for k, v in (result or {}).items() if not isinstance(v, dict)}
    if record:
        log.debug("final: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in record.items()))
    return result or {}


def say_repeats(spec: Spec, data: Prepared, world: int) -> None:
    """One line at start when the run will pass over its training data more than once."""
    from dtlab.trainers.run.loop import total_steps

    training, rows = spec.training, len(data.train)
    steps = total_steps(spec, rows, world)
    epochs = steps * training.grad_accum_steps / max(1, rows // (training.batch_size * world))
    if epochs > 1:
        planned = steps * training.batch_size * training.grad_accum_steps * world * spec.data.block_size
        log.info(f"{spec.name}-{spec.model.type}: {_count(planned)} tokens planned over "
                 f"{_count(rows * spec.data.block_size)} training tokens: {epochs:.1f} epochs (the data repeats)")


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:,.{0 if n >= 100 * size else 1}f}{unit}"
    return f"{n:,.0f}"


def launch_watched(config: dict[str, Any], spec: Spec, run_dir: Path, use_ray: bool, hooks: Hooks | None,
                   tracking: Tracking | None = None) -> dict[str, Any]:
    """`launch`, with the run's progress on the console, its records to the trackers, and how it
    ended in its `status.json` (running while it trains)."""
    own = tracking is None
    tracking = tracking or Tracking(run_dir)
    status, error = "failed", None
    write_status(run_dir, "running")
    try:
        try:
            tracker = tracking.start(spec, run_dir)
        except TrackingError as err:
            raise RunFailed(f"{err}; nothing was trained; fix tracking: and continue with --resume (--out "
                            f"{run_dir})") from err
        with current().following(run_dir, sinks=[tracker.record] if tracker else []):
            result = launch(config, spec, run_dir, use_ray, hooks)
        status = "finished"
        return result
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as err:
        status = ("diverged" if isinstance(err, RunDiverged) else "interrupted" if INTERRUPTED.is_set()
                  else "failed")
        error = " ".join(str(err).split())[:300] if status != "interrupted" else None
        raise
    finally:
        write_status(run_dir, status, **({"error": error} if error else {}))
        tracking.end(run_dir, status)
        if own:
            tracking.close()
