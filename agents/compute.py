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


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch threads (0: keep the current count); the count before is restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


CHANNELS_LAST = ("auto", "on", "off")


def cpu_has_amx() -> bool:
    """True when the CPU reports AMX bf16 tiles (Linux /proc/cpuinfo; False where that cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def resolve_channels_last(setting: str | bool, precision: str, device_type: str = "cpu") -> bool:
    """``auto`` / ``on`` / ``off`` (a YAML true / false counts as on / off) -> NHWC image encoder or not.

    auto = on for bf16 training on a CPU with AMX, off otherwise. Measured with ``step train-bench`` (2 cores,
    ``image`` preset, batch 128, bf16): on an Intel Xeon with AMX NHWC gave 106 samples/s against 84 in NCHW
    (results/train_bench/pusht_pixels_image_amx*.json); on an AMD EPYC with AVX512-BF16 and no AMX it was slower
    (0.55 s a step against 0.52 s at batch 64). fp32 steps gained nothing on the Xeon (26-54 samples/s either
    way), and GPU runs were never timed both ways, so those stay NCHW."""
    if isinstance(setting, bool):
        setting = "on" if setting else "off"
    if setting not in CHANNELS_LAST:
        raise ValueError(f"channels_last must be one of {CHANNELS_LAST}, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    return precision == "bf16" and device_type == "cpu" and cpu_has_amx()


def use_channels_last(module: torch.nn.Module, on: bool = True) -> None:
    """NHWC (``on``) or NCHW weights for the image encoder; see ``resolve_channels_last`` for when NHWC pays."""
    module.to(memory_format=torch.channels_last if on else torch.contiguous_format)
