"""The plan of a spec before any work: per run, devices, strategy, memory per device, steps, tokens,
FLOPs and (with a bench result) time, on this machine or on a described cluster.

    runs = plan_runs(load_spec("experiments/sweep_multigpu.yaml"), parse_cluster("4x8xH100-80GB"))
    print(format_plan(runs))

Memory comes from `models.memory.training_memory` (what one training step holds per device). A run
whose `resources.strategy` or `training.activation_checkpointing` is `auto` is resolved here: ddp when
it fits, else fsdp (more than one rank); activation checkpointing off when it fits, else on. A run that
fits in no allowed way is refused (`SpecError`) with its estimate and what would fit. A sweep is
planned at the worst corner of its search space for each variant; a replicate trial runs its seeds
side by side, each on devices of its own (memory per device is one seed's).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from dtlab.models.config import PRESETS, SHAPE_DEFAULTS, config_class, make_config
from dtlab.models.flops import flops_per_token, param_count
from dtlab.models.memory import GiB, Memory, training_memory
from dtlab.trainers.spec import DENSE_CONTROL, Spec, SpecError

log = logging.getLogger(__name__)

# GPU types a cluster description may name: memory as the driver reports it (nvidia-smi's total), and
# dense bf16 peak FLOP/s from the vendors' datasheets (no sparsity).
GPUS: dict[str, tuple[int, float]] = {
    "H100-80GB": (81_559 * 2**20, 989.4e12),
    "H200-141GB": (143_771 * 2**20, 989.4e12),
    "A100-80GB": (81_920 * 2**20, 312e12),
    "A100-40GB": (40_960 * 2**20, 312e12),
    "L40S-48GB": (46_068 * 2**20, 362e12),
    "L4-24GB": (23_034 * 2**20, 121e12),
}
# What a device keeps for itself besides the run's tensors: the CUDA context, cuBLAS and NCCL
# workspaces (RESERVED), and the caching allocator's fragmentation (a fraction of the rest).
RESERVED = 1 * GiB
USABLE = 0.92
CLUSTER_PATTERN = re.compile(r"^(\d+)x(\d+)x([A-Za-z0-9]+-\d+GB)$")
# Model keys that change what a step holds (others, such as initial values or loss weights, do not).
MEMORY_KEYS = {*SHAPE_DEFAULTS, "mod_capacity", "dtf_capacity", "mod_use_predictor", "routing_mode",
               "loss_chunk_tokens", "prior_ffn_intermediate_size_factor", "beta_mode"}
SPEC_MEMORY_KEYS = {"training.batch_size", "training.grad_accum_steps", "data.block_size",
                    "resources.num_workers", "resources.strategy", "training.activation_checkpointing",
                    "resources.gpus_per_worker", "resources.precision", "training.max_steps"}
CHECKPOINTING_COST = 4 / 3  # recomputing the forward pass: 4 passes' worth of compute instead of 3


@dataclass(frozen=True)
class Cluster:
    """Where runs go: `nodes` x `per_node` devices of one kind."""

    nodes: int
    per_node: int
    gpu: str  # a GPUS name, a CUDA device's name, or "cpu"
    memory: int  # bytes per device (CPU: available memory, shared by the workers)
    peak_flops: float | None  # bf16 FLOP/s per device, where known
    described: bool = False  # from --cluster, not this machine

    @property
    def devices(self) -> int:
        return self.nodes * self.per_node

    @property
    def cuda(self) -> bool:
        return self.gpu != "cpu"

    def name(self) -> str:
        if self.described:
            return f"{self.nodes}x{self.per_node}x{self.gpu}"
        if not self.cuda:
            return f"this machine (CPU, {self.memory / GiB:,.1f} GiB available)"
        return f"this machine ({self.per_node} x {self.gpu}, {self.memory / GiB:,.1f} GiB each)"

    def budget(self, share: float = 1.0) -> int:
        """Bytes one rank may plan for: its share of a GPU, less what CUDA keeps; on CPU all of it."""
        if not self.cuda:
            return self.memory
        return int(self.memory * min(1.0, share) * USABLE - RESERVED)


def parse_cluster(text: str) -> Cluster:
    """`NODESxGPUSxTYPE-MEMGB`, e.g. `4x8xH100-80GB`, with TYPE-MEM one of `GPUS`."""
    m = CLUSTER_PATTERN.match(text.strip())
    known = ", ".join(GPUS)
    if not m:
        raise SpecError(f"--cluster {text!r}: expected NODESxGPUS_PER_NODExTYPE-MEMORY, e.g. 4x8xH100-80GB "
                        f"(known types: {known})")
    nodes, per_node, gpu = int(m.group(1)), int(m.group(2)), m.group(3)
    if not 1 <= nodes <= 100_000 or not 1 <= per_node <= 64:
        raise SpecError(f"--cluster {text!r}: expected 1 to 100,000 nodes of 1 to 64 GPUs, got {nodes} x {per_node}")
    key = next((k for k in GPUS if k.lower() == gpu.lower()), None)
    if key is None:
        from dtlab.models.config import did_you_mean

        raise SpecError(f"--cluster {text!r}: unknown GPU type {gpu!r}{did_you_mean(gpu, GPUS)}; known types: "
                        f"{known}")
    memory, flops = GPUS[key]
    return Cluster(nodes, per_node, key, memory, flops, described=True)


def this_machine(device: str = "auto") -> Cluster:
    """The GPUs torch sees here (all of one kind, as the first), or this machine's CPU memory."""
    import torch

    from dtlab.trainers.run.device import detect_device, peak_flops
    from dtlab.trainers.tools.bench import available_memory_gib

    try:
        kind = detect_device(device)
    except ValueError as err:
        raise SpecError(f"resources.device: {err}") from None
    if kind == "cuda":
        props = torch.cuda.get_device_properties(0)
        return Cluster(1, torch.cuda.device_count(), props.name, int(props.total_memory), peak_flops("cuda"))
    have = available_memory_gib("cpu")
    return Cluster(1, 1, "cpu", int((have or 0.0) * GiB), None)


