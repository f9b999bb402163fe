"""The memory plan against CUDA's measured peak at the 0.5B shape (part of scripts/gpu_check.sh).

For each variant, with and without activation checkpointing: build the 0.5B model on the GPU, train
two steps the way the loop does (bf16 autocast over fp32 weights, fused AdamW, grad clipping), and
compare `torch.cuda.max_memory_allocated` over those steps with `models.memory.training_memory`'s
peak for the same shape. Writes one JSON object (the rows and their ratios) to the path given.

    python scripts/gpu_memory_check.py OUT.json [--batch 4] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def one(variant: str, batch: int, seq_len: int, checkpointing: bool) -> dict:
    from dtlab.models import build_model
    from dtlab.models.memory import GiB, training_memory
    from dtlab.trainers.run import parallel
    from dtlab.trainers.run.device import detect_precision
    from dtlab.trainers.run.loop import param_groups

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    device = torch.device("cuda", 0)
    precision = detect_precision("cuda", "bf16")
    torch.manual_seed(0)
    model = build_model(variant, "0.5B").to(device).train()
    model = parallel.wrap(model, "ddp", None, device, precision, checkpointing)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    for _ in range(2):
        with precision.autocast():
            out = model(x, labels=x, return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    plan = training_memory(model.config, batch, seq_len, "bf16", "ddp", 1, checkpointing, fused_adamw=True)
    row = {"variant": variant, "batch": batch, "seq_len": seq_len, "activation_checkpointing": checkpointing,
           "planned_gib": plan.peak / GiB, "measured_gib": measured / GiB,
           "ratio_plan_to_measured": plan.peak / measured,
           "plan_parts_gib": plan.gib()}
    del model, optimizer, out
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing measured", file=sys.stderr)
        return 1
    rows = []
    for variant in ("standard", "mod", "dtf"):
        for checkpointing in (False, True):
            try:
                row = one(variant, args.batch, args.seq_len, checkpointing)
            except Exception as err:  # noqa: BLE001 (one failure is recorded; the others still run)
                row = {"variant": variant, "activation_checkpointing": checkpointing, "error": repr(err)[:500]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "plan_parts_gib"}), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
