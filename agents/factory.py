"""One factory for every agent: ``make_agent("ddim:4", env, checkpoint=...)``.

Method specs are ``name`` or ``name:steps``. Agents built here all share ``reset()`` / ``act(obs)``
and work on a single env or a gymnasium VectorEnv (one batched call for all envs).
"""

from __future__ import annotations

import gymnasium as gym


def parse_method(spec: str) -> tuple[str, int | None]:
    name, _, steps = spec.strip().partition(":")
    if not name:
        raise ValueError(f"Empty method spec {spec!r}")
    if steps:
        if not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"Method spec {spec!r}: steps must be a positive integer, e.g. 'ddim:4'.")
        return name.lower(), int(steps)
    return name.lower(), None


def _single_spaces(env):
    if isinstance(env, gym.vector.VectorEnv):
        return env.single_observation_space, env.single_action_space, env.num_envs
    return env.observation_space, env.action_space, None


def make_agent(method: str, env, task: str | None = None, checkpoint: str | None = None, seed: int = 0, **kwargs):
    name, steps = parse_method(method)
    obs_space, action_space, batch = _single_spaces(env)
    if name == "expert":
        from step_envs.experts import make_expert

        if task is None:
            raise ValueError("The expert agent needs the task name.")
        return make_expert(task, env, seed=seed)
    if name == "random":
        from agents.simple import RandomAgent

        return RandomAgent(action_space, seed=seed, batch_size=batch)
    raise ValueError(f"Unknown method {name!r}. Known: expert, random.")