# ---- one run's plan -------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    """The plan of one run (or, in a sweep, of the worst trial of one variant)."""

    name: str  # what runs: a variant, with its seeds or its sweep corner
    variant: str
    params: int
    ranks: int  # ranks of one run (one seed): num_workers
    seeds: int  # seeds trained side by side (a replicate trial), else 1
    runs: int  # runs like this one (an experiment's seeds, a sweep's trials), at most
    share: float  # of a GPU per rank (gpus_per_worker)
    budget: int  # bytes one rank may use
    precision: str  # fp32, bf16, fp16
    fused: bool  # fused AdamW (CUDA)
    strategy: str
    checkpointing: bool
    memory: Memory
    micro_batch: int
    accum: int
    seq_len: int
    steps: int | None
    tokens: int | None  # per run (one seed)
    flops: float | None  # training FLOPs per run (one seed)
    epochs: float | None = None
    epochs_note: str = ""
    seconds: float | None = None  # estimated wall time of one run
    time_note: str = "no bench result"
    corner: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, str] = field(default_factory=dict)  # auto keys, as decided
    available: float | None = None  # GPUs the cluster has (None: not counted, on CPU)

    @property
    def devices(self) -> int:
        return self.ranks * self.seeds

    @property
    def enough_devices(self) -> bool:
        return self.available is None or self.devices * min(1.0, self.share) <= self.available + 1e-9

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.budget and self.enough_devices


def model_config(spec: Spec, variant: str, vocab_size: int | None = None) -> Any:
    """The config `variant` trains with under `spec`: a preset and its overrides (the vocabulary the
    data's, when known), or a checkpoint's shape for transfer (read locally: a directory, or the hub's
    cache; else the Qwen2.5 preset its name says, e.g. Qwen/Qwen2.5-0.5B -> 0.5B)."""
    base = "standard" if variant == DENSE_CONTROL else variant
    overrides = spec.model.overrides_for(base)
    if spec.training.from_scratch:
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        elif spec.data.tokenizer is None:
            overrides.setdefault("vocab_size", spec.data.vocab_size)
        return make_config(base, spec.model.size, **overrides)
    shape = _checkpoint_shape(str(spec.model.pretrained))
    return config_class(base)(**{**shape, **overrides})


