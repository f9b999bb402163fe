"""Evaluation: validation LM loss on a fixed set of rows, in each routing mode the model declares.

Variant-blind: the model's config says which routing modes mean something for it
(`config.routing_modes`: `topk` for every model, `causal` too for routed ones), and its output
carries the routing statistics; this module averages whatever statistics there are.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dtlab.models.modeling import DTLabForCausalLM
from dtlab.trainers.run.checkpoint import unwrap
from dtlab.trainers.run.device import Precision
from dtlab.trainers.spec import Spec


def flat_stats(stats: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """Per-layer statistics as plain numbers (one host sync for all of them); [T] tensors become lists."""
    tensors = [v.float().reshape(-1) for s in stats.values() for v in s.values()]
    if not tensors:
        return {}
    values = torch.cat(tensors).cpu().tolist()
    out, pos = {}, 0
    for i, s in stats.items():
        layer = {}
        for k, v in s.items():
            n = v.numel()
            layer[k] = values[pos] if v.ndim == 0 else values[pos:pos + n]
            pos += n
        out[str(i)] = layer
    return out


@contextlib.contextmanager
def routing_mode(model: torch.nn.Module, mode: str) -> Iterator[DTLabForCausalLM]:
    """Evaluation mode and `mode` routing for the duration; both restored afterwards."""
    target = unwrap(model)
    was_training, saved = model.training, target.config.routing_mode
    model.eval()
    target.config.routing_mode = mode
    try:
        yield target
    finally:
        target.config.routing_mode = saved
        model.train(was_training)


def _reduce(tensors: list[torch.Tensor], world: int, group: dist.ProcessGroup | None = None) -> None:
    for t in tensors if world > 1 else []:
        dist.all_reduce(t, group=group)


@torch.no_grad()
def eval_pass(target: DTLabForCausalLM, rows: np.ndarray, batch: int, precision: Precision, device: torch.device,
              world: int, group: dist.ProcessGroup | None = None) -> tuple[float, dict[str, Any]]:
    """(mean LM loss over `rows` on all ranks, per-layer statistics averaged the same way)."""
    loss_sum, count = torch.zeros((), device=device), torch.zeros((), device=device)
    stat_sums: dict[int, dict[str, torch.Tensor]] = {}
    for start in range(0, len(rows), batch):
        x = torch.from_numpy(np.asarray(rows[start:start + batch], dtype=np.int64)).to(device)
        with precision.autocast():
            out = target(x, labels=x, return_logits=False)
        n = x.shape[0]
        loss_sum += out.lm_loss.float() * n
        count += n
        for i, s in out.routing_stats.items():
            acc = stat_sums.setdefault(i, {})
            for k, v in s.items():
                acc[k] = acc.get(k, 0) + v.float() * n
    _reduce([loss_sum, count, *(v for s in stat_sums.values() for v in s.values())], world, group)
    n = count.clamp_min(1)
    return (loss_sum / n).item(), flat_stats({i: {k: v / n for k, v in s.items()} for i, s in stat_sums.items()})


def evaluate(model: torch.nn.Module, val: np.ndarray, spec: Spec, precision: Precision, device: torch.device,
             rank: int, world: int, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Validation LM loss (aux losses excluded) and routing statistics in each routing mode the
    model declares: `val_loss_topk` and `routing` for top-k (training semantics: it looks ahead
    within the row), `val_loss_causal` and `routing_causal` for causal routing (routed models).

    `val_loss` (and `val_ppl`) is the headline, the one that selects the best checkpoint and that
    sweeps optimise: the causal loss where there is one (what the model can do token by token),
    else the top-k loss; `routing_mode` says which."""
    training = spec.training
    n_rows = min(len(val), training.eval_batches * training.batch_size * world)
    if n_rows >= world:  # every rank as many rows, so as many passes (FSDP gathers in each)
        n_rows -= n_rows % world
    mine = val[np.arange(rank, n_rows, world)]
    modes = unwrap(model).config.routing_modes
    record: dict[str, Any] = {}
    for mode in modes if training.eval_causal else modes[:1]:
        with routing_mode(model, mode) as target:
            val_loss, routing = eval_pass(target, mine, training.batch_size, precision, device, world, group)
        record.update({f"val_loss_{mode}": val_loss, f"val_ppl_{mode}": math.exp(min(val_loss, 50.0)),
                       "routing" if mode == "topk" else f"routing_{mode}": routing})
        record.update(val_loss=val_loss, val_ppl=record[f"val_ppl_{mode}"], routing_mode=mode)  # the last: causal
    return record
