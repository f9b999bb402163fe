"""The per-worker training loop: a plain function of a config dict. No Ray here.

    train({"spec": spec_dict, "run_dir": "...", "data_dir": "...", "resume": False})

It runs bare (tests, one process, `--no-ray`), under `torchrun`, or inside a Ray Train
`TorchTrainer` (see `ray_train.py`), which passes `Hooks` that report to Ray. When a process
group is initialised the model is wrapped in DDP and every rank reads its own shard.

Host syncs happen on logging and evaluation steps only; everything else stays on the device.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import models

from .data import load_prepared
from .device import Precision, detect_device, detect_precision, synchronize
from .spec import Spec

LAST, BEST = "last", "best"


class Hooks:
    """What the loop needs from whoever runs it. The default runs in this process."""

    def device(self, requested: str) -> torch.device:
        kind = detect_device(requested)
        if kind == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device(kind)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Called on every rank at each evaluation; `checkpoint_dir` on rank 0 only."""

    def on_step(self, step: int) -> None:
        """Called before each optimizer step (tests interrupt runs here)."""

    def export(self, record: dict[str, Any]) -> None:
        """Called on rank 0 with each logged record (Ray exports them as metrics)."""

    def log(self, line: str) -> None:
        print(line, flush=True)


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


def lr_lambda(warmup: int, total: int, min_ratio: float):
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

    def get(self, g: int) -> torch.Tensor:
        epoch, i = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        start = (i * self.world + self.rank) * self.batch
        idx = np.sort(self._perm[start:start + self.batch])
        return torch.from_numpy(np.asarray(self.rows[idx], dtype=np.int64))


def unwrap(model: torch.nn.Module) -> models.DTLabForCausalLM:
    return model.module if hasattr(model, "module") else model


