"""`dtlab demo`: train the three debug models for a few steps on real text, on the CPU.

A smoke test a newcomer can read: bytes of Python's own standard-library sources (present on
every machine dtlab installs on) as tokens, the same seed and batches for every variant.
"""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

import torch

import models


def stdlib_bytes(limit: int = 400_000) -> torch.Tensor:
    """The first `limit` bytes of the standard library's .py files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def run_demo(steps: int = 40, batch: int = 8, seq: int = 128, lr: float = 3e-3, seed: int = 0) -> dict:
    data = stdlib_bytes()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    losses: dict[str, list[float]] = {}
    for variant in models.VARIANTS:
        torch.manual_seed(seed)
        model = models.build_model(variant, "debug", vocab_size=256).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
        g = torch.Generator().manual_seed(seed)
        start, history = time.perf_counter(), []
        for _ in range(steps):
            offsets = torch.randint(0, len(data) - seq, (batch,), generator=g)
            x = torch.stack([data[o:o + seq] for o in offsets.tolist()])
            out = model(x, labels=x, return_logits=False)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            history.append(out.lm_loss.item())  # one sync per step, on purpose
        losses[variant] = history
        took = time.perf_counter() - start
        print(f"{variant:>8}: LM loss {history[0]:.3f} -> {history[-1]:.3f} over {steps} steps "
              f"({steps * batch * seq / took:,.0f} tokens/s, {models.flop_ratio_vs_dense(model.config, seq):.3f} "
              f"of dense FLOPs)")
    return losses
