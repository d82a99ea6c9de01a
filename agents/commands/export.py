"""``step export --checkpoint runs/lift_state --out checkpoints/lift [--float32] [--overwrite] [--onnx]``"""

from __future__ import annotations

from dataclasses import dataclass

from agents.commands import json_command
from agents.config_files import option


@dataclass
class ExportConfig:
    checkpoint: str = option(help="a `step train-policy` folder (with its predictor/)")
    out: str = option(help="release folder, e.g. checkpoints/<task>")
    float32: bool = option(False, help="keep float32 weights (default: float16 storage)")
    overwrite: bool = option(False, help="replace a non-empty --out")
    onnx: bool = option(False, help="also write ONNX files (encoder, U-Net step, predictor, one chunk graph per "
                                    "--onnx-methods spec) into <out>/onnx for make_agent(..., runtime='onnx')")
    onnx_methods: tuple[str, ...] = option(("ddim:1", "ddim:2", "ddim:4", "step:1", "step:2", "step:4"),
                                           help="the methods whose whole-chunk graphs --onnx writes")


def export(cfg: ExportConfig) -> dict:
    from agents.checkpoint import export_checkpoint

    report = export_checkpoint(cfg.checkpoint, cfg.out, half=not cfg.float32, overwrite=cfg.overwrite)
    if cfg.onnx:  # from the release copy, so the graphs hold exactly the weights an agent loads from --out
        from agents.onnx_runtime import export_onnx

        report["onnx"] = export_onnx(cfg.out, methods=cfg.onnx_methods)
    return report


add_arguments, run = json_command(ExportConfig, export)
