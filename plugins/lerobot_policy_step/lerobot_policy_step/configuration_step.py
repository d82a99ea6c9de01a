"""``StepConfig``: the LeRobot config of a STEP policy (``"type": "step"`` in a ``config.json``).

The fields that choose how the agent runs are plain config fields, so LeRobot's command line overrides them on
top of an exported folder: ``lerobot-eval --policy.path=DIR --policy.method=ddim:4``. What the network is (its
weights, normalisation, horizon) lives in this project's checkpoint at ``checkpoint``, not here; ``input_features``
/ ``output_features`` restate its observation and action shapes for LeRobot (``export.py`` writes them from it,
and ``StepPolicy`` refuses a config whose features differ from its checkpoint's).
"""

# No `from __future__ import annotations` here: draccus (LeRobot's config parser) reads the field types.
from dataclasses import dataclass, field

from lerobot.configs import PreTrainedConfig
from lerobot.optim import OptimizerConfig

RUNTIMES = ("torch", "onnx")


@PreTrainedConfig.register_subclass("step")
@dataclass
class StepConfig(PreTrainedConfig):
    # A method spec of this project (agents/factory.py): step:k, step-spatial:k, step-temporal:k, ddim:k,
    # dpmsolver:k, ddpm:100. Every one runs on the same checkpoint (STEP's also need its predictor/).
    method: str = "step:2"
    # This project's checkpoint folder (config.json, model.safetensors, predictor/); a relative path is taken
    # from the exported folder (pretrained_path), so the folder can be moved as a whole.
    checkpoint: str = "checkpoint"
    # The checkpoint's task (e.g. "pusht"); a checkpoint of another task is refused.
    task: str | None = None
    # The agent's noise seed: row i of a batch draws from a generator seeded seed + i, re-seeded at every
    # reset(), as in this project's own rollouts (so `step eval` on the same env seeds gives the same actions).
    seed: int = 0
    # "torch" (eager) or "onnx" (ONNX Runtime, graphs from <checkpoint>/onnx: `step export --lerobot --onnx`).
    runtime: str = "torch"
    # The env's action bounds; actions are clipped to them, as this project's agents clip to the env's space.
    action_low: list[float] = field(default_factory=list)
    action_high: list[float] = field(default_factory=list)
    # The agent runs on the CPU (its samplers draw from CPU generators); another device is refused.
    device: str | None = "cpu"
    push_to_hub: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        from agents.factory import DIFFUSION_METHODS, parse_method, split_warm_start

        name = split_warm_start(parse_method(self.method)[0])[0]  # "step@30:2": STEP with its warm start at t=30
        if name not in DIFFUSION_METHODS:
            raise ValueError(f"--policy.method={self.method!r}: the LeRobot plugin runs the diffusion methods "
                             f"({', '.join(DIFFUSION_METHODS)}), e.g. step:2 or ddim:4.")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"--policy.runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}.")
        if self.device != "cpu":
            raise ValueError(f"--policy.device={self.device!r}: the STEP agent runs on the CPU (torch or ONNX "
                             f"Runtime); use --policy.device=cpu.")
        if self.use_amp:
            raise ValueError("--policy.use_amp: the STEP agent runs in float32; use --policy.use_amp=false.")
        if len(self.action_low) != len(self.action_high):
            raise ValueError(f"action_low ({len(self.action_low)} values) and action_high ({len(self.action_high)}) "
                             f"must have one value per action dimension.")

    # The agent keeps its own observation history and action chunks, and is not trained through LeRobot: no
    # dataset windows to ask for.
    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> None:
        return None

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> OptimizerConfig:
        raise NotImplementedError("A STEP policy is trained with this project's `step train-policy` / "
                                  "`step train-predictor`, not lerobot-train.")

    def get_scheduler_preset(self) -> None:
        return None

    def validate_features(self) -> None:
        if not self.input_features or "observation.state" not in self.input_features:
            raise ValueError("A STEP policy needs observation.state among its input features.")
        if not self.output_features or "action" not in self.output_features:
            raise ValueError("A STEP policy needs an action output feature.")
