"""Scripted experts that make demonstrations here (no dataset can be downloaded on these machines).

One module per simulator: ``pusht`` (gym-pusht's pymunk sim), ``robomimic`` (robosuite Lift .. ToolHang),
``maniskill`` (ManiSkill3 StackCube) and ``so101`` (the SO-101 MuJoCo twin). Measure one with
``step eval --task T --agent expert --episodes 50``.
``make_expert(task, env)`` returns an agent (``reset()`` / ``act(obs)``) that reads the true simulator
state of ``env``, a single env or a synchronous VectorEnv (one expert per sub-env).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class ExpertAgent:
    """Wraps per-env experts behind the agent API used by the rollout loop."""

    def __init__(self, experts: list, batched: bool):
        self.experts = experts
        self.batched = batched

    def reset(self) -> None:
        for expert in self.experts:
            expert.reset()

    def act(self, obs: dict) -> np.ndarray:
        if not self.batched:
            return self.experts[0].act(obs)
        return np.stack([expert.act(None) for expert in self.experts])


def _sub_envs(env) -> tuple[list, bool]:
    if isinstance(env, gym.vector.SyncVectorEnv):
        return list(env.envs), True
    if isinstance(env, gym.vector.VectorEnv):
        raise ValueError("Experts read simulator state, so they need a SyncVectorEnv (vectorization_mode='sync').")
    return [env], False


def make_expert(task: str, env, seed: int = 0) -> ExpertAgent:
    envs, batched = _sub_envs(env)
    if task == "pusht":
        from agents.experts.pusht import PushTExpert

        return ExpertAgent([PushTExpert(e.unwrapped.sim, seed=seed) for e in envs], batched)
    if task.startswith("so101-"):
        if not task.endswith("-sim"):
            raise ValueError(f"No scripted expert for the real arm ({task!r}): it needs object poses. "
                             "Use the twin (so101-*-sim) or teleoperate with `step record --teleop`.")
        from agents.experts.so101 import SO101Expert

        return ExpertAgent([SO101Expert(e.unwrapped, seed=seed) for e in envs], batched)
    robomimic_task = task.removesuffix("-abs")  # the same expert under position control
    if robomimic_task in ("lift", "can", "square", "transport", "toolhang"):
        from agents.experts.robomimic import make_robomimic_expert

        return ExpertAgent([make_robomimic_expert(robomimic_task, e.unwrapped) for e in envs], batched)
    if task == "stackcube":
        from agents.experts.maniskill import StackCubeExpert

        return ExpertAgent([StackCubeExpert(e.unwrapped) for e in envs], batched)
    raise ValueError(f"No scripted expert for task {task!r}.")
