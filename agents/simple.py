"""Agents that need no training: a seeded random agent (smoke tests, a floor for success rates)."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from agents.sb3 import PredictMixin


class RandomAgent(PredictMixin):  # + stable-baselines3's predict() (agents/sb3.py)
    def __init__(self, action_space: spaces.Box, seed: int = 0, batch_size: int | None = None):
        self.action_space = action_space
        self.batch_size = batch_size
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def act(self, obs: dict) -> np.ndarray:
        shape = self.action_space.shape if self.batch_size is None else (self.batch_size, *self.action_space.shape)
        return self.rng.uniform(self.action_space.low, self.action_space.high, size=shape).astype(np.float32)
