"""Checkpoints of a run: `checkpoints/last` (resume) and `checkpoints/best` (lowest headline loss).

A checkpoint is a directory `checkpoints/step-NNNNNNN/` holding the model as `save_pretrained`
writes it (safetensors that reload with `AutoModelForCausalLM`) and the trainer's state without
pickle: `optimizer.safetensors` (the optimizer's tensors) and `trainer_state.json` (optimizer
hyperparameters, schedule, grad scaler, the loop's counters). It is written under a temporary name
and renamed once complete; `last` and `best` are relative symlinks to such directories, replaced
atomically (`os.replace`) afterwards. A crash at any moment leaves the old checkpoint or the new one,
never neither. The resume path and the evaluation path both go through `save` and `load` here.

`best` holds weights only: the optimizer's state (8 bytes per parameter of AdamW moments) is kept in
`last`, the one checkpoint a run resumes from; a `best` that is not also `last` loses its
`optimizer.safetensors` once `last` has moved on. The untrained step 0 is never saved (the loop's
rule): a run that stops before its first checkpoint starts again from scratch.

The format does not depend on how the run's ranks held the model (`parallel.py`): under FSDP the
full tensors are gathered for saving (`gather`) and each rank takes its shard back when loading, so a
DDP checkpoint resumes under FSDP and the reverse.

A run directory is trusted input all the same: only checkpoints in this format, or older ones whose
`trainer_state.pt` loads with `torch.load(weights_only=True)`, are read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from dtlab.models.modeling import DTLabForCausalLM

LAST, BEST = "last", "best"
FORMAT = 1
FILES = ("model.safetensors", "optimizer.safetensors", "trainer_state.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not fit the run; the message names the file."""


def unwrap(model: torch.nn.Module) -> DTLabForCausalLM:
    """The model inside a DDP wrapper (or the model itself; FSDP2 shards the model in place)."""
    return model.module if hasattr(model, "module") else model


def last_checkpoint(run_dir: Path) -> Path:
    """`checkpoints/last`; if a crash came while an older dtlab's `last` directory was being turned
    into a link (see `_move_link`), the directory it was moved to."""
    ckpt = run_dir / "checkpoints"
    if not (ckpt / LAST).exists() and not (ckpt / LAST).is_symlink() and (ckpt / f"legacy-{LAST}").is_dir():
        return ckpt / f"legacy-{LAST}"
    return ckpt / LAST


_FAULTS: dict[str, int] = {}


def fault(point: str) -> None:
    """Tests kill the process at a named point of the N-th save (DTLAB_FAULT=point:N, N = 1 when
    left out) with SIGKILL: a real crash at a known place, not a race with a sleep."""
    want = os.environ.get("DTLAB_FAULT", "")
    name, _, nth = want.partition(":")
    if name != point:
        return
    _FAULTS[point] = _FAULTS.get(point, 0) + 1
    if _FAULTS[point] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# ---- the optimizer's state as tensors + JSON ---------------------------------------------------------
def _optimizer_split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _finite(value: Any) -> Any:
    """JSON has no infinity: an unset best loss is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---- FSDP: full tensors for saving, shards when loading -----------------------------------------------
Gathered = tuple[dict[str, Any], dict[str, Any]]


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> Gathered | None:
    """Under FSDP, on every rank of the run (collectives over its group, tensor by tensor): the model's
    and the optimizer's state with full tensors, on the CPU, on rank 0 (None elsewhere), in the form
    an unsharded model and optimizer have them (`state_dict()`: the optimizer's keyed by parameter
    index). Without FSDP, None: `save` reads the model and the optimizer itself.

    (Not `torch.distributed.checkpoint.state_dict` with `full_state_dict` and `cpu_offload`: that
    keeps the full tensors on global rank 0, which is in no run's group but the first when several
    runs share a worker group.)"""
    if not _sharded(model):
        return None
    from torch.distributed.tensor import DTensor

    def full(value: Any) -> Any:
        if isinstance(value, DTensor):
            value = value.full_tensor()
        return value.detach().cpu().clone() if rank == 0 and hasattr(value, "detach") else value

    # one full tensor per parameter object: tied weights (the head) stay one tensor, which
    # `save_pretrained` leaves out under the tied name as it does for an unsharded model
    done: dict[int, Any] = {}
    weights = {k: done[id(v)] if id(v) in done else done.setdefault(id(v), full(v))
               for k, v in model.state_dict(keep_vars=True).items()}
    optim = optimizer.state_dict()
    optim = {**optim, "state": {i: {k: full(v) for k, v in per.items()} for i, per in optim["state"].items()}}
    return (weights, optim) if rank == 0 else None


def _distribute(full: torch.Tensor, like: Any) -> Any:
    """`full` as `like` holds it: this rank's shard when `like` is a DTensor (every rank read the file:
    no communication), else on `like`'s device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return full.to(like.device)


