"""`dtlab bench`: time full training steps of every variant against transformers' Qwen2.

One run times, on one shape and device: transformers' `Qwen2ForCausalLM` (the baseline,
`hf-qwen2`), Standard, and MoD and DTF at each capacity. A training step is forward, backward
and an AdamW step; it is timed after warm-up as the median over `steps` steps. Ratios are
taken within the run (the machines are shared and noisy), next to each variant's FLOP ratio.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dtlab import models
from dtlab.models.flops import flop_ratio_vs_dense, flops_per_token
from dtlab.trainers.run.device import Precision, detect_device, detect_precision, peak_flops, synchronize

if TYPE_CHECKING:
    from dtlab.models.config import DTLabConfig

log = logging.getLogger(__name__)

CAPACITIES = (0.125, 0.25, 0.5)
DEFAULTS = {"cpu": dict(preset="debug", batch=8, seq=256), "cuda": dict(preset="0.5B", batch=8, seq=2048),
            "mps": dict(preset="debug", batch=8, seq=256)}


def hf_baseline(config: DTLabConfig) -> torch.nn.Module:
    """transformers' Qwen2 on the same shape, SDPA attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg)


def estimate_memory_gib(config: DTLabConfig, batch: int, seq: int, precision: Precision) -> float:
    """Rough peak of a training step: fp32 weights, grads and AdamW moments (16 bytes per
    parameter), saved activations (about 10*D + 5*I values per token per block, in the autocast
    dtype) and the baseline's full logits (bf16 plus their fp32 copy and its gradient)."""
    act_bytes = 4 if precision.amp_dtype is None else 2
    n = batch * seq
    params = models.param_count(config) * 16
    acts = n * config.num_hidden_layers * (10 * config.hidden_size + 5 * config.intermediate_size) * act_bytes
    logits = n * config.vocab_size * (act_bytes + 4 + 4)
    return (params + acts + logits) / 2**30


def available_memory_gib(device: str) -> float | None:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free / 2**30
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _train_step_fn(model: torch.nn.Module, x: torch.Tensor, precision: Precision, ours: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=precision.device == "cuda")
    kwargs = {"return_logits": False} if ours else {}

    def step() -> None:
        with precision.autocast():
            loss = model(input_ids=x, labels=x, **kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _median_time(fn: Callable[[], None], device: str, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(name: str, model: torch.nn.Module, config: DTLabConfig, x: torch.Tensor, precision: Precision,
              warmup: int, steps: int, compile: bool) -> dict[str, Any]:
    device = precision.device
    ours = name != "hf-qwen2"
    model = model.to(device).train()
    run = torch.compile(model) if compile else model
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step_s = _median_time(_train_step_fn(run, x, precision, ours), device, warmup, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None

    def forward() -> None:
        with torch.no_grad(), precision.autocast():
            run(input_ids=x)

    run.eval()
    forward_s = _median_time(forward, device, max(1, warmup // 2), steps)
    B, T = x.shape
    fpt = flops_per_token(config, T)
    peak_fl = peak_flops(device)
    return {
        "variant": name,
        "capacity": config.capacity if ours else None,
        "step_s": step_s,
        "tokens_per_s": B * T / step_s,
        "flops_per_token": fpt,
        "flop_ratio_vs_dense": flop_ratio_vs_dense(config, T),
        "mfu": fpt * B * T / step_s / peak_fl if peak_fl else None,
        "peak_mem_gib": peak,
        "forward_s": forward_s,
    }


def run_bench(preset: str | None = None, device: str | None = None, batch: int | None = None,
              seq: int | None = None, compile: bool = False, steps: int = 10, warmup: int = 3,
              capacities: Sequence[float] = CAPACITIES,
              variants: Sequence[str] = ("hf-qwen2", "standard", "mod", "dtf"),
              seed: int = 0) -> list[dict[str, Any]]:
    device = detect_device(device)
    precision = detect_precision(device)
    d = DEFAULTS[device]
    preset, batch, seq = preset or d["preset"], batch or d["batch"], seq or d["seq"]
    base = models.make_config("standard", preset)
    if seq > base.max_position_embeddings:
        raise ValueError(f"--seq {seq} exceeds the {preset} preset's max_position_embeddings "
                         f"({base.max_position_embeddings})")
    need, have = estimate_memory_gib(base, batch, seq, precision), available_memory_gib(device)
    if have is not None and need > have:
        raise ValueError(f"preset {preset!r} at batch {batch} x seq {seq} needs about {need:.1f} GiB on {device} "
                         f"(weights, grads, AdamW state, activations, logits) but {have:.1f} GiB is free: "
                         f"choose a smaller --preset, --batch or --seq")
    unknown = set(variants) - {"hf-qwen2", "standard", "mod", "dtf"}
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}: expected hf-qwen2, standard, mod, dtf")
    for c in capacities:
        if not 0 < c <= 1:
            raise ValueError(f"capacity {c}: expected a number in (0, 1]")
    log.info(f"dtlab bench: preset {preset}, {device} ({precision.name}), batch {batch} x seq {seq}, "
             f"{'compiled' if compile else 'eager'}, median of {steps} steps after {warmup} warm-up")
    x = torch.randint(0, base.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    plan: list[tuple[str, dict]] = []
    for v in variants:
        if v in ("hf-qwen2", "standard"):
            plan.append((v, {}))
        else:
            plan.extend((v, {models.config_class(v).capacity_key: c}) for c in capacities)
    rows = []
    for name, overrides in plan:
        torch.manual_seed(seed)
        config = models.make_config("standard" if name == "hf-qwen2" else name, preset, **overrides)
        model = hf_baseline(config) if name == "hf-qwen2" else models.VARIANTS[name](config)
        row = bench_one(name, model, config, x, precision, warmup, steps, compile)
        row.update(preset=preset, device=device, precision=precision.name, batch=batch, seq=seq, compile=compile)
        rows.append(row)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    dense = next((r["step_s"] for r in rows if r["variant"] == "standard"), None)
    for r in rows:
        r["step_ratio_vs_dense"] = r["step_s"] / dense if dense else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("variant", "capacity", "step ms", "tokens/s", "fwd ms", "FLOP ratio", "step ratio", "MFU", "peak GiB")
    lines = [" ".join(f"{h:>11}" for h in head)]
    for r in rows:
        cells = (r["variant"], "-" if r["capacity"] is None else f"{r['capacity']:g}", f"{1e3 * r['step_s']:.1f}",
                 f"{r['tokens_per_s']:,.0f}", f"{1e3 * r['forward_s']:.1f}", f"{r['flop_ratio_vs_dense']:.3f}",
                 "-" if r["step_ratio_vs_dense"] is None else f"{r['step_ratio_vs_dense']:.3f}",
                 "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                 "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}")
        lines.append(" ".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)


def write_rows(rows: list[dict[str, Any]], out: str | os.PathLike) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    path.write_text(json.dumps(clean, indent=1) + "\n")
