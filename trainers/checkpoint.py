"""Checkpoints of a run: `checkpoints/last` (resume) and `checkpoints/best` (lowest validation loss).

Each holds the model as `save_pretrained` writes it (safetensors weights that reload with
`AutoModelForCausalLM`) and `trainer_state.pt`: optimizer, schedule, grad scaler and the loop's
counters. The resume path and the evaluation path both go through `save` and `load` here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

LAST, BEST = "last", "best"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / LAST


def save(run_dir: Path, model, optimizer, scheduler, scaler, state: dict[str, Any], best: bool) -> Path:
    """Write `last` (and copy it to `best` when `best`); returns the `last` directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f".{LAST}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, **state}, tmp / "trainer_state.pt")
    last, old = ckpt / LAST, ckpt / f".{LAST}.old"
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


def load(path: Path, model, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore model, optimizer, schedule and scaler from `path`; returns the loop's counters."""
    from safetensors.torch import load_file

    target = unwrap(model)
    state = load_file(path / "model.safetensors", device=str(next(target.parameters()).device))
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = target.config.tie_word_embeddings
    # the head of a tied model is the embedding; a run saved before the schedule step was kept sets it anyway
    missing = [k for k in missing if not (tied and k == "lm_head.weight") and k != "model.schedule_step"]
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
