"""stable-baselines3 compatibility: SB3's evaluate_policy and VecVideoRecorder drive a STEP agent on Push-T."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

import step_envs  # noqa: E402,F401  (registers the step/* ids)
from agents import make_agent  # noqa: E402

EPISODE_STEPS = 24  # 3 replans per episode: enough to exercise the chunk cache and STEP's warm start


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from _random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("sb3_ckpt") / "policy")


def _env():
    return gym.make("step/PushT-v0", obs_type="state", render_mode="rgb_array", max_episode_steps=EPISODE_STEPS)


def _own_rollout(checkpoint, env_seed: int, agent_seed: int) -> float:
    """The project's own loop (reset / act) for one episode: total reward."""
    env = _env()
    agent = make_agent("step:2", env, checkpoint=str(checkpoint), seed=agent_seed)
    obs, _ = env.reset(seed=env_seed)
    agent.reset()
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(agent.act(obs))
        total += float(reward)
        done = terminated or truncated
    env.close()
    return total


def test_evaluate_policy_and_video_recorder(checkpoint, tmp_path):
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import DummyVecEnv, VecVideoRecorder

    venv = DummyVecEnv([_env, _env])
    venv.seed(7)  # env i starts its first episode from seed 7 + i
    agent = make_agent("step:2", venv, checkpoint=str(checkpoint), seed=0)  # rows seeded 0, 1
    recorder = VecVideoRecorder(venv, str(tmp_path / "videos"), record_video_trigger=lambda step: step == 0,
                                video_length=EPISODE_STEPS - 4, name_prefix="step2")
    with pytest.warns(UserWarning, match="Monitor"):  # rewards straight from the env, no Monitor wrapper
        rewards, lengths = evaluate_policy(agent, recorder, n_eval_episodes=2, deterministic=True,
                                           return_episode_rewards=True)
    recorder.close()
    assert lengths == [EPISODE_STEPS, EPISODE_STEPS]
    # the same episodes through the project's own loop: env seed 7 + i with a single agent seeded i
    expected = [_own_rollout(checkpoint, 7 + i, i) for i in range(2)]
    np.testing.assert_allclose(sorted(rewards), sorted(expected), rtol=1e-3, atol=1e-6)
    videos = list((tmp_path / "videos").glob("step2-*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000


def test_single_env_predict_matches_act(checkpoint):
    """n_envs = 1: predict takes and returns SB3's batch dim, and gives the actions act() gives."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([_env])
    venv.seed(3)
    sb3_agent = make_agent("step:2", _env(), checkpoint=str(checkpoint), seed=0)
    own_agent = make_agent("step:2", _env(), checkpoint=str(checkpoint), seed=0)
    obs = venv.reset()
    single = {k: v[0] for k, v in obs.items()}
    own_agent.reset()
    start = np.ones(1, dtype=bool)
    for _ in range(10):
        action, state = sb3_agent.predict(obs, state=None, episode_start=start)
        assert action.shape == (1, 2) and state is None
        np.testing.assert_array_equal(action[0], own_agent.act(single))
        obs, _, _, _ = venv.step(action)
        single = {k: v[0] for k, v in obs.items()}
        start = np.zeros(1, dtype=bool)
    venv.close()


def test_partial_episode_start_restarts_only_that_row(checkpoint):
    """A VecEnv row that starts a new episode gets exactly a fresh episode's first action."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([_env, _env])
    venv.seed(30)
    agent = make_agent("step:2", venv, checkpoint=str(checkpoint), seed=0)
    obs = venv.reset()
    start = np.ones(2, dtype=bool)
    for _ in range(5):
        action, _ = agent.predict(obs, episode_start=start)
        obs, _, _, _ = venv.step(action)
        start = np.zeros(2, dtype=bool)
    action, _ = agent.predict(obs, episode_start=np.array([True, False]))
    fresh = make_agent("step:2", _env(), checkpoint=str(checkpoint), seed=0)
    fresh.reset()
    np.testing.assert_allclose(action[0], fresh.act({k: v[0] for k, v in obs.items()}), atol=1e-3)
    with pytest.raises(ValueError, match="episode_start has 3 entries"):
        agent.predict(obs, episode_start=np.ones(3, dtype=bool))
    venv.close()


def test_random_agent_predict():
    env = _env()
    agent = make_agent("random", env, seed=1)
    obs, _ = env.reset(seed=0)
    action, state = agent.predict({k: v[None] for k, v in obs.items()}, episode_start=np.ones(1, dtype=bool))
    assert action.shape == (1, 2) and env.action_space.contains(action[0]) and state is None
    env.close()
