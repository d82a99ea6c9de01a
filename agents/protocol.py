"""The agent contract every policy of the project follows (diffusion, peers, experts, leader arm, random).

``reset()`` at the start of an episode, then ``act(obs)`` once per env step: ``obs`` is the env's observation dict
(batched for a VectorEnv) and the result the action (``(A,)`` or ``(B, A)``). Agents are built by
``agents.make_agent``; the one episode loop that runs them is ``step_envs.rollout.rollout``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Agent(Protocol):
    def reset(self) -> None: ...

    def act(self, obs: dict) -> np.ndarray: ...