# ---- save ------------------------------------------------------------------------------------------------
def save(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None, state: dict[str, Any],
         best: bool, gathered: Gathered | None = None) -> Path:
    """Write the checkpoint of `state["step"]`, point `last` (and `best` when `best`) at it, drop the
    ones neither points at (and the optimizer's state of a `best` that `last` has left); returns its
    directory. `gathered`: the full state `gather` made under FSDP (rank 0 saves)."""
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    name = _free_name(ckpt, f"step-{state['step']:07d}")
    tmp = ckpt / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if gathered is None:
        save_weights(unwrap(model), tmp, unwrap(model).state_dict())
        tensors, meta = _optimizer_split(optimizer.state_dict())
    else:
        save_weights(unwrap(model), tmp, gathered[0])
        tensors, meta = _optimizer_split(gathered[1])
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    trainer = {"format": FORMAT, "optimizer": meta, "scheduler": scheduler.state_dict(),
               "scaler": scaler.state_dict() if scaler is not None else None,
               **{k: _finite(v) for k, v in state.items()}}
    (tmp / "trainer_state.json").write_text(json.dumps(trainer, indent=1))
    _fsync(tmp)
    os.replace(tmp, ckpt / name)
    fault("checkpoint-written")
    if best:  # before `last`: a crash between them leaves `best` on a complete, newer checkpoint
        _move_link(ckpt, BEST, name)
        fault("checkpoint-best")
    _move_link(ckpt, LAST, name)
    fault("checkpoint-last")
    _prune(ckpt)
    return ckpt / name


