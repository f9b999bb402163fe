"""The driver of one training run: checks everything, lays out the run directory, launches.

Everything that can be wrong with the input (spec, data, tokenizer against model, block size
against positions, an output directory that already holds a run) fails here, before any
work starts and before anything is written.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .data import Prepared, prepare_data
from .records import METRICS
from .spec import Spec, SpecError, dump_spec

RUN_MARKERS = (METRICS, "spec.yaml", "run.json", "checkpoints")


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
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


def check_fit(spec: Spec, data: Prepared, world: int) -> None:
    shape = model_shape(spec)
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


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, log=print) -> None:
    if resume and force:
        raise SpecError("--resume and --force contradict each other: resume keeps the run, force sets it aside")
    if holds_run(run_dir):
        if resume:
            return
        if not force:
            raise SpecError(f"{run_dir} already holds a run: pass --resume to continue it or --force to set it aside "
                            "and start afresh (nothing is overwritten)")
        backup = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), backup)
        log(f"moved the existing run to {backup}")
    elif resume:
        raise SpecError(f"--resume: {run_dir} holds no run to continue")
    run_dir.mkdir(parents=True, exist_ok=True)


def default_run_dir(spec: Spec) -> Path:
    return Path("runs") / f"{spec.name}-{spec.model.type}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_run_files(run_dir: Path, spec: Spec, data: Prepared, resume: bool) -> None:
    spec_text = dump_spec(spec)
    if resume and (run_dir / "spec.yaml").is_file():
        old = (run_dir / "spec.yaml").read_text()
        if old != spec_text:
            (run_dir / f"spec.resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml").write_text(spec_text)
            return
    (run_dir / "spec.yaml").write_text(spec_text)
    if data.meta.get("tokenizer_file"):
        shutil.copyfile(data.meta["tokenizer_file"], run_dir / "tokenizer.json")
    import torch

    run = {"name": spec.name, "variant": spec.model.type, "seed": spec.seed, **git_commit(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv, "data": data.meta,
           "python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    (run_dir / "run.json").write_text(json.dumps(run, indent=1))


def run_training(spec: Spec, out: str | Path | None = None, resume: bool = False, force: bool = False,
                 use_ray: bool | None = None, hooks=None, log=print) -> dict[str, Any]:
    """Check, lay out and run one training run; returns the last evaluation record."""
    use_ray = spec.resources.use_ray if use_ray is None else use_ray
    world = spec.resources.num_workers
    data = prepare_data(spec.data)
    check_fit(spec, data, world)
    run_dir = Path(out) if out else default_run_dir(spec)
    prepare_run_dir(run_dir, resume, force, log)
    write_run_files(run_dir, spec, data, resume)
    config = {"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir.resolve()), "data_dir": str(data.path),
              "resume": resume}
    log(f"run directory: {run_dir}")
    if use_ray:
        from .ray_train import train_with_ray

        result = train_with_ray(config, spec, log=log)
    else:
        if world > 1:
            raise SpecError("resources.num_workers > 1 needs Ray (resources.use_ray=true) or torchrun")
        from .loop import train

        result = train(config, hooks)
    record = {k: v for k, v in (result or {}).items() if not isinstance(v, dict)}
    if record:
        log("final: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    return result or {}
