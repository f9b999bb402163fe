"""How a run's ranks hold its model (`resources.strategy`), and activation checkpointing.

- ddp: every rank holds the whole model and optimizer; DDP averages the gradients.
- fsdp: FSDP2 (`fully_shard`) on each decoder layer and on the root, over a 1-D device mesh built from
  the run's process group: each rank holds a 1/world shard of every parameter, gradient and AdamW
  moment; a layer's parameters are gathered for its forward and again for its backward. Parameters
  stay fp32 when gathered and gradients are reduced in fp32; bf16 compute comes from the loop's
  autocast, as under DDP, so both strategies compute the same model the same way (the model's fp32
  islands, its routers, norms and DTF statistics, stay fp32). FSDP2 cannot shard 0-d parameters (DTF's
  router scalars): those stay whole on every rank, outside FSDP, and their gradients are averaged
  here (`sync_replicated_grads`), as DDP would.
- activation checkpointing: each decoder layer's activations are recomputed in the backward pass
  (`checkpointed`, run by the model's layer loop through `DTLabModel.layer_runner`). What a layer's
  forward changes besides its output (DTF's threshold statistics, updated in training and averaged
  over the ranks) changes once: the recomputation sees the statistics as the forward saw them, and
  neither updates nor all-reduces them again.

With one rank (`world == 1`) there is nothing to spread: the model stays as it is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dtlab.models.routing import Context, LayerOutput
from dtlab.trainers.run.device import Precision

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


def strategy_of(requested: str) -> str:
    """The strategy a run uses: `auto` is resolved by the orchestrator's memory plan before workers
    start; one that reaches the loop unresolved means DDP."""
    return "fsdp" if requested == "fsdp" else "ddp"


def checkpointing(requested: str) -> bool:
    """`training.activation_checkpointing`: `auto` reaching the loop unresolved means off."""
    return requested == "on"


# ---- wrapping --------------------------------------------------------------------------------------
def wrap(model: nn.Module, strategy: str, group: dist.ProcessGroup | None, device: torch.device,
         precision: Precision, activation_checkpointing: bool) -> nn.Module:
    """The model as the run trains it: checkpointed layers when asked, then DDP or FSDP2 over `group`
    when it has more than one rank (the model itself otherwise). `model` is on `device` already."""
    if activation_checkpointing:
        model.model.layer_runner = checkpointed
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return model
    if strategy == "fsdp":
        return _fully_shard(model, group, device, precision)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group)


def _fully_shard(model: nn.Module, group: dist.ProcessGroup | None, device: torch.device,
                 precision: Precision) -> nn.Module:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision.grad_scaler:
        raise ValueError("resources.strategy=fsdp with fp16: the grad scaler would skip steps on some ranks "
                         "only (their shards differ); use precision bf16 or fp32, or strategy ddp")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD, device.type)
    # fp32 gathered parameters, fp32 reduction; the loop's autocast makes the compute bf16 (module docstring)
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    whole = set(replicated_params(model))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=whole)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=whole)
    return model


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP2 leaves whole on every rank (0-d ones), in a fixed order."""
    return [p for p in model.parameters() if p.ndim == 0]


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ---- a training step under either strategy --------------------------------------------------------
def gradient_sync(model: nn.Module, world: int, last_micro: bool) -> contextlib.AbstractContextManager[Any]:
    """Around one micro-batch's forward and backward. DDP: no all-reduce before the last micro-batch
    (`no_sync`). FSDP: the gradients are reduce-scattered after every micro-batch, so that each rank
    only ever holds its shard of them (skipping the sync would hold the whole fp32 gradient on every
    rank until the last micro-batch)."""
    if world > 1 and not last_micro and not is_sharded(model):
        return model.no_sync()
    return contextlib.nullcontext()


def sync_replicated_grads(model: nn.Module, world: int, group: dist.ProcessGroup | None) -> None:
    """FSDP: average the gradients of the parameters it leaves whole over the run's ranks (one
    all-reduce), after the step's last backward."""
    if world == 1 or not is_sharded(model):
        return
    grads = [p.grad for p in replicated_params(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.stack([g.reshape(()) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world
    for g, value in zip(grads, flat.unbind(), strict=True):
        g.copy_(value)


def clip_grad_norm(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole model: the global 2-norm of every gradient,
    and every gradient scaled by min(1, max_norm / (norm + 1e-6)). Under FSDP the norm of the shards
    is summed over the ranks (one all-reduce) and the whole parameters' counted once; the result is a
    plain tensor, the same on every rank."""
    if not is_sharded(model):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    from torch.distributed.tensor import DTensor

    sharded, whole = [], []
    for p in model.parameters():
        if p.grad is not None:
            (sharded if isinstance(p.grad, DTensor) else whole).append(p.grad)
    local = [g.to_local() for g in sharded]
    device = (local or whole)[0].device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    if local:
        sq = sq + torch.stack(torch._foreach_norm(local)).float().pow(2).sum()
    dist.all_reduce(sq, group=group)
    if whole:
        sq = sq + torch.stack(torch._foreach_norm(whole)).float().pow(2).sum()
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grads in (local, whole):
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


def after_forward_only(model: nn.Module) -> None:
    """After a pass without backward (an evaluation, the first training batch's estimates): FSDP keeps
    the root's parameters gathered after its forward (for the backward that usually follows); shard
    them again."""
    if is_sharded(model):
        model.reshard()


# ---- activation checkpointing -----------------------------------------------------------------------
def checkpointed(layer: nn.Module, x_BTD: torch.Tensor, ctx: Context, carry: tuple | None) -> LayerOutput:
    """`layer(x, ctx, carry)` with its activations recomputed in backward (training with gradients
    only; otherwise a plain call). The forward runs once as usual, updating what the layer keeps
    (its buffers: DTF's threshold statistics). The recomputation runs with the buffers as they were
    before that forward, and `ctx.training` off so that it neither updates them nor all-reduces their
    statistics (`Context.training` gates exactly that); the buffers are put back afterwards. So the
    recomputed activations equal the forward's, and the statistics move once per forward."""
    if not (layer.training and torch.is_grad_enabled()):
        return layer(x_BTD, ctx, carry)
    from torch.utils.checkpoint import checkpoint

    buffers = list(layer.buffers())
    before = [b.detach().clone() for b in buffers]
    calls = 0

    def run(x_BTD: torch.Tensor, carry: tuple | None) -> tuple[Any, ...]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return tuple(layer(x_BTD, ctx, carry))
        with _buffers_as(buffers, before):
            return tuple(layer(x_BTD, ctx._replace(training=False), carry))

    return LayerOutput(*checkpoint(run, x_BTD, carry, use_reentrant=False))


@contextlib.contextmanager
def _buffers_as(buffers: list[torch.Tensor], values: list[torch.Tensor]) -> Iterator[None]:
    now = [b.detach().clone() for b in buffers]
    with torch.no_grad():
        for b, v in zip(buffers, values, strict=True):
            b.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, now, strict=True):
                b.copy_(v)
