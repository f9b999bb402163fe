"""`dtlab bench --decode`: prefill and per-token decode time of every variant, Standard as baseline.

Each variant decodes greedily with its KV cache (causal routing) from the same random prompts, at
batch 1 and 8 by default: a prefill of `prompt` tokens, then `new_tokens` single-token steps. Times
are medians over `repeats` runs after one warm-up; ratios are taken within the run. Fresh models
route at random, so MoD's and DTF's routing is first fitted to its capacity as training would fit
it (see `calibrate_routing`); each row records the capacity the routed blocks then realised.

Each row also reports the KV cache the decode left: its logical size (`cache_tokens`, the tokens the
layers hold, `cache.stored()`) beside its physical one (`cache_slots`, the buffer slots of every layer
and row, and `cache_bytes`, all it holds), and the bytes against Standard's at the same batch.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from dtlab import models
from dtlab.trainers.run.device import detect_device, detect_precision, synchronize

if TYPE_CHECKING:
    from dtlab.models.modeling import DTLabForCausalLM

log = logging.getLogger(__name__)

DEFAULTS = {"cpu": dict(preset="small", prompt=128, new_tokens=64),
            "cuda": dict(preset="0.5B", prompt=512, new_tokens=128),
            "mps": dict(preset="small", prompt=128, new_tokens=64)}


def calibrate_routing(model: DTLabForCausalLM, prompt: torch.Tensor, new_tokens: int, capacity: float,
                      rounds: int = 3) -> None:
    """Fit a fresh model's causal routing to `capacity` on the text it decodes (random routers route
    arbitrary fractions), layer by layer in order, since a layer's input depends on the layers before:
    DTF's threshold becomes the (1 - c) quantile of G over the decoded tokens (what its running
    estimate tracks in training); MoD's router weight w becomes w + beta * m, m the mean direction of
    its inputs, with beta chosen so that r > 0 for a fraction c of the decoded tokens (MoD's rule has
    no threshold to set). Then decode again with the new routing and refit."""
    P = prompt.shape[1]
    for _ in range(rounds):
        seq = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        for i, kind in enumerate(model.config.layer_kinds):
            layer = model.model.layers[i]
            if kind == "dtf_dynamic":
                g = _captured(model, seq, layer.router, lambda args, out: out["gate"])[:, P:]
                layer.router.threshold.fill_(float(torch.quantile(g.float().flatten(), 1 - capacity)))
            elif kind == "mod":
                _fit_mod_router(layer.router, _captured(model, seq, layer, lambda args, out: args[0])[:, P:], capacity)


def _fit_mod_router(router: torch.nn.Linear, x_BTD: torch.Tensor, capacity: float) -> None:
    """w <- w + beta * m (m: the inputs' mean direction), beta such that w . x > 0 for `capacity` of x."""
    x = x_BTD.flatten(0, 1).float()
    m = x.mean(0) / x.mean(0).norm()
    s, p = x @ router.weight.detach().float()[0], x @ m
    beta = _bisect(s, p, capacity)
    with torch.no_grad():
        router.weight[0] += beta * m.to(router.weight.dtype)


def _captured(model, seq: torch.Tensor, module, pick) -> torch.Tensor:
    """What `pick(args, output)` of `module` is in a full-sequence causal forward of `seq`."""
    got = []
    hook = module.register_forward_hook(lambda mod, args, out: got.append(pick(args, out).detach()))
    try:
        with torch.no_grad(), model.routing("causal"):
            model(seq)
    finally:
        hook.remove()
    return got[0]


def _bisect(s: torch.Tensor, p: torch.Tensor, target: float, lo: float = -1e4, hi: float = 1e4) -> float:
    """The beta at which the fraction of tokens with s + beta * p > 0 (increasing in beta where p > 0,
    as it mostly is along the mean direction) crosses `target`."""
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(((s + mid * p) > 0).float().mean()) < target else (lo, mid)
    return (lo + hi) / 2


def _decode(model, prompt: torch.Tensor, new_tokens: int, device: str, autocast) -> tuple[float, float, Any]:
    """One greedy decode: (prefill seconds, decode seconds per step, the cache)."""
    with torch.no_grad(), model.routing("causal"), autocast():
        synchronize(device)
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, cache=out.cache)
            nxt = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / new_tokens, out.cache