def save_weights(model: DTLabForCausalLM, folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """What `save_pretrained` writes (config.json, generation_config.json, model.safetensors with the
    tied head left out), on whichever rank calls it: transformers' own writes nothing unless the
    process is global rank 0, and the rank 0 of a run's group need not be (several runs side by side)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.architectures = [type(model).__name__.removeprefix("FSDP")]  # FSDP2 renames the class
    config.dtype = str(model.dtype).split(".")[1]
    config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tensors, storages = {}, set()
    for key, value in state_dict.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr in storages and value.numel() > 0:  # a tied weight (the head): saved once, as transformers does
            continue
        storages.add(ptr)
        tensors[key] = value.detach().cpu().contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _fsync(folder: Path) -> None:
    """Its files and itself on disk before anything points at it (a power cut, not only a kill)."""
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _free_name(ckpt: Path, name: str) -> str:
    n, out = 1, name
    while (ckpt / out).exists():
        n, out = n + 1, f"{name}-{n}"
    return out


def _move_link(ckpt: Path, link: str, target: str) -> None:
    """`ckpt/link` -> `target`, atomically. A run of an older dtlab has real directories there:
    they become ordinary checkpoint directories first."""
    path = ckpt / link
    if path.is_dir() and not path.is_symlink():
        legacy = _free_name(ckpt, f"legacy-{link}")
        os.replace(path, ckpt / legacy)
        os.symlink(legacy, path)
    new = ckpt / f".{link}.new"
    if new.is_symlink() or new.exists():
        new.unlink()
    os.symlink(target, new)
    os.replace(new, path)
    _fsync_dir(ckpt)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(ckpt: Path) -> None:
    """Drop the checkpoints neither link points at, and the optimizer's state of a `best` that is not
    also `last` (it is resumed from `last` only)."""
    target = {link: os.readlink(ckpt / link) for link in (LAST, BEST) if (ckpt / link).is_symlink()}
    keep = set(target.values())
    for path in ckpt.iterdir():
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if (path.is_dir() and not path.is_symlink() and path.name not in keep
                and (path.name.startswith(("step-", "legacy-")) or stale_tmp)):
            shutil.rmtree(path, ignore_errors=True)
    if BEST in target and target[BEST] != target.get(LAST):
        optimizer = ckpt / target[BEST] / "optimizer.safetensors"
        if optimizer.is_file():
            optimizer.unlink()
            _fsync_dir(optimizer.parent)


# ---- check and load -----------------------------------------------------------------------------------------
def why_not_loadable(path: Path) -> str | None:
    """Why the weights at `path` cannot be loaded (`from_pretrained`: config.json and a readable
    model.safetensors), or None. A `best` checkpoint holds weights only: this is its check."""
    if not path.exists():
        return f"{path} does not exist" + (" (a broken link)" if path.is_symlink() else "")
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        return f"{path} lacks {', '.join(missing)}"
    try:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            f.keys()
    except Exception as err:  # a truncated or foreign file
        return f"{path / 'model.safetensors'} is not readable ({type(err).__name__}: {err})"
    return None


def why_not_resumable(path: Path, deep: bool = False) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None. `deep`: also read the trainer
    state through (an older checkpoint's pickle with `weights_only=True`), not only the headers."""
    if not path.exists():
        return f"{path} does not exist" + (" (a broken link)" if path.is_symlink() else "")
    legacy = (path / "trainer_state.pt").is_file() and not (path / "trainer_state.json").is_file()
    needed = ("model.safetensors", "trainer_state.pt") if legacy else FILES
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        return f"{path} lacks {', '.join(missing)}"
    for name in needed:
        if name.endswith(".safetensors"):
            try:
                from safetensors import safe_open

                with safe_open(str(path / name), "pt") as f:
                    f.keys()
            except Exception as err:  # a truncated or foreign file
                return f"{path / name} is not readable ({type(err).__name__}: {err})"
    if legacy:
        if deep:
            try:
                read_trainer_state(path)
            except CheckpointError as err:
                return str(err)
        return None
    try:
        trainer = json.loads((path / "trainer_state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{path / 'trainer_state.json'} is not valid JSON ({err})"
    missing = [k for k in ("format", "optimizer", "scheduler", "step", "best_val") if not isinstance(trainer, dict)
               or k not in trainer]
    if missing or not isinstance(trainer.get("optimizer"), dict) or "param_groups" not in trainer["optimizer"]:
        return f"{path / 'trainer_state.json'} lacks {missing or ['optimizer.param_groups']}"
    if trainer["format"] != FORMAT:
        return f"{path / 'trainer_state.json'} is format {trainer['format']!r}; this dtlab reads format {FORMAT}"
    return None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Restore model, optimizer, schedule and scaler from `path`; returns the loop's counters."""
    from safetensors.torch import load_file

    why = why_not_resumable(path)
    if why:
        raise CheckpointError(why)
    target = unwrap(model)
    sharded = _sharded(target)
    if sharded:  # each rank its shard of the full tensors, read one tensor at a time
        mine = target.state_dict()
        state = read_tensors(path / "model.safetensors", lambda k, v: _distribute(v, mine[k]) if k in mine else v)
    else:
        state = load_file(str(path / "model.safetensors"), device=str(next(target.parameters()).device))
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = target.config.tie_word_embeddings
    # the head of a tied model is the embedding; a run saved before the schedule step was kept sets it anyway
    missing = [k for k in missing if not (tied and k == "lm_head.weight") and k != "model.schedule_step"]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")
    if tied:
        target.tie_weights()
    each = None
    if sharded:  # the moments shaped like their parameter: its shard ("state.INDEX.NAME")
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def each(key: str, v: torch.Tensor) -> Any:
            param = params[int(key.split(".", 2)[1])]
            return _distribute(v, param) if v.ndim > 0 and v.shape == param.shape else v

    trainer = read_trainer_state(path, each)
    optimizer.load_state_dict(trainer.pop("optimizer"))
    scheduler.load_state_dict(trainer.pop("scheduler"))
    scaler_state = trainer.pop("scaler")
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    if trainer.get("best_val") is None:
        trainer["best_val"] = math.inf
    return trainer


def read_tensors(file: Path, each: Callable[[str, torch.Tensor], Any]) -> dict[str, Any]:
    """A safetensors file's tensors on the CPU, read one at a time and kept as `each(key, tensor)` makes
    them (under FSDP, this rank's shard): a rank holds one full tensor at a time beyond its shards,
    not the whole checkpoint (at 3B, weights and AdamW state are about 36 GB)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(file), framework="pt", device="cpu") as f:
        for key in f.keys():
            out[key] = each(key, f.get_tensor(key))
    return out


def read_trainer_state(path: Path, each: Callable[[str, torch.Tensor], Any] | None = None) -> dict[str, Any]:
    """The counters, schedule, scaler and optimizer state of a checkpoint; `each` as in `read_tensors`
    for the optimizer's tensors (keyed "state.INDEX.NAME")."""
    if (path / "trainer_state.json").is_file():
        trainer = json.loads((path / "trainer_state.json").read_text())
        tensors = read_tensors(path / "optimizer.safetensors", each or (lambda _, v: v))
        trainer["optimizer"] = _optimizer_join(tensors, trainer["optimizer"])
        return trainer
    import torch

    try:  # a checkpoint of an older dtlab: only plain tensors and containers, never code
        trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path / 'trainer_state.pt'} is not a plain checkpoint (it would run code or is "
                              f"damaged: {type(err).__name__}); refusing to load it") from None
    if each is not None:  # the same keys as the safetensors file's
        optim = trainer["optimizer"]
        optim["state"] = {i: {k: each(f"state.{i}.{k}", v) if isinstance(v, torch.Tensor) else v
                              for k, v in per.items()} for i, per in optim["state"].items()}
    return trainer


# ---- the checkpoint of record in Ray's storage ----------------------------------------------------------
CHECKPOINT, METRICS_FILE = "checkpoint", "metrics.jsonl"


def pack_for_storage(run_dir: Path, dest: Path) -> None:
    """What Ray's storage keeps of a run at a report: its last checkpoint (hard links to the files,
    not copies) as `checkpoint/`, its `metrics.jsonl` as it stands, and the same for each seed of a
    replicate trial under `seeds/<seed>/`."""
    dest.mkdir(parents=True, exist_ok=True)
    if (run_dir / METRICS_FILE).is_file():
        shutil.copyfile(run_dir / METRICS_FILE, dest / METRICS_FILE)
    last = last_checkpoint(run_dir)
    if last.is_dir():
        (dest / CHECKPOINT).mkdir()
        for f in last.resolve().iterdir():
            try:
                os.link(f, dest / CHECKPOINT / f.name)
            except OSError:  # another filesystem
                shutil.copyfile(f, dest / CHECKPOINT / f.name)
    if (run_dir / "seeds").is_dir():
        for child in sorted((run_dir / "seeds").iterdir()):
            if child.is_dir():
                pack_for_storage(child, dest / "seeds" / child.name)


def saved_step(path: Path) -> int:
    """The step of a checkpoint directory, -1 when it is not one that can be resumed from."""
    if why_not_resumable(path) is not None:
        return -1
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def unpack_from_storage(src: Path, run_dir: Path) -> list[str]:
    """Put a bundle read back from storage into `run_dir`: its checkpoint becomes `last` unless the
    run holds one as new, and then its `metrics.jsonl` replaces a local one that lacks that
    checkpoint's evaluation (or is gone); the resume then cuts the records back to the checkpoint.
    Recurses into the seeds of a replicate trial. Returns a line per checkpoint installed."""
    from dtlab.analysis.rundir import read_jsonl

    said = []
    step = saved_step(src / CHECKPOINT) if (src / CHECKPOINT).is_dir() else -1
    newer = step >= 0 and saved_step(last_checkpoint(run_dir)) < step
    if newer:
        ckpt = run_dir / "checkpoints"
        ckpt.mkdir(parents=True, exist_ok=True)
        name = _free_name(ckpt, f"step-{step:07d}")
        tmp = ckpt / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / CHECKPOINT, tmp)
        _fsync(tmp)
        os.replace(tmp, ckpt / name)
        _move_link(ckpt, LAST, name)
        _prune(ckpt)
        said.append(f"{run_dir}: checkpoint of step {step} read back from storage")
    if newer and (src / METRICS_FILE).is_file():  # with a newer local checkpoint, the local records stay
        local = run_dir / METRICS_FILE
        if not any(r.get("kind") == "eval" and r["step"] == step for r in read_jsonl(local).records):
            tmp = run_dir / f".{METRICS_FILE}.storage"
            shutil.copyfile(src / METRICS_FILE, tmp)
            os.replace(tmp, local)
    if (src / "seeds").is_dir():
        for child in sorted((src / "seeds").iterdir()):
            said += unpack_from_storage(child, run_dir / "seeds" / child.name)
    return said
