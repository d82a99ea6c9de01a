"""``make_step_pre_post_processors``: the processor pipelines of a STEP policy (LeRobot finds them by name).

There is no normaliser step: the agent normalises observations and unnormalises actions itself, with the
statistics stored in its checkpoint (agents/backbone.py), exactly as in this project's own rollouts. What is left
is LeRobot's plumbing, with the step names its scripts override (``rename_observations_processor``,
``device_processor``): rename -> add batch dim -> device in, device (CPU) out.
"""

from __future__ import annotations

from typing import Any

import torch
from lerobot.processor import (
    AddBatchDimensionProcessorStep,
    DeviceProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    RenameObservationsProcessorStep,
    make_policy_processor_pipelines,
)

from lerobot_policy_step.configuration_step import StepConfig


def make_step_pre_post_processors(
    config: StepConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[PolicyProcessorPipeline[dict[str, Any], dict[str, Any]], PolicyProcessorPipeline[PolicyAction, PolicyAction]]:
    """``dataset_stats`` is accepted (LeRobot passes it) and unused: the checkpoint holds the statistics."""
    return make_policy_processor_pipelines(
        input_steps=[RenameObservationsProcessorStep(rename_map={}), AddBatchDimensionProcessorStep(),
                     DeviceProcessorStep(device=config.device)],
        output_steps=[DeviceProcessorStep(device="cpu")],
    )
