"""How training uses the CPU: thread count and numeric precision, decided in one place.

Measured on this project's 2-core AVX512-BF16 CPU (``step train-bench``): the state U-Net gains ~2.5x
from batch 256 on both cores and almost nothing from bf16; image encoders gain another ~2x from bf16
autocast. So ``precision="auto"`` means bf16 for presets with an image encoder (where the CPU has
native bf16) and fp32 otherwise. Under bf16 only the forward pass runs in bfloat16 (``torch.autocast``);
master weights, gradients, optimizer state and EMA stay fp32, so checkpoints are unchanged.
"""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> the device a training run uses (auto: a CUDA GPU when there is one).

    Training alone moves to the GPU; rollouts, benches and every agent run on the CPU (the project's target)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no CUDA GPU here; use --device cpu (or auto).")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int) -> int:
    """0 means every available core (right when the run is alone on the machine)."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: all {available_cores()} cores), got {threads}")
    return threads or available_cores()


def cpu_has_bf16() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, has_images: bool, quiet: bool = False, device_type: str = "cpu") -> str:
    """``auto`` / ``bf16`` / ``fp32`` -> the precision a run really uses ('bf16' or 'fp32')."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return "fp32"
    if device_type == "cuda":  # every GPU this project meets (Ampere and later) has native bf16
        return "bf16" if precision == "bf16" or has_images else "fp32"
    if not cpu_has_bf16():
        if precision == "bf16" and not quiet:
            print("precision bf16: this CPU has no native bf16 (AVX512-BF16/AMX), training in fp32")
        return "fp32"
    if precision == "auto" and not has_images:
        return "fp32"  # the 1-D U-Net of state tasks gains <= 1.17x from bf16 here: not worth the rounding
    return "bf16"


def autocast(precision: str, device_type: str = "cpu"):
    """Context for the forward pass of a training step on ``device_type`` ('cpu' or 'cuda')."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(module: torch.nn.Module) -> None:
    """NHWC weights for the image encoder (an option, off by default: on this project's AVX512-BF16 CPU a
    bf16 step of the `image` preset took 0.55 s in channels_last against 0.52 s in NCHW, batch 64, 2 threads;
    CPUs with AMX may differ, so measure with `step train-bench --channels-last`)."""
    module.to(memory_format=torch.channels_last)
