"""``step export --checkpoint runs/lift_state --out checkpoints/lift [--float32] [--overwrite] [--onnx] [--lerobot]``

``--lerobot``: ``--out`` becomes a folder LeRobot's scripts load with ``--policy.path`` (``"type": "step"``, the
plugin in ``plugins/lerobot_policy_step``), with the release copy inside it at ``<out>/checkpoint``.
"""

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
    lerobot: bool = option(False, help="write --out as a LeRobot policy folder (lerobot-eval --policy.path=OUT): "
                                       "LeRobot config.json and processors, the release copy in <out>/checkpoint")
    lerobot_method: str = option("step:2", help="--lerobot: the method the folder runs (a config field: LeRobot's "
                                                "--policy.method=ddim:4 overrides it)")


def export(cfg: ExportConfig) -> dict:
    from agents.checkpoint import export_checkpoint

    if cfg.lerobot:
        try:
            from lerobot_policy_step.export import export_lerobot
        except ImportError as err:
            raise RuntimeError(f"--lerobot needs the LeRobot plugin ({err}): pip install -e plugins/lerobot_policy_step "
                               f"(scripts/setup.sh installs it).") from None
        return export_lerobot(cfg.checkpoint, cfg.out, method=cfg.lerobot_method, half=not cfg.float32,
                              overwrite=cfg.overwrite, onnx_methods=cfg.onnx_methods if cfg.onnx else None)

    report = export_checkpoint(cfg.checkpoint, cfg.out, half=not cfg.float32, overwrite=cfg.overwrite)
    if cfg.onnx:  # from the release copy, so the graphs hold exactly the weights an agent loads from --out
        from agents.onnx_runtime import export_onnx

        report["onnx"] = export_onnx(cfg.out, methods=cfg.onnx_methods)
    return report


add_arguments, run = json_command(ExportConfig, export)
