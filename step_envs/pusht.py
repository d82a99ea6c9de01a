"""``step/PushT-v0``: gym-pusht's physics behind the STEP observation contract.

State layout (gym-pusht's ``environment_state_agent_pos``, as in LeRobot's ``pusht_keypoints``):
  ``agent_pos``          (2,)  the pusher disc's position in pixels, [0, 512]^2
  ``environment_state``  (16,) the 8 corner keypoints (x, y) of the T, see PushTEnv.get_keypoints
Image variant: ``pixels["top"]`` 96x96x3 uint8 top-down render.
Action: (2,) float32 absolute target of the pusher in pixels, [0, 512]^2; 10 Hz control.
Success: coverage of the goal region > 0.95 (the episode terminates); reward = min(coverage/0.95, 1).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gym_pusht.envs.pusht import PushTEnv as GymPushTEnv
from gymnasium import spaces

from step_envs.contract import build_observation_space, check_obs_type, validate_action, wants_pixels, wants_state

IMAGE_SIZE = 96
VIDEO_SIZE = 384
CAMERA = "top"


class PushTEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, obs_type: str = "state", render_mode: str | None = "rgb_array", image_size: int = IMAGE_SIZE):
        self.obs_type = check_obs_type(obs_type)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.render_mode = render_mode
        # The simulator of gym-pusht, used as is: its physics, reset distribution and coverage.
        self.sim = GymPushTEnv(
            obs_type="environment_state_agent_pos",
            render_mode="rgb_array",
            observation_width=image_size,
            observation_height=image_size,
            visualization_width=VIDEO_SIZE,
            visualization_height=VIDEO_SIZE,
        )
        # Loose finite bounds: the pusher may overshoot the walls slightly under PD control.
        self.observation_space = build_observation_space(
            obs_type,
            agent_pos=spaces.Box(-512.0, 1024.0, shape=(2,), dtype=np.float32),
            environment_state=spaces.Box(-512.0, 1024.0, shape=(16,), dtype=np.float32),
            cameras={CAMERA: (image_size, image_size)},
        )
        self.action_space = spaces.Box(0.0, 512.0, shape=(2,), dtype=np.float32)

    def _observation(self) -> dict:
        obs = {"agent_pos": np.asarray(self.sim.agent.position, dtype=np.float32)}
        if wants_state(self.obs_type):
            keypoints = self.sim.get_keypoints(self.sim._block_shapes)
            obs["environment_state"] = keypoints.reshape(-1).astype(np.float32)
        if wants_pixels(self.obs_type):
            obs["pixels"] = {CAMERA: self.sim._render(visualize=False)}
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # gym-pusht draws the initial state from its own np_random, seeded here.
        _, info = self.sim.reset(seed=seed, options=options)
        return self._observation(), self._info(info, coverage=self.sim._get_coverage())

    def step(self, action):
        action = validate_action(action, self.action_space)
        _, reward, terminated, truncated, info = self.sim.step(action)
        return self._observation(), float(reward), bool(terminated), bool(truncated), self._info(info)

    def _info(self, info: dict, coverage: float | None = None) -> dict:
        coverage = float(info.get("coverage", coverage if coverage is not None else 0.0))
        return {
            "is_success": bool(coverage > self.sim.success_threshold),
            "coverage": coverage,
            "block_pose": np.asarray(info["block_pose"], dtype=np.float64),
        }

    def hold_action(self) -> np.ndarray:
        """The action that keeps the robot where it is (contract: every step env has one)."""
        return np.clip(np.asarray(self.sim.agent.position, np.float32), self.action_space.low, self.action_space.high)

    def render(self):
        if self.render_mode is None:
            return None
        return self.sim.render()

    def close(self):
        self.sim.close()