def flat_stats(stats: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """Per-layer routing statistics as plain numbers (one host sync for all of them)."""
    keep = {i: {k: v for k, v in s.items() if k != "selected"} for i, s in stats.items()}
    tensors = [v.float().reshape(-1) for s in keep.values() for v in s.values()]
    if not tensors:
        return {}
    values = torch.cat(tensors).cpu().tolist()
    out, pos = {}, 0
    for i, s in keep.items():
        layer = {}
        for k, v in s.items():
            n = v.numel()
            layer[k] = values[pos] if v.ndim == 0 else values[pos:pos + n]
            pos += n
        out[str(i)] = layer
    return out


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (CUDA) or peak resident memory of the process (elsewhere), GiB."""
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import resource

        return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except (ImportError, OSError):
        return {}


def _all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t


# ---- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, model, optimizer, scheduler, scaler, state: dict[str, Any], best: bool) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f".{LAST}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, **state}, tmp / "trainer_state.pt")
    last = ckpt / LAST
    old = ckpt / f".{LAST}.old"
    shutil.rmtree(old, ignore_errors=True)
    if last.exists():
        os.replace(last, old)
    os.replace(tmp, last)
    shutil.rmtree(old, ignore_errors=True)
    if best:
        shutil.rmtree(ckpt / f".{BEST}.tmp", ignore_errors=True)
        shutil.copytree(last, ckpt / f".{BEST}.tmp")
        shutil.rmtree(ckpt / BEST, ignore_errors=True)
        os.replace(ckpt / f".{BEST}.tmp", ckpt / BEST)
    return last


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> dict[str, Any]:
    from safetensors.torch import load_file

    target = unwrap(model)
    state = load_file(path / "model.safetensors", device=str(next(target.parameters()).device))
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = target.config.tie_word_embeddings
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
    if tied:
        target.tie_weights()
    trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(trainer.pop("optimizer"))
    scheduler.load_state_dict(trainer.pop("scheduler"))
    scaler_state = trainer.pop("scaler")
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    return trainer


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop records past the checkpoint; they are logged again, identically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by the crash that made us resume
            continue
    path.write_text("".join(line + "\n" for line in keep))


# ---- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, val: np.ndarray, spec: Spec, precision: Precision, device, rank: int, world: int) -> dict:
    """Validation LM loss (aux losses excluded) over a fixed set of rows, in `topk` and, for
    routed variants, `causal` routing; routing statistics averaged over the batches."""
    target = unwrap(model)
    n_rows = min(len(val), spec.training.eval_batches * spec.training.batch_size * world)
    mine = np.arange(rank, n_rows, world)
    B = spec.training.batch_size
    modes = ["topk"] + (["causal"] if spec.training.eval_causal and target.config.variant != "standard" else [])
    was_training, saved_mode = model.training, target.config.routing_mode
    model.eval()
    record: dict[str, Any] = {}
    try:
        for mode in modes:
            target.config.routing_mode = mode
            loss_sum = torch.zeros((), device=device)
            count = torch.zeros((), device=device)
            stat_sums: dict[int, dict[str, torch.Tensor]] = {}
            for start in range(0, len(mine), B):
                x = torch.from_numpy(np.asarray(val[mine[start:start + B]], dtype=np.int64)).to(device)
                with precision.autocast():
                    out = target(x, labels=x, return_logits=False)
                n = x.shape[0]
                loss_sum += out.lm_loss.float() * n
                count += n
                for i, s in out.routing_stats.items():
                    acc = stat_sums.setdefault(i, {})
                    for k, v in s.items():
                        if k != "selected":
                            acc[k] = acc.get(k, 0) + v.float() * n
            if world > 1:
                dist.all_reduce(loss_sum)
                dist.all_reduce(count)
                for s in stat_sums.values():
                    for v in s.values():
                        dist.all_reduce(v)
            val_loss = (loss_sum / count.clamp_min(1)).item()
            routing = flat_stats({i: {k: v / count.clamp_min(1) for k, v in s.items()} for i, s in stat_sums.items()})
            suffix = "" if mode == "topk" else "_causal"
            record[f"val_loss{suffix}"] = val_loss
            record[f"val_ppl{suffix}"] = math.exp(min(val_loss, 50.0))
            record[f"routing{suffix}"] = routing
    finally:
        target.config.routing_mode = saved_mode
        model.train(was_training)
    record["routing_mode"] = "topk"
    return record


# ---- the loop ------------------------------------------------------------------------------------
def build_for_training(spec: Spec, vocab_size: int) -> models.DTLabForCausalLM:
    variant = spec.model.type
    overrides = spec.model.overrides_for(variant)
    if spec.training.from_scratch:
        overrides.setdefault("vocab_size", vocab_size)
        return models.build_model(variant, spec.model.size, **overrides)
    return models.build_model(variant, pretrained=spec.model.pretrained, **overrides)


def total_steps(spec: Spec, n_rows: int, world: int) -> int:
    if spec.training.max_steps:
        return spec.training.max_steps
    per_step = spec.training.batch_size * spec.training.grad_accum_steps * world
    return max(1, spec.training.num_epochs * (n_rows // per_step))


def train(config: dict[str, Any], hooks: Hooks | None = None) -> dict[str, Any]:
    """Train one variant as `config["spec"]` says; returns the last evaluation record."""
    hooks = hooks or Hooks()
    spec = Spec.model_validate(config["spec"])
    run_dir = Path(config["run_dir"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = hooks.device(spec.resources.device)
    precision = detect_precision(device.type, spec.resources.precision)
    data = load_prepared(config["data_dir"])
    tcfg = spec.training
    torch.manual_seed(spec.seed)
    model = build_for_training(spec, data.vocab_size).to(device).train()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, tcfg.optimizer.weight_decay), lr=tcfg.optimizer.lr,
                                  betas=tuple(tcfg.optimizer.betas), eps=tcfg.optimizer.eps,
                                  fused=device.type == "cuda")
    steps = total_steps(spec, len(data.train), world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tcfg.scheduler.warmup_steps, steps, tcfg.scheduler.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
    batches = Batches(data.train, tcfg.batch_size, rank, world, spec.seed)
    metrics_path = run_dir / "metrics.jsonl"
    step, best_val, last_eval = 0, float("inf"), {}
    if config.get("resume") and (run_dir / "checkpoints" / LAST).is_dir():
        state = load_checkpoint(run_dir / "checkpoints" / LAST, model, optimizer, scheduler, scaler)
        step, best_val, last_eval = state["step"], state["best_val"], state.get("last_eval", {})
        if rank == 0:
            truncate_metrics(metrics_path, step)
            hooks.log(f"resumed from {run_dir / 'checkpoints' / LAST} at step {step}")
    target = unwrap(model)
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum_steps * world * data.train.shape[1]
    info = {"variant": target.config.variant, "device": str(device), "precision": precision.name, "world_size": world,
            "total_steps": steps, "tokens_per_step": tokens_per_step,
            "parameters": sum(p.numel() for p in target.parameters()),
            "flops_per_token": models.flops_per_token(target.config, data.train.shape[1]),
            "flop_ratio_vs_dense": models.flop_ratio_vs_dense(target.config, data.train.shape[1]),
            "seq_len": int(data.train.shape[1]), "run": run_dir.name,
            "model_config": {k: v for k, v in target.config.to_dict().items()
                             if isinstance(v, (int, float, str, bool))}}
    metrics_file = None
    if rank == 0:
        run_json = run_dir / "run.json"
        run = json.loads(run_json.read_text()) if run_json.is_file() else {}
        run_json.write_text(json.dumps({**run, "training": info}, indent=1))
        metrics_file = metrics_path.open("a")
        hooks.log(f"training {info['variant']} on {device} ({precision.name}), {world} worker(s), "
                  f"{steps} steps of {tokens_per_step:,} tokens")

    def write(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def do_eval() -> dict[str, Any]:
        nonlocal best_val, last_eval
        record = {"kind": "eval", "step": step, "tokens_seen": step * tokens_per_step,
                  "train_flops": step * tokens_per_step * info["flops_per_token"], "done": step >= steps,
                  **evaluate(model, data.val, spec, precision, device, rank, world)}
        write(record)
        if rank == 0:
            hooks.export({**record, "variant": info["variant"], "run": info["run"]})
        improved = record["val_loss"] < best_val
        best_val = min(best_val, record["val_loss"])
        last_eval = record
        ckpt = None
        if tcfg.checkpoint and rank == 0:
            ckpt = save_checkpoint(run_dir, model, optimizer, scheduler, scaler,
                                   {"step": step, "best_val": best_val, "last_eval": record, "info": info}, improved)
        if rank == 0:
            causal = f", causal {record['val_loss_causal']:.4f}" if "val_loss_causal" in record else ""
            hooks.log(f"eval step {step}: val_loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f}){causal}")
        hooks.report({k: v for k, v in record.items() if not isinstance(v, dict)}, ckpt)
        return record

    try:
        if step == 0 and tcfg.eval_at_start:
            do_eval()
        elif step >= steps and last_eval:  # resumed with nothing left: say where it ended, once
            hooks.report({k: v for k, v in last_eval.items() if not isinstance(v, dict)}, None)
        sums: dict[str, torch.Tensor] = {}
        t_log, steps_since = time.perf_counter(), 0
        while step < steps:
            hooks.on_step(step)
            target.set_schedule_step(step)
            for m in range(tcfg.grad_accum_steps):
                x = batches.get(step * tcfg.grad_accum_steps + m).to(device, non_blocking=True)
                last_micro = m == tcfg.grad_accum_steps - 1
                sync_ctx = model.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
                with sync_ctx:
                    with precision.autocast():
                        out = model(x, labels=x, return_logits=False)
                    loss = out.loss / tcfg.grad_accum_steps
                    (scaler.scale(loss) if scaler else loss).backward()
                for name, value in [("loss", out.loss), ("lm_loss", out.lm_loss), *out.aux_losses.items()]:
                    sums[name] = sums.get(name, 0) + value.detach().float() / tcfg.grad_accum_steps
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            steps_since += 1
            if step % tcfg.log_every == 0 or step == steps:  # the logging sync point
                names = sorted(sums)
                values = _all_reduce_mean(torch.stack([sums[n] / steps_since for n in names]), world).cpu().tolist()
                synchronize(device.type)
                elapsed = time.perf_counter() - t_log
                record = {"kind": "train", "step": step, **dict(zip(names, values, strict=True)), "lr": lr,
                          "grad_norm": float(grad_norm), "tokens_per_s": steps_since * tokens_per_step / elapsed,
                          "tokens_seen": step * tokens_per_step, **memory_stats(device),
                          "routing": flat_stats({i: {k: v for k, v in s.items() if k != "selected_by_pos"}
                                                 for i, s in out.routing_stats.items()})}
                write(record)
                if rank == 0:
                    hooks.export({**record, "variant": info["variant"], "run": info["run"]})
                    hooks.log(f"step {step}/{steps} | loss {record['loss']:.4f} | lm {record['lm_loss']:.4f} | "
                              f"lr {lr:.2e} | {record['tokens_per_s']:,.0f} tok/s")
                sums, t_log, steps_since = {}, time.perf_counter(), 0
            if step % tcfg.eval_every == 0 or step == steps:
                t_eval = time.perf_counter()
                do_eval()
                t_log += time.perf_counter() - t_eval  # tokens/s counts training time only
    finally:
        if metrics_file is not None:
            metrics_file.close()
    return last_eval
