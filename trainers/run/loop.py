"""The per-worker training loop: a plain function of a config dict. No Ray here.

    train({"spec": spec_dict, "run_dir": "...", "data_dir": "...", "resume": False})

It runs bare (tests, one process, `--no-ray`), under `torchrun`, or inside a Ray Train
`TorchTrainer` (see `orchestrate/ray_train.py`), which passes `Hooks` that report to Ray. When the run's
process group has several ranks the model is wrapped in DDP or sharded with FSDP2
(`resources.strategy`, `parallel.py`) and every rank reads its own shard of the data.

A run's state is built once (`setup`); then `train_step` makes one optimizer step,
`log_step` writes a training record and `evaluate_and_save` an evaluation record and the
checkpoints (`checkpoint.py`). Fresh starts and resumes go through the same functions. The
loop is variant-blind: what to evaluate and which statistics exist come from the model.
Host syncs happen on logging and evaluation steps only; everything else stays on the device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dtlab import models
from dtlab.analysis.rundir import DIVERGED, METRICS, JsonlWriter, diverged_reason, read_jsonl, rewrite_jsonl
from dtlab.models.dtf import set_process_group
from dtlab.trainers.run import checkpoint, parallel
from dtlab.trainers.run.checkpoint import unwrap
from dtlab.trainers.run.data import load_prepared
from dtlab.trainers.run.device import Precision, detect_device, detect_precision, synchronize
from dtlab.trainers.run.evaluation import evaluate, flat_stats
from dtlab.trainers.spec import Spec

log = logging.getLogger(__name__)


class Hooks:
    """What the loop needs from whoever runs it. The default runs in this process. `prefix` starts
    each of the run's log lines (a seed replicate says which seed it is)."""

    prefix = ""

    def device(self, requested: str) -> torch.device:
        kind = detect_device(requested)
        if kind == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device(kind)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Called on every rank at each evaluation; `checkpoint_dir` on rank 0 only."""

    def on_step(self, step: int) -> None:
        """Called before each optimizer step (tests interrupt runs here)."""

    def restore(self, run_dir: Path) -> None:
        """Before setup: bring the checkpoint of record into `run_dir` when it is kept elsewhere
        (Ray's storage); a run's own checkpoints are already there."""

    def export(self, record: dict[str, Any]) -> None:
        """Called on rank 0 with each logged record (Ray exports them as metrics)."""


def say(state: RunState, line: str) -> None:
    """A line about the run, from rank 0, to the `dtlab` log (detail: output.log, or the terminal with
    --verbose)."""
    if state.rank == 0:
        log.debug("%s%s", state.hooks.prefix, line)


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops at once, and stays stopped (a restart or a
    `--resume` would only diverge again from the checkpoint before)."""


def check_finite(state: RunState, record: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Stop the run if any of `keys` in `record` is not finite: a `diverged` record in metrics.jsonl,
    `diverged.json` beside it, then `Diverged` on every rank (the values are all-reduced, so every
    rank sees the same)."""
    bad = {k: record[k] for k in keys if isinstance(record.get(k), float) and not math.isfinite(record[k])}
    if not bad:
        return
    what = ", ".join(f"{k} {v}" for k, v in bad.items())
    reason = f"diverged at step {state.step}: {what} (a lower learning rate, warm-up or grad_clip may help)"
    if state.rank == 0:
        state.write({"kind": "diverged", "step": state.step, "reason": reason, **bad})
        (state.run_dir / DIVERGED).write_text(json.dumps({"step": state.step, "reason": reason,
                                                          **{k: str(v) for k, v in bad.items()}}))
        say(state, reason)
    raise Diverged(reason)


# ---- pieces -------------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: not on norms, biases, embeddings or router parameters."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        exempt = p.ndim < 2 or "embed_tokens" in name or "lm_head" in name or ".router." in name or "norm" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine from 1 to `min_ratio` at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class Batches:
    """Deterministic batches: micro-batch g of the run is a pure function of (seed, g)."""

    def __init__(self, rows: np.ndarray, batch: int, rank: int, world: int, seed: int) -> None:
        self.rows, self.batch, self.rank, self.world, self.seed = rows, batch, rank, world, seed
        self.per_epoch = len(rows) // (batch * world)
        if self.per_epoch < 1:
            raise ValueError(f"{len(rows)} training rows cannot fill one batch of {batch} x {world} workers")
        self._epoch, self._perm = -1, None

    def epoch(self, g: int) -> int:
        """The pass over the data (0: the first) micro-batch g belongs to."""
        return g // self.per_epoch

    def get(self, g: int) -> torch.Tensor:
        epoch, i = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        start = (i * self.world + self.rank) * self.batch
        idx = np.sort(self._perm[start:start + self.batch])
        return torch.from_numpy(np.asarray(self.rows[idx], dtype=np.int64))


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (CUDA) or peak resident memory of the process (elsewhere), GiB."""
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import resource

        return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except (ImportError, OSError):
        return {}


def build_for_training(spec: Spec, vocab_size: int) -> models.DTLabForCausalLM:
    variant = spec.model.type
    overrides = spec.model.overrides_for(variant)
    if spec.training.from_scratch:
        overrides.setdefault("vocab_size", vocab_size)
        return models.build_model(variant, spec.model.size, **overrides)
    return models.build_model(variant, pretrained=spec.model.pretrained, **overrides)


def compiles(spec: Spec, device_type: str) -> bool:
    """`training.compile`: on, off, or auto (on CUDA only: CPU compile time outweighs the gain). Not
    with FSDP or activation checkpointing (yet): the whole-model graph would break at FSDP's hooks
    and at a checkpointed layer's bookkeeping; those runs train eagerly."""
    if parallel.strategy_of(spec.resources.strategy) == "fsdp" or parallel.checkpointing(
            spec.training.activation_checkpointing):
        return False
    return spec.training.compile == "on" or (spec.training.compile == "auto" and device_type == "cuda")


def total_steps(spec: Spec, n_rows: int, world: int) -> int:
    if spec.training.max_steps:
        return spec.training.max_steps
    per_step = spec.training.batch_size * spec.training.grad_accum_steps * world
    return max(1, spec.training.num_epochs * (n_rows // per_step))


# ---- the state of a run --------------------------------------------------------------------------
@dataclass
class RunState:
    """Everything one worker's run holds, built once by `setup`."""

    spec: Spec
    run_dir: Path
    hooks: Hooks
    rank: int
    world: int
    device: torch.device
    precision: Precision
    model: torch.nn.Module  # DDP-wrapped or FSDP-sharded when world > 1 (`parallel.wrap`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    batches: Batches
    val: np.ndarray
    total_steps: int
    info: dict[str, Any] = field(default_factory=dict)  # the run's facts: run.json's "training"
    metrics: JsonlWriter | None = None  # rank 0 only
    # the run's process group (None: the default group); rank and world are within it, and every
    # collective and the DDP/FSDP wrapper use it (several runs, one per group, in one worker group)
    group: dist.ProcessGroup | None = None
    step: int = 0
    best_val: float = math.inf
    last_eval: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False  # from a checkpoint: its step's evaluation is already on record

    @property
    def target(self) -> models.DTLabForCausalLM:
        return unwrap(self.model)

    def write(self, record: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl and export it (rank 0 only)."""
        if self.metrics is not None:
            self.metrics.write(record)
            self.hooks.export({**record, "variant": self.info["variant"], "run": self.info["run"]})


def _optimizer(spec: Spec, model, device: torch.device, precision: Precision, steps: int):
    training = spec.training
    optimizer = torch.optim.AdamW(param_groups(model, training.optimizer.weight_decay), lr=training.optimizer.lr,
                                  betas=tuple(training.optimizer.betas), eps=training.optimizer.eps,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(training.scheduler.warmup_steps, steps, training.scheduler.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
    return optimizer, scheduler, scaler


def run_info(state: RunState, seq_len: int) -> dict[str, Any]:
    """The facts of the run that `run.json` keeps (and the report reads)."""
    config, training = state.target.config, state.spec.training
    return {"variant": config.variant, "capacity": config.capacity, "routing_modes": list(config.routing_modes),
            "device": str(state.device), "precision": state.precision.name, "world_size": state.world,
            "strategy": parallel.strategy_of(state.spec.resources.strategy) if state.world > 1 else "single",
            "activation_checkpointing": parallel.checkpointing(state.spec.training.activation_checkpointing),
            "compiled": compiles(state.spec, state.device.type),
            "total_steps": state.total_steps, "seq_len": seq_len,
            "tokens_per_step": training.batch_size * training.grad_accum_steps * state.world * seq_len,
            "parameters": sum(p.numel() for p in state.target.parameters()),
            "flops_per_token": models.flops_per_token(config, seq_len),
            "flop_ratio_vs_dense": models.flop_ratio_vs_dense(config, seq_len), "run": state.run_dir.name,
            "model_config": {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}}


def setup(config: dict[str, Any], hooks: Hooks, group: dist.ProcessGroup | None = None) -> RunState:
    """Build the run's state once: model (DDP or FSDP when distributed, `parallel.wrap`), optimizer,
    data, and the counters of the last checkpoint when resuming. `group`: the run's process group
    (None: the default one, when initialised)."""
    spec = Spec.model_validate(config["spec"])
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    device = hooks.device(spec.resources.device)
    precision = detect_precision(device.type, spec.resources.precision)
    data = load_prepared(config["data_dir"])
    torch.manual_seed(spec.seed)
    model = build_for_training(spec, data.vocab_size).to(device).train()
    set_process_group(model, group)
    if compiles(spec, device.type):
        # in place (parameter names and checkpoints unchanged); one graph each for training and for
        # evaluation per routing mode (causal routing then runs its static, masked form)
        model.compile(fullgraph=True, backend=os.environ.get("DTLAB_COMPILE_BACKEND", "inductor"))
    elif spec.training.compile == "on":
        log.warning("training.compile=on: not with fsdp or activation checkpointing (yet); training eagerly")
    model = parallel.wrap(model, parallel.strategy_of(spec.resources.strategy), group, device, precision,
                          parallel.checkpointing(spec.training.activation_checkpointing))
    steps = total_steps(spec, len(data.train), world)
    state = RunState(spec, Path(config["run_dir"]), hooks, rank, world, device, precision, model,
                     *_optimizer(spec, model, device, precision, steps),
                     Batches(data.train, spec.training.batch_size, rank, world, spec.seed), data.val, steps,
                     group=group)
    state.info = run_info(state, int(data.train.shape[1]))
    # passes over the training rows the run will make (above 1: the data repeats)
    state.info["epochs"] = steps * spec.training.grad_accum_steps / state.batches.per_epoch
    # A fresh run starts in an empty directory (the runner sees to it), so a checkpoint here means a
    # resume, or a restart of this run's worker group by Ray (a failure, a preemption): either way it
    # continues from that checkpoint, and records past it are cut back.
    if checkpoint.last_checkpoint(state.run_dir).is_dir():
        resume(state)
    elif rank == 0 and (state.run_dir / METRICS).exists():  # restarted before its first checkpoint
        rewrite_jsonl(state.run_dir / METRICS, lambda r: False)
    if rank == 0:
        start_records(state)
    return state


def resume(state: RunState) -> None:
    """Restore the last checkpoint. Records past it are dropped (they are logged again, identically);
    its own evaluation record is restored if a crash came between the checkpoint and the record."""
    path = checkpoint.last_checkpoint(state.run_dir)
    saved = checkpoint.load(path, state.model, state.optimizer, state.scheduler, state.scaler)
    state.step, state.best_val, state.last_eval = saved["step"], saved["best_val"], saved.get("last_eval", {})
    state.resumed = True
    if state.rank == 0:
        metrics = state.run_dir / METRICS
        on_record = any(r.get("kind") == "eval" and r["step"] == state.step for r in read_jsonl(metrics).records)
        rewrite_jsonl(metrics, lambda r: r.get("step", 0) <= state.step,
                      append=[state.last_eval] if state.last_eval and not on_record else [])
        say(state, f"resumed from {path.resolve().name} at step {state.step}")


def start_records(state: RunState) -> None:
    run_json = state.run_dir / "run.json"
    run = json.loads(run_json.read_text()) if run_json.is_file() else {}
    run_json.write_text(json.dumps({**run, "training": state.info}, indent=1))
    state.metrics = JsonlWriter(state.run_dir / METRICS)
    info = state.info
    say(state, f"training {info['variant']} on {state.device} ({state.precision.name}), {state.world} "
                    f"worker(s), {state.total_steps} steps of {info['tokens_per_step']:,} tokens")


# ---- one step, its record, an evaluation ---------------------------------------------------------
@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # mean over the step's micro-batches, detached, on the device
    grad_norm: torch.Tensor
    lr: float  # the learning rate this step used
    routing: dict[int, dict[str, torch.Tensor]]  # statistics of the last micro-batch


def train_step(state: RunState) -> StepResult:
    """One optimizer step over `grad_accum_steps` micro-batches (DDP syncs on the last only; FSDP
    reduce-scatters each, `parallel.gradient_sync`)."""
    training, model, scaler = state.spec.training, state.model, state.scaler
    state.target.set_schedule_step(state.step)
    losses: dict[str, torch.Tensor] = {}
    for m in range(training.grad_accum_steps):
        x = state.batches.get(state.step * training.grad_accum_steps + m).to(state.device, non_blocking=True)
        last_micro = m == training.grad_accum_steps - 1
        with parallel.gradient_sync(model, state.world, last_micro):
            with state.precision.autocast():
                out = model(x, labels=x, return_logits=False)
            loss = out.loss / training.grad_accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
        for name, value in [("loss", out.loss), ("lm_loss", out.lm_loss), *out.aux_losses.items()]:
            losses[name] = losses.get(name, 0) + value.detach().float() / training.grad_accum_steps
    parallel.sync_replicated_grads(model, state.world, state.group)
    if scaler:
        scaler.unscale_(state.optimizer)
    grad_norm = parallel.clip_grad_norm(model, training.grad_clip, state.group)
    if scaler:
        scaler.step(state.optimizer)
        scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    lr = state.scheduler.get_last_lr()[0]
    state.scheduler.step()
    state.step += 1
    return StepResult(losses, grad_norm, lr, out.routing_stats)


class Meter:
    """Training losses summed since the last record, and the training time they took."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, result: StepResult) -> None:
        for name, value in result.losses.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Time spent on something else (evaluation): tokens/s counts training time only."""
        self.start += seconds


def log_step(state: RunState, meter: Meter, last: StepResult) -> None:
    """The training record of this step: mean losses since the last one (the logging sync point)."""
    names = sorted(meter.sums)
    stacked = torch.stack([meter.sums[n] / meter.steps for n in names])
    if state.world > 1:
        dist.all_reduce(stacked, group=state.group)
        stacked = stacked / state.world
    values = stacked.cpu().tolist()
    synchronize(state.device.type)
    elapsed = time.perf_counter() - meter.start
    tokens = state.info["tokens_per_step"]
    record = {"kind": "train", "step": state.step, **dict(zip(names, values, strict=True)),
              "lr": last.lr,
              "grad_norm": float(last.grad_norm), "tokens_per_s": meter.steps * tokens / elapsed,
              "tokens_seen": state.step * tokens,
              "epoch": state.batches.epoch(state.step * state.spec.training.grad_accum_steps - 1),
              **memory_stats(state.device),
              "routing": flat_stats({i: {k: v for k, v in s.items() if v.ndim == 0} for i, s in last.routing.items()})}
    state.write(record)
    check_finite(state, record, ("loss", "lm_loss", "grad_norm"))
    say(state, f"step {state.step}/{state.total_steps} | loss {record['loss']:.4f} | "
            f"lm {record['lm_loss']:.4f} | lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s")


def evaluate_and_save(state: RunState) -> dict[str, Any]:
    """An evaluation, the checkpoints (`best` when the headline loss improved), then its record and
    a report to the runner. The checkpoint holds the record too: a crash between the two loses
    nothing (`resume` restores the record), and a record never outlives its checkpoint."""
    tokens = state.info["tokens_per_step"]
    record = {"kind": "eval", "step": state.step, "tokens_seen": state.step * tokens,
              "train_flops": state.step * tokens * state.info["flops_per_token"],
              # the configuration's cost, the same at every step (a sweep's compute objective)
              "flops_per_token": state.info["flops_per_token"],
              "flop_ratio_vs_dense": state.info["flop_ratio_vs_dense"],
              "done": state.step >= state.total_steps,
              **evaluate(state.model, state.val, state.spec, state.precision, state.device, state.rank, state.world,
                         state.group)}
    parallel.after_forward_only(state.model)
    check_finite(state, record, ("val_loss",))  # before a checkpoint of weights that gave it
    state.last_eval = record
    path = None
    # The untrained step 0 is evaluated but not saved (a restart before the first checkpoint starts
    # over); `best` is the best of the saved checkpoints, so step 0's loss does not count towards it.
    if state.spec.training.checkpoint and state.step > 0:
        improved = record["val_loss"] < state.best_val
        state.best_val = min(state.best_val, record["val_loss"])
        counters = {"step": state.step, "best_val": state.best_val, "last_eval": record, "info": state.info}
        gathered = checkpoint.gather(state.model, state.optimizer, state.rank)  # FSDP: every rank takes part
        if state.rank == 0:
            path = checkpoint.save(state.run_dir, state.model, state.optimizer, state.scheduler, state.scaler,
                                   counters, improved, gathered)
    state.write(record)
    topk = f", top-k {record['val_loss_topk']:.4f}" if record["routing_mode"] != "topk" else ""
    say(state, f"eval step {state.step}: val_loss {record['val_loss']:.4f} ({record['routing_mode']} "
        f"routing, ppl {record['val_ppl']:.1f}){topk}")
    state.hooks.report(scalars(record), path)
    return record


@torch.no_grad()
def fill_estimates(state: RunState) -> None:
    """At the start of a fresh run: one training-mode pass without gradients over the first training
    batch, so that what the model estimates from training batches (DTF's causal threshold) holds a
    training batch's value, not its initial placeholder, before the step-0 evaluation or a first step
    in causal routing. No weight changes."""
    with state.precision.autocast():
        state.target(state.batches.get(0).to(state.device), return_logits=False)
    parallel.after_forward_only(state.model)


def scalars(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not isinstance(v, dict)}


# ---- the loop -------------------------------------------------------------------------------------
def evaluate_at_start(state: RunState) -> None:
    """A fresh run's first pass (and its step-0 evaluation); a resumed run with nothing left to do
    says its last evaluation once."""
    if state.step == 0 and not state.resumed:
        fill_estimates(state)
        if state.spec.training.eval_at_start:
            evaluate_and_save(state)
    elif state.step >= state.total_steps and state.last_eval:
        state.hooks.report(scalars(state.last_eval), None)


def train_until(state: RunState, until: int, meter: Meter) -> Meter:
    """Train to step `until` (an evaluation step or the last), logging and evaluating on the way;
    returns the meter of the steps not yet logged."""
    training = state.spec.training
    while state.step < until:
        state.hooks.on_step(state.step)
        result = train_step(state)
        meter.add(result)
        if state.step % training.log_every == 0 or state.step == state.total_steps:
            log_step(state, meter, result)
            meter = Meter()
        if state.step % training.eval_every == 0 or state.step == state.total_steps:
            started = time.perf_counter()
            evaluate_and_save(state)
            meter.exclude(time.perf_counter() - started)
    return meter


def train(config: dict[str, Any], hooks: Hooks | None = None, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Train one run (one variant, one seed) as `config["spec"]` says; returns the last evaluation
    record. Seed replicates are the caller's choice (`orchestrate/replicates.py`)."""
    hooks = hooks or Hooks()
    why = diverged_reason(Path(config["run_dir"]))
    if why:  # a restarted worker group, or a resumed run: it would only diverge again
        raise Diverged(f"{why}; the run stays stopped")
    hooks.restore(Path(config["run_dir"]))
    state = setup(config, hooks, group)
    try:
        evaluate_at_start(state)
        train_until(state, state.total_steps, Meter())
    finally:
        if state.metrics is not None:
            state.metrics.close()
    return state.last_eval
