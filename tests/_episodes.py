"""Shared by the agent tests: the actions an agent takes over the first n steps of a seeded episode."""

import numpy as np


def run_steps(env, agent, seed, n):
    obs, _ = env.reset(seed=seed)
    agent.reset()
    actions = []
    for _ in range(n):
        a = agent.act(obs)
        actions.append(a)
        obs, *_ = env.step(a)
    return np.stack(actions)