def bench_variant(model: DTLabForCausalLM, prompt: torch.Tensor, new_tokens: int, repeats: int, device: str,
                  autocast: Callable[[], AbstractContextManager[Any]]) -> dict[str, Any]:
    _decode(model, prompt, min(new_tokens, 8), device, autocast)  # warm-up
    runs = [_decode(model, prompt, new_tokens, device, autocast) for _ in range(repeats)]
    cache = runs[-1][2]
    B, P = prompt.shape
    routed = [i for i, k in enumerate(model.config.layer_kinds) if k in ("mod", "dtf_dynamic")]
    # decode steps feed new_tokens columns; the prefill's stored tokens are subtracted out
    with torch.no_grad(), model.routing("causal"):
        prefill_masks = model(prompt).routing_masks
    realised = {str(i): (int(cache.stored(i).sum()) - int(prefill_masks[i].sum())) / (B * new_tokens) for i in routed}
    decode_s = statistics.median(r[1] for r in runs)
    return {"prefill_s": statistics.median(r[0] for r in runs), "decode_step_s": decode_s,
            "decode_tokens_per_s": B / decode_s, "realised_capacity": realised,
            "realised_capacity_mean": statistics.fmean(realised.values()) if realised else None,
            **cache_size(cache)}


def cache_size(cache: Any) -> dict[str, int]:
    """The logical and physical size of a `DTLabCache`: tokens held (`stored`, summed over layers and
    rows), buffer slots (summed over layers and rows) and the bytes it holds."""
    layers = range(len(cache.layers))
    return {"cache_tokens": sum(int(cache.stored(i).sum()) for i in layers),
            "cache_slots": sum(int(cache.slots(i).sum()) for i in layers),
            "cache_bytes": cache.nbytes()}


def run_decode_bench(preset: str | None = None, device: str | None = None, batches: Sequence[int] = (1, 8),
                     prompt: int | None = None, new_tokens: int | None = None, repeats: int = 3,
                     capacity: float = 0.125, variants: Sequence[str] = ("standard", "mod", "dtf"),
                     seed: int = 0) -> list[dict[str, Any]]:
    device = detect_device(device)
    precision = detect_precision(device)
    d = DEFAULTS[device]
    preset, prompt, new_tokens = preset or d["preset"], prompt or d["prompt"], new_tokens or d["new_tokens"]
    unknown = set(variants) - {"standard", "mod", "dtf"}
    if unknown:
        raise ValueError(f"unknown variants for --decode {sorted(unknown)}: expected standard, mod, dtf")
    base = models.make_config("standard", preset)
    if prompt + new_tokens + 1 > base.max_position_embeddings:
        raise ValueError(f"prompt {prompt} + {new_tokens} new tokens exceed the {preset} preset's "
                         f"max_position_embeddings ({base.max_position_embeddings})")
    log.info(f"dtlab bench --decode: preset {preset}, {device} ({precision.name}), prompt {prompt}, "
             f"{new_tokens} new tokens, batch {', '.join(map(str, batches))}, median of {repeats}")
    rows = []
    for name in variants:
        torch.manual_seed(seed)
        overrides = {} if name == "standard" else {models.config_class(name).capacity_key: capacity}
        model = models.build_model(name, preset, **overrides).to(device).eval()
        for B in batches:
            x = torch.randint(0, base.vocab_size, (B, prompt), generator=torch.Generator().manual_seed(seed + B))
            if name != "standard":
                calibrate_routing(model, x.to(device), new_tokens, capacity)
            row = bench_variant(model, x.to(device), new_tokens, repeats, device, precision.autocast)
            row.update(bench="decode", variant=name, capacity=None if name == "standard" else capacity, batch=B,
                       prompt=prompt, new_tokens=new_tokens, preset=preset, device=device,
                       precision=precision.name)
            rows.append(row)
        del model
    for r in rows:
        base_row = next((b for b in rows if b["variant"] == "standard" and b["batch"] == r["batch"]), None)
        r["decode_speedup_vs_standard"] = base_row["decode_step_s"] / r["decode_step_s"] if base_row else None
        r["prefill_speedup_vs_standard"] = base_row["prefill_s"] / r["prefill_s"] if base_row else None
        r["cache_bytes_vs_standard"] = r["cache_bytes"] / base_row["cache_bytes"] if base_row else None
    return rows


def format_decode_table(rows: list[dict[str, Any]]) -> str:
    head = ("variant", "batch", "prefill ms", "step ms", "tokens/s", "vs standard", "prefill vs", "capacity",
            "KV tokens", "KV slots", "KV MiB", "KV vs std")
    lines = [" ".join(f"{h:>11}" for h in head)]
    for r in rows:
        cap = r["realised_capacity_mean"]
        cells = (r["variant"], r["batch"], f"{1e3 * r['prefill_s']:.1f}", f"{1e3 * r['decode_step_s']:.2f}",
                 f"{r['decode_tokens_per_s']:,.1f}", _ratio(r["decode_speedup_vs_standard"]),
                 _ratio(r["prefill_speedup_vs_standard"]), "-" if cap is None else f"{cap:.3f}",
                 f"{r['cache_tokens']:,}", f"{r['cache_slots']:,}", f"{r['cache_bytes'] / 2**20:.2f}",
                 "-" if r["cache_bytes_vs_standard"] is None else f"{r['cache_bytes_vs_standard']:.3f}")
        lines.append(" ".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
