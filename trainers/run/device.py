"""Device and precision detection, shared by training and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    device: str  # "cuda" | "mps" | "cpu"
    amp_dtype: torch.dtype | None  # autocast dtype, None for plain fp32
    grad_scaler: bool  # fp16 needs loss scaling

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> torch.autocast:
        if self.amp_dtype is None:
            return torch.autocast(self.device, enabled=False)
        return torch.autocast(self.device, dtype=self.amp_dtype)


def detect_device(requested: str | None = None) -> str:
    if requested not in (None, "auto", "cpu", "cuda", "mps"):
        raise ValueError(f"device={requested!r}: expected one of auto, cpu, cuda, mps")
    if requested in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' was asked for, but torch sees no MPS device")
    return requested


def detect_precision(device: str, requested: str | None = None) -> Precision:
    """CUDA: bf16 autocast (fp16 + grad scaler where bf16 is missing); MPS and CPU: fp32."""
    if requested not in (None, "auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision={requested!r}: expected one of auto, fp32, bf16, fp16")
    if requested in (None, "auto"):
        if device == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "fp32"
    if requested == "fp16" and device != "cuda":
        raise ValueError(f"precision='fp16' needs a CUDA device, not {device!r}")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    return Precision(device, dtype, requested == "fp16")


# Dense bf16 peak FLOP/s by device name, for MFU (the vendors' datasheets, no sparsity).
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()
