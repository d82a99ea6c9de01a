"""The folder ``lerobot-eval --policy.path=DIR`` loads: written by ``step export --checkpoint CKPT --out DIR --lerobot``.

  DIR/config.json                   LeRobot's policy config (``"type": "step"``, StepConfig), with the input and
                                    output features of the checkpoint and the env's action bounds
  DIR/policy_preprocessor.json      LeRobot's processor pipelines (processor_step.py; no normaliser: the
  DIR/policy_postprocessor.json     checkpoint holds the statistics)
  DIR/checkpoint/                   this project's release copy of CKPT (agents.checkpoint.export_checkpoint),
                                    with predictor/ and, with --onnx, onnx/

This project's checkpoints already have a ``config.json`` of their own format, so the two cannot share a folder:
the release copy goes one level down and the LeRobot config names it (``checkpoint``, relative to DIR). The folder
is built beside DIR, loaded once as LeRobot will load it, and only then swapped in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHECKPOINT_DIR = "checkpoint"


def env_action_bounds(task: str) -> tuple[list[float], list[float]]:
    """The action bounds of a task's env (real-arm tasks: those of their MuJoCo twin; nothing is connected)."""
    from step_envs.registry import TASKS, get_task, make_env

    spec = get_task(task)
    if spec.real_hardware and f"{task}-sim" in TASKS:
        spec = TASKS[f"{task}-sim"]
    env = make_env(spec.name, obs_type="state", render_mode=None)
    try:
        space = env.action_space
        return np.asarray(space.low, np.float64).tolist(), np.asarray(space.high, np.float64).tolist()
    finally:
        env.close()


def export_lerobot(checkpoint, out, method: str = "step:2", half: bool = True, overwrite: bool = False,
                   onnx_methods: tuple[str, ...] | None = None) -> dict:
    """Write the LeRobot policy folder ``out`` for the trained checkpoint ``checkpoint`` (see the module docstring)."""
    from agents.backbone import FeatureSpec
    from agents.checkpoint import export_checkpoint, read_policy_config
    from lerobot_policy_step.configuration_step import StepConfig
    from lerobot_policy_step.modeling_step import StepPolicy, checkpoint_features
    from lerobot_policy_step.processor_step import make_step_pre_post_processors
    from step_envs.safe_io import folder_lock, replacing_folder

    out = Path(out)
    saved = read_policy_config(checkpoint)
    inputs, outputs = checkpoint_features(FeatureSpec(**saved["features"]))
    low, high = env_action_bounds(saved["task"])
    # Validates the method (and device) before anything is written.
    config = StepConfig(method=method, checkpoint=CHECKPOINT_DIR, task=saved["task"], action_low=low, action_high=high,
                        n_obs_steps=saved["policy"]["n_obs_steps"], input_features=inputs, output_features=outputs)
    with folder_lock(out, "export --lerobot"):
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it.")
        with replacing_folder(out) as new:
            new.mkdir()
            report = export_checkpoint(checkpoint, new / CHECKPOINT_DIR, half=half)
            if onnx_methods:
                from agents.onnx_runtime import export_onnx

                report["onnx"] = export_onnx(new / CHECKPOINT_DIR, methods=onnx_methods)
            config._save_pretrained(new)
            preprocessor, postprocessor = make_step_pre_post_processors(config)
            preprocessor.save_pretrained(new)
            postprocessor.save_pretrained(new)
            StepPolicy.from_pretrained(new)  # loads as lerobot-eval will, or the old folder stays
            built = str(new)
    report = _moved(report, built, str(out))  # name the files where they are now, not in the build folder
    report.update(out=str(out), lerobot_type="step", method=method,
                  bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()))
    return report


def _moved(value, old: str, new: str):
    """``value`` (a JSON-like report) with paths under ``old`` rewritten to be under ``new``."""
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    if isinstance(value, str) and value.startswith(old):
        return new + value[len(old):]
    return value
