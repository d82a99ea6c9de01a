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


def assert_batched_rows_equal_single_runs(method: str, checkpoint, steps: int, seed: int = 5) -> None:
    """A 2-env batched agent on Push-T seeds 0 and 1 takes, row by row, the actions of single-env agents
    seeded ``seed + row`` (each row draws its noise from its own generator); atol 1e-2 as test_diffusion_agents."""
    from agents.factory import make_agent
    from step_envs.registry import make_env

    vec = make_env("pusht", obs_type="state", num_envs=2)
    single = make_env("pusht", obs_type="state")
    try:
        agent = make_agent(method, vec, task="pusht", checkpoint=str(checkpoint), seed=seed)
        obs, _ = vec.reset(seed=[0, 1])
        agent.reset()
        batched = []
        for _ in range(steps):
            a = agent.act(obs)
            assert a.shape == (2, 2) and a.dtype == np.float32
            batched.append(a)
            obs, *_ = vec.step(a)
        batched = np.stack(batched)
        for row in range(2):
            one = make_agent(method, single, task="pusht", checkpoint=str(checkpoint), seed=seed + row)
            np.testing.assert_allclose(run_steps(single, one, row, steps), batched[:, row], atol=1e-2)
    finally:
        vec.close()
        single.close()