def _checkpoint_shape(name: str) -> dict[str, Any]:
    from dtlab.models.loading import checkpoint_shape

    path = Path(name).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            path = Path(cached).parent if isinstance(cached, str) else path
        except Exception:  # not a hub name, or no cache: fall back below
            pass
    if path.is_dir():
        try:
            return checkpoint_shape(path)
        except ValueError as err:
            raise SpecError(f"model.pretrained: {err}") from None
    preset = next((p for p in PRESETS if re.search(rf"qwen2(\.5)?-{re.escape(p)}$", name, re.IGNORECASE)), None)
    if preset is None:
        raise SpecError(f"model.pretrained={name!r}: its shape is not known here (not a local checkpoint, not in the "
                        "hub's cache); fetch it once (dtlab prepare or a run) or name a local directory")
    return dict(PRESETS[preset])


def _steps(spec: Spec, rows: int | None, ranks: int) -> int | None:
    t = spec.training
    if t.max_steps:
        return t.max_steps
    if rows is None:
        return None
    return max(1, t.num_epochs * (rows // (t.batch_size * t.grad_accum_steps * ranks)))


def _candidates(spec: Spec, ranks: int) -> list[tuple[str, bool]]:
    """(strategy, checkpointing) in order of preference. The strategy first: ddp where it fits without
    recomputation (or with it, when the spec asks for it), else fsdp (more than one rank to shard over);
    then checkpointing, off where the strategy fits without it. Concrete settings stay as given."""
    strategies = ["ddp", "fsdp"] if spec.resources.strategy == "auto" else [spec.resources.strategy]
    if ranks == 1 and spec.resources.strategy == "auto":
        strategies = ["ddp"]  # nothing to shard over
    ckpt = {"auto": [False, True], "on": [True], "off": [False]}[spec.training.activation_checkpointing]
    if len(strategies) == 2:
        return [("ddp", ckpt[0])] + [("fsdp", c) for c in ckpt]
    return [(strategies[0], c) for c in ckpt]


def _precision(spec: Spec, cluster: Cluster) -> str:
    p = spec.resources.precision
    if p != "auto":
        return p
    return "bf16" if cluster.cuda else "fp32"


def plan_run(spec: Spec, variant: str, cluster: Cluster, seeds: int = 1, runs: int = 1, vocab_size: int | None = None,
             rows: int | None = None, bench: list[dict[str, Any]] | None = None, name: str | None = None,
             corner: dict[str, Any] | None = None) -> RunPlan:
    """The plan of one run of `variant` under `spec` on `cluster`, `auto` settings resolved (the first
    candidate that fits, else the most frugal one, which `check_plan` refuses)."""
    config = model_config(spec, variant, vocab_size)
    ranks = spec.resources.num_workers
    share = spec.resources.gpus_per_worker if spec.resources.gpus_per_worker is not None else 1.0
    budget = cluster.budget(share) if cluster.cuda else cluster.memory // max(1, ranks * seeds)
    precision, T = _precision(spec, cluster), spec.data.block_size
    B, accum = spec.training.batch_size, spec.training.grad_accum_steps
    options = []
    for strategy, ckpt in _candidates(spec, ranks):
        mem = training_memory(config, B, T, precision, strategy, ranks, ckpt, fused_adamw=cluster.cuda)
        options.append((strategy, ckpt, mem))
        if mem.peak <= budget:
            break
    strategy, ckpt, mem = options[-1] if options[-1][2].peak <= budget else min(options, key=lambda o: o[2].peak)
    steps = _steps(spec, rows, ranks)
    tokens = None if steps is None else steps * B * accum * ranks * T
    flops = None if tokens is None else tokens * flops_per_token(config, T)
    resolved = {}
    if spec.resources.strategy == "auto":
        resolved["resources.strategy"] = strategy
    if spec.training.activation_checkpointing == "auto":
        resolved["training.activation_checkpointing"] = "on" if ckpt else "off"
    plan = RunPlan(name or variant, variant, param_count(config), ranks, seeds, runs, share, budget, precision,
                   cluster.cuda, strategy, ckpt, mem, B, accum, T, steps, tokens, flops, corner=dict(corner or {}),
                   resolved=resolved, available=_countable(cluster))
    if rows is not None and steps is not None:
        plan.epochs = steps * accum / max(1, rows // (B * ranks))
    elif spec.data.max_tokens and tokens is not None:
        train_tokens = spec.data.max_tokens * (1 - spec.data.val_fraction)
        plan.epochs_note = f"at least {tokens / train_tokens:.2f} (of data.max_tokens; data not prepared here)"
    _estimate_time(plan, config, cluster, bench or [])
    return plan


def _countable(cluster: Cluster) -> int | None:
    """The GPUs a run may use, when this process knows them: a described cluster's, this machine's (not
    when it is one node of a Ray cluster, RAY_ADDRESS set); None on CPU."""
    if not cluster.cuda or (not cluster.described and os.environ.get("RAY_ADDRESS")):
        return None
    return cluster.devices


def _estimate_time(plan: RunPlan, config: Any, cluster: Cluster, bench: list[dict[str, Any]]) -> None:
    """Seconds of one run from a bench result of the same variant and shape: its MFU times this
    cluster's peak (GPUs), or its tokens per second (the same device), per rank."""
    if plan.flops is None or plan.tokens is None:
        plan.time_note = "steps unknown until the data are prepared"
        return
    preset = _preset_of(config)
    rows = [r for r in bench if r.get("variant") == config.variant and r.get("preset") == preset]
    if not rows:
        shape = f"the {preset} shape" if preset else "this shape"
        plan.time_note = f"no bench result of {config.variant} at {shape}"
        return
    # the same sequence length first, then the nearest capacity
    row = min(rows, key=lambda r: (r.get("seq") != plan.seq_len,
                                   abs((r.get("capacity") or 0) - (config.capacity or 0))))
    slow = CHECKPOINTING_COST if plan.checkpointing else 1.0
    if cluster.peak_flops and row.get("mfu"):
        plan.seconds = plan.flops * slow / (row["mfu"] * cluster.peak_flops * plan.ranks * plan.share)
        plan.time_note = f"at the bench's MFU {100 * row['mfu']:.0f}% ({row.get('device')}, {row.get('precision')})"
    elif row.get("tokens_per_s") and (row.get("device") == "cuda") == cluster.cuda:
        plan.seconds = plan.tokens * slow / (row["tokens_per_s"] * plan.ranks)
        plan.time_note = f"at the bench's {row['tokens_per_s']:,.0f} tokens/s per device"


def _preset_of(config: Any) -> str | None:
    for name, shape in PRESETS.items():
        if all(getattr(config, k) == v for k, v in shape.items() if k != "vocab_size"):
            return name
    return None


# ---- a spec's runs -----------------------------------------------------------------------------------
def _corners(spec: Spec, variant: str) -> list[dict[str, Any]]:
    """The sweep's corners that can change memory, for `variant` (each value of a choice, each end of a
    range, combined); the other keys keep the spec's value."""
    dims = []
    for key, dist in (spec.sweep.search_space.items() if spec.sweep else []):
        parts = key.split(".")
        if key == "model.type":
            continue
        if parts[0] == "model" and (len(parts) != 2 or parts[1] not in MEMORY_KEYS
                                    or parts[1] not in config_class(variant).field_names()):
            continue
        if parts[0] != "model" and key not in SPEC_MEMORY_KEYS:
            continue
        dims.append([(key, v) for v in dist.corners()])
    return [dict(c) for c in product(*dims)] or [{}]


def plan_runs(spec: Spec, cluster: Cluster | None = None, command: str | None = None,
              vocab_size: int | None = None, rows: int | None = None,
              bench: list[dict[str, Any]] | None = None) -> list[RunPlan]:
    """The plan of every distinct run `spec` makes under `command` (train, run or sweep; default: sweep
    with a sweep section, run with variants or seeds, else train), on `cluster` (default this machine)."""
    cluster = cluster or this_machine(spec.resources.device)
    command = command or ("sweep" if spec.sweep else "run" if spec.variants or spec.seeds else "train")
    seeds = spec.seed_list()
    if command == "train":
        return [plan_run(spec, spec.model.type, cluster, vocab_size=vocab_size, rows=rows, bench=bench)]
    if command == "run" or spec.sweep is None:
        return [plan_run(spec.for_run(v, seeds[0]), v, cluster, runs=len(seeds), vocab_size=vocab_size, rows=rows,
                         bench=bench, name=f"{v} ({len(seeds)} seeds, a run each)" if len(seeds) > 1 else v)
                for v in spec.variant_list()]
    space = spec.sweep.search_space
    variants = list(dict.fromkeys(space["model.type"].args)) if "model.type" in space else spec.variant_list()
    out = []
    for v in variants:
        worst = None
        for corner in _corners(spec, v):
            one = spec.for_run(v, seeds[0], corner, source=f"sweep corner {corner}")
            p = plan_run(one, v, cluster, seeds=len(seeds), runs=spec.sweep.num_samples, vocab_size=vocab_size,
                         rows=rows, bench=bench, corner=corner)
            if worst is None or _harder(p, worst):
                worst = p
        assert worst is not None
        what = ", ".join(f"{k.split('.')[-1]}={val}" for k, val in worst.corner.items())
        worst.name = f"{v} (worst corner{': ' + what if what else ''})"
        out.append(worst)
    return out


def _harder(a: RunPlan, b: RunPlan) -> bool:
    """Whether plan `a` needs more than `b`: it does not fit where `b` does, or needs a costlier setting,
    or the same settings and more memory."""
    rank = lambda p: (not p.fits, p.checkpointing, p.strategy == "fsdp", p.memory.peak)  # noqa: E731
    return rank(a) > rank(b)


# ---- refusal -------------------------------------------------------------------------------------------
def check_plan(runs: list[RunPlan], spec: Spec, source: str = "spec") -> None:
    """Refuse (SpecError) the first run that will not fit, with its estimate and what would."""
    for run in runs:
        if not run.fits:
            raise SpecError(f"{source}: {refusal(run, spec)}")


def refusal(run: RunPlan, spec: Spec) -> str:
    """Why `run` will not fit, with its numbers, and what would."""
    m = run.memory
    if not run.enough_devices:
        return (f"{run.name} needs {run.devices * min(1.0, run.share):g} GPU(s) per run ({run.ranks} rank(s)"
                + (f" x {run.seeds} seeds side by side" if run.seeds > 1 else "")
                + f", {run.share:g} GPU each) but the cluster has {run.available:g}; lower resources.num_workers "
                "(or the seeds), or plan for a larger cluster")
    what = (f"{run.name} will not fit: {_gib(m.peak)} per device at micro-batch {run.micro_batch} x {run.seq_len} "
            f"tokens ({run.strategy} over {run.ranks} rank(s), activation checkpointing "
            f"{'on' if run.checkpointing else 'off'}; state {_gib(m.state)}: weights {_gib(m.weights)}, gradients "
            f"{_gib(m.gradients)}, AdamW {_gib(m.optimizer)}"
            + (f", DDP buckets {_gib(m.buckets)}" if m.buckets else "")
            + (f", FSDP gathered {_gib(m.gathered)}" if m.gathered else "") + "; activations "
            f"{_gib(m.activations)}, {_gib(m.activations_checkpointed)} checkpointed; loss chunk "
            f"{_gib(m.loss_chunk)}) against {_gib(run.budget)} a device can give")
    fixes = suggestions(run, spec) or ["no setting fits this shape: more ranks to shard over (resources.num_workers "
                                       "with fsdp) or a smaller model"]
    return f"{what}; {'; '.join(fixes)}"


def suggestions(run: RunPlan, spec: Spec) -> list[str]:
    """What would fit: fsdp, checkpointing, or a smaller micro-batch with more accumulation (same tokens
    per step)."""
    config = model_config(spec, run.variant)
    out: list[str] = []
    strategies = ["ddp", "fsdp"] if run.ranks > 1 else ["ddp"]
    B, accum, T = run.micro_batch, run.accum, run.seq_len

    def memory(b: int, strategy: str, ckpt: bool) -> Memory:
        return training_memory(config, b, T, run.precision, strategy, run.ranks, ckpt, fused_adamw=run.fused)

    def fits(b: int, strategy: str, ckpt: bool) -> bool:
        return memory(b, strategy, ckpt).peak <= run.budget

    for strategy, ckpt in [(s, c) for c in (False, True) for s in strategies]:
        if (strategy, ckpt) != (run.strategy, run.checkpointing) and fits(B, strategy, ckpt):
            keys = [f"resources.strategy={strategy}"] if strategy != run.strategy else []
            keys += ["training.activation_checkpointing=on"] if ckpt and not run.checkpointing else []
            mem = memory(B, strategy, ckpt)
            out.append(f"{' '.join(keys)} fits ({_gib(mem.peak)})")
            break
    total = B * accum
    for b in range(B - 1, 0, -1):
        if total % b:
            continue
        for strategy, ckpt in [(s, c) for c in (False, True) for s in strategies]:
            if fits(b, strategy, ckpt):
                mem = memory(b, strategy, ckpt)
                keys = [f"training.batch_size={b}", f"training.grad_accum_steps={total // b}"]
                keys += [f"resources.strategy={strategy}"] if strategy != run.strategy else []
                keys += ["training.activation_checkpointing=on"] if ckpt and not run.checkpointing else []
                out.append(f"{' '.join(keys)} fits ({_gib(mem.peak)}, the same {total * T:,} tokens per rank a step)")
                return out
    return out


def resolve(spec: Spec, run: RunPlan) -> Spec:
    """`spec` with its `auto` strategy and activation checkpointing as `run` decided them."""
    return concrete(spec, run.strategy, run.checkpointing)


def resolve_sweep(spec: Spec, runs: list[RunPlan]) -> Spec:
    """A sweep's spec with `auto` settings decided once for every trial: the costliest any variant's worst
    corner needs (fsdp if any needs it; checkpointing on if any needs it)."""
    return concrete(spec, "fsdp" if any(r.strategy == "fsdp" for r in runs) else "ddp",
                    any(r.checkpointing for r in runs))


# ---- printing ------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    """Bytes in GiB (MiB below 1 GiB)."""
    return f"{n / GiB:,.1f} GiB" if n >= GiB or n == 0 else f"{n / 2**20:,.1f} MiB"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:,.{0 if n >= 100 * size else 1}f}{unit}"
    return f"{n:,.0f}"


def _duration(s: float) -> str:
    if s >= 86_400:
        return f"{s / 86_400:.1f} days"
    if s >= 3_600:
        return f"{s / 3_600:.1f} h"
    return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def format_plan(runs: list[RunPlan], spec: Spec, cluster: Cluster, command: str) -> str:
    """The plan as `dtlab plan` prints it."""
    seeds = spec.seed_list()
    head = f"plan of {spec.name} ({command}"
    if command == "sweep" and spec.sweep is not None:
        head += f": {spec.sweep.num_samples} trials"
        head += f", {len(seeds)} seeds side by side in each" if len(seeds) > 1 else ""
    head += f") on {cluster.name()}"
    if cluster.cuda:
        head += f", {_gib(cluster.budget())} usable per GPU"
    lines = [head]
    for r in runs:
        m = r.memory
        share = f", {r.share:g} GPU each" if cluster.cuda and r.share != 1 else ""
        seeds_txt = f" x {r.seeds} seeds" if r.seeds > 1 else ""
        lines.append(f"  {r.name}: {_count(r.params)} parameters, {r.devices} device(s) per run ({r.ranks} "
                     f"rank(s){seeds_txt}{share}), {r.strategy}, activation checkpointing "
                     f"{'on' if r.checkpointing else 'off'}"
                     + (f" (auto: {', '.join(f'{k.split(chr(46))[-1]}={v}' for k, v in r.resolved.items())})"
                        if r.resolved else ""))
        lines.append(f"    per device: weights {_gib(m.weights)}, gradients {_gib(m.gradients)}, AdamW "
                     f"{_gib(m.optimizer)}" + (f", DDP buckets {_gib(m.buckets)}" if m.buckets else "")
                     + (f", FSDP gathered {_gib(m.gathered)}" if m.gathered else "")
                     + f"; activations {_gib(m.activations)} ({_gib(m.activations_checkpointed)} checkpointed), "
                       f"loss chunk {_gib(m.loss_chunk)}")
        verdict = "fits" if r.fits else "DOES NOT FIT" if r.enough_devices else \
            f"DOES NOT FIT: {r.devices * min(1.0, r.share):g} GPU(s) needed, {r.available:g} there"
        lines.append(f"    peak {_gib(m.peak)} of {_gib(r.budget)}: {verdict} (micro-batch {r.micro_batch} x "
                     f"{r.seq_len} tokens, {r.accum} accumulation step(s))")
        if r.steps is None:
            lines.append("    steps: from the data's size (training.num_epochs), known once the data are prepared")
        else:
            assert r.tokens is not None and r.flops is not None
            per = "per seed" if r.seeds > 1 else "per run"
            lines.append(f"    {r.steps:,} steps x {_count(r.tokens // r.steps)} tokens = {_count(r.tokens)} tokens, "
                         f"{r.flops:.3g} training FLOPs {per}"
                         + (f" (x {r.runs} {'trials' if command == 'sweep' else 'runs'}, at most)"
                            if r.runs > 1 else ""))
        epochs = f"{r.epochs:.2f}" if r.epochs is not None else (r.epochs_note or "unknown")
        time = _duration(r.seconds) + f" per run ({r.time_note})" if r.seconds is not None else r.time_note
        lines.append(f"    epochs: {epochs}; time: {time}")
    return "\n".join(lines)


def read_bench(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows `dtlab bench --out FILE` wrote."""
    import json

    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SpecError(f"--bench {path}: not a bench result ({type(err).__name__}: {err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SpecError(f"--bench {path}: expected the JSON list of rows `dtlab bench --out` writes")
    return rows



# ---- for the orchestrators -----------------------------------------------------------------------------
CLUSTER_ENV = "DTLAB_CLUSTER"  # a described cluster (4x8xH100-80GB) where this process cannot see the GPUs


def device_cluster(spec: Spec) -> Cluster | None:
    """Where `spec`'s runs train, as far as this process can tell: the cluster `DTLAB_CLUSTER` describes
    (unless the spec asks for the CPU), this machine's GPUs, or its CPU; None when the runs need CUDA
    that this process does not see (a Ray cluster's head without GPUs, a trial's driver)."""
    described = os.environ.get(CLUSTER_ENV)
    if described and spec.resources.device != "cpu":
        try:
            return parse_cluster(described)
        except SpecError as err:
            raise SpecError(f"{CLUSTER_ENV}: {str(err).replace('--cluster ', '')}") from None
    try:
        here = this_machine(spec.resources.device)
    except SpecError:
        return None
    if not here.cuda and spec.resources.device != "cpu" and os.environ.get("RAY_ADDRESS"):
        return None  # a cluster's head or a trial's driver: the workers' devices are not this machine's
    return here


def concrete(spec: Spec, strategy: str = "ddp", checkpointing: bool = False) -> Spec:
    """`spec` with `auto` strategy / activation checkpointing replaced by these (no plan could decide)."""
    update_r = {"strategy": strategy} if spec.resources.strategy == "auto" else {}
    update_t = {"activation_checkpointing": "on" if checkpointing else "off"} \
        if spec.training.activation_checkpointing == "auto" else {}
    return spec.model_copy(update={"resources": spec.resources.model_copy(update=update_r),
                                   "training": spec.training.model_copy(update=update_t)})


def plan_sweep_spec(spec: Spec, source: str = "spec") -> Spec:
    """Before a sweep starts: the plan of its worst trial per variant on the cluster it will run on; on
    GPUs a trial that will not fit is refused, and `auto` settings are decided once for every trial (the
    spec Tune hands out). On this machine's CPU nothing is refused here (each variant's `check_fit` does
    the CPU check)."""
    cluster = device_cluster(spec)
    if cluster is None:
        log.info(f"{spec.name}: the GPUs of the cluster are not visible here, so no memory plan (set "
                 f"{CLUSTER_ENV}=NODESxGPUSxTYPE, e.g. 4x8xH100-80GB, to plan for it); auto settings: ddp, "
                 "no activation checkpointing")
        return concrete(spec)
    runs = plan_runs(spec, cluster, "sweep")
    for run in runs:
        log.debug(f"plan: {run.name}: peak {_gib(run.memory.peak)} of {_gib(run.budget)} per device, "
                  f"{run.strategy}, activation checkpointing {'on' if run.checkpointing else 'off'}")
    if cluster.cuda:
        check_plan(runs, spec, source)
    return concrete(resolve_sweep(spec, runs))


def prepared_here(spec: Spec) -> Any:
    """The spec's prepared data when they are in the cache already and their key can be known without the
    network (a tokenizer trained here or a local one), else None. Reads, writes nothing."""
    tok = spec.data.tokenizer
    if tok is not None and not Path(tok).expanduser().is_dir():
        return None
    try:
        from dtlab.trainers.run.data import data_key, load_prepared, prepared_folder

        folder = prepared_folder(spec.data, data_key(spec.data))
        return load_prepared(folder) if (folder / "meta.json").is_file() else None
    except Exception as err:  # a source that is not there, a cache that cannot be read: no epochs, no more
        log.debug(f"plan: the prepared data are not known here ({type(err).__name__}: {err})")
        return None
