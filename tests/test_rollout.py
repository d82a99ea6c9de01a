"""The one rollout loop: seeded determinism, single vs batched envs, videos, bad input."""

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import pytest
from gymnasium.wrappers import TimeLimit

from agents.factory import make_agent
from step_envs import make_env
from step_envs.rollout import rollout, summarize


class ChaseBlockAgent:
    """Deterministic obs -> action map (drives the pusher toward the T's centre); works batched."""

    def __init__(self):
        self.calls = []

    def reset(self):
        pass

    def act(self, obs):
        keypoints = np.asarray(obs["environment_state"])
        centre = keypoints.reshape(*keypoints.shape[:-1], 8, 2).mean(axis=-2)
        self.calls.append(np.asarray(obs["agent_pos"]).copy())
        return np.clip(centre, 0, 512).astype(np.float32)


def test_same_seed_same_trajectory():
    env = make_env("pusht")
    first, second = RecordingAgent(make_agent("random", env, seed=5)), RecordingAgent(make_agent("random", env, seed=5))
    r1 = rollout(env, first, seeds=[7], progress=False)
    r2 = rollout(env, second, seeds=[7], progress=False)
    assert r1[0].length == r2[0].length == 300
    np.testing.assert_array_equal(np.stack(first.observations), np.stack(second.observations))
    assert r1[0].max_reward == r2[0].max_reward


class RecordingAgent:
    def __init__(self, inner):
        self.inner, self.observations = inner, []

    def reset(self):
        self.inner.reset()

    def act(self, obs):
        self.observations.append(np.concatenate([obs["agent_pos"], obs["environment_state"]]))
        return self.inner.act(obs)


def test_batched_matches_single():
    seeds = [0, 1, 2]
    single = rollout(make_env("pusht"), ChaseBlockAgent(), seeds, progress=False)
    batched = rollout(make_env("pusht", num_envs=2), ChaseBlockAgent(), seeds, progress=False)
    for a, b in zip(single, batched):
        assert (a.seed, a.success, a.length) == (b.seed, b.success, b.length)
        assert a.max_reward == pytest.approx(b.max_reward, abs=1e-9)


class PixelRecordingAgent(ChaseBlockAgent):
    """ChaseBlockAgent that also keeps the camera frames it was given (image observations nest a camera dict)."""

    def __init__(self):
        super().__init__()
        self.frames = []

    def act(self, obs):
        self.frames.append(np.asarray(obs["pixels"]["top"]).copy())
        return super().act(obs)


def test_batched_matches_single_with_camera_observations():
    seeds = [0, 1, 2]
    single_agent, batched_agent = PixelRecordingAgent(), PixelRecordingAgent()
    single = rollout(make_env("pusht", obs_type="pixels_state"), single_agent, seeds, progress=False, max_steps=12)
    batched = rollout(make_env("pusht", obs_type="pixels_state", num_envs=2), batched_agent, seeds, progress=False,
                      max_steps=12)
    assert [(r.seed, r.length) for r in single] == [(r.seed, r.length) for r in batched] == [(s, 12) for s in seeds]
    # seed 0's frames: the single env's first 12 calls are the first row of the batched env's first 12 calls
    assert batched_agent.frames[0].shape == (2, 96, 96, 3)
    for step in range(12):
        np.testing.assert_array_equal(single_agent.frames[step], batched_agent.frames[step][0])
    assert not np.array_equal(batched_agent.frames[0][0], batched_agent.frames[11][0])  # the scene moved


def test_videos_are_playable(tmp_path):
    env = make_env("pusht")
    results = rollout(env, make_agent("random", env, seed=0), [3, 4], video_dir=tmp_path, num_videos=1,
                      progress=False, max_steps=20)
    assert results[0].video is not None and results[1].video is None
    frames = imageio.mimread(results[0].video)
    assert len(frames) == results[0].length + 1  # the reset frame plus one per step
    assert frames[0].shape[2] == 3
    summary = summarize(results)
    assert summary["episodes"] == 2 and summary["mean_length"] == 20  # capped by max_steps
    assert summary["mean_max_reward"] == (results[0].max_reward + results[1].max_reward) / 2
    assert [e["seed"] for e in summary["per_episode"]] == [3, 4]


def test_rollout_rejects_bad_arguments(tmp_path):
    env = make_env("pusht")
    agent = make_agent("random", env)
    with pytest.raises(ValueError, match="distinct"):
        rollout(env, agent, [1, 1], progress=False)
    with pytest.raises(ValueError, match="video_dir"):
        rollout(env, agent, [1], num_videos=1, progress=False)


class CountSteps(gym.Wrapper):
    def __init__(self, env):
        super().__init__(env)
        self.steps = 0

    def step(self, action):
        self.steps += 1
        return super().step(action)


def test_finished_envs_are_not_stepped_on():
    # Episodes of 5 and 20 steps in one wave: the short one must not keep simulating (and auto-resetting)
    # while the long one runs, and each episode's length must be its own.
    env = gym.vector.SyncVectorEnv([lambda: CountSteps(TimeLimit(make_env("pusht"), 5)),
                                    lambda: CountSteps(TimeLimit(make_env("pusht"), 20))])
    results = rollout(env, ChaseBlockAgent(), seeds=[3, 4], progress=False)
    assert [r.length for r in results] == [5, 20]
    assert [sub.steps for sub in env.envs] == [5, 20]


def test_step_hook_sees_every_step_before_the_env_moves():
    """collect and record build their dataset frames from this hook: one (obs, action) per step, in order."""
    env = make_env("pusht")
    agent = RecordingAgent(make_agent("random", env, seed=1))
    seen = []
    (result,) = rollout(env, agent, [2], progress=False, max_steps=15,
                        step_hook=lambda obs, action: seen.append((obs["agent_pos"].copy(), action.copy())))
    assert result.length == len(seen) == 15
    np.testing.assert_array_equal(np.stack([o for o, _ in seen]), np.stack(agent.observations)[:, :2])
    assert all(a.shape == (2,) for _, a in seen)
