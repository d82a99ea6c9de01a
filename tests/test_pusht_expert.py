"""The scripted Push-T expert: succeeds, stays in range, leaves the live sim alone, batches."""

import numpy as np

from agents.factory import make_agent
from step_envs import make_env
from step_envs.rollout import rollout


def test_expert_succeeds_on_seeds():
    env = make_env("pusht")
    results = rollout(env, make_agent("expert", env, task="pusht"), seeds=[0, 1, 2], progress=False)
    assert all(r.success for r in results), [(r.seed, r.max_reward) for r in results]
    assert all(r.length < 300 for r in results)  # terminated on success, before the TimeLimit


def test_expert_actions_valid_and_sim_untouched():
    env = make_env("pusht")
    expert = make_agent("expert", env, task="pusht")
    obs, _ = env.reset(seed=5)
    expert.reset()
    sim = env.unwrapped.sim
    for _ in range(20):
        before = (tuple(sim.agent.position), tuple(sim.block.position), sim.block.angle)
        action = expert.act(obs)
        assert (tuple(sim.agent.position), tuple(sim.block.position), sim.block.angle) == before
        assert action.shape == (2,) and action.dtype == np.float32
        assert np.all(np.isfinite(action)) and np.all((action >= 0) & (action <= 512))
        obs, *_ = env.step(action)


def test_expert_batched_matches_single():
    env = make_env("pusht")
    single = rollout(env, make_agent("expert", env, task="pusht"), [3], progress=False)
    vec = make_env("pusht", num_envs=2)
    batched = rollout(vec, make_agent("expert", vec, task="pusht"), [3, 4], progress=False)
    assert (single[0].success, single[0].length) == (batched[0].success, batched[0].length)
