"""Demonstration collection: LeRobotDataset round trip and resume without loss or duplicates."""

import json

import numpy as np
import pytest

from step_envs.collect import CollectConfig, collect, read_summaries
from step_envs.dataset import load_dataset


def test_collect_resume_and_round_trip(tmp_path):
    out = tmp_path / "demos"
    cfg = CollectConfig(task="pusht", agent="random", episodes=2, out=str(out), obs_type="state", workers=2,
                        seed_start=100_010, min_max_reward=0.0)
    report = collect(cfg, progress=False)
    first = read_summaries(out)
    # Seeds that finish after the N-th good one stay in the raw cache for a later, larger run (how many
    # do depends on worker timing); the dataset is always the first N in seed order.
    assert sorted(first)[:2] == [100_010, 100_011] and report["episodes_in_dataset"] == 2
    # A killed worker leaves a temp file behind; the next run must clean it and only add new seeds.
    (out / "raw" / "seed_0100012.npz.tmp999").write_bytes(b"partial")
    cfg.episodes = 3
    report = collect(cfg, progress=False)
    summaries = read_summaries(out)
    assert sorted(summaries)[:3] == [100_010, 100_011, 100_012]
    assert not list((out / "raw").glob("*.tmp*"))
    assert report["episodes_in_dataset"] == 3

    dataset = load_dataset(out)
    assert dataset.num_episodes == 3
    assert set(dataset.features) >= {"observation.state", "observation.environment_state", "action"}
    # Frame-exact round trip of one episode against the raw cache.
    raw = np.load(out / "raw" / "seed_0100011.npz")
    # Episodes are written in seed order, so seed 100011 is episode 1.
    ep_index = np.asarray(dataset.hf_dataset["episode_index"])
    rows = np.flatnonzero(ep_index == 1)
    assert len(rows) == raw["action"].shape[0]
    for key in ("action", "observation.state", "observation.environment_state"):
        got = np.stack([dataset[int(i)][key].numpy() for i in rows[:5]])
        np.testing.assert_allclose(got, raw[key][:5], rtol=0, atol=1e-6)
    assert json.loads((out / "collect_report.json").read_text())["seeds_tried"] >= 3


def test_collect_refuses_evaluation_seeds(tmp_path):
    from step_envs.seeds import TRAIN_EVAL_SEEDS

    out = tmp_path / "demos"
    for start in (0, TRAIN_EVAL_SEEDS.start - 10):  # the bench block, and a range running into training evaluation
        cfg = CollectConfig(task="pusht", agent="random", episodes=1, out=str(out), obs_type="state", seed_start=start,
                            max_seeds=100)
        with pytest.raises(ValueError, match="overlap the .*evaluation seeds"):
            collect(cfg, progress=False)
    assert not out.exists()  # refused before anything was written


def test_execution_noise_is_seeded_correlated_and_clipped():
    import gymnasium as gym

    from step_envs.collect import ExecutionNoise

    class Echo(gym.Env):
        def __init__(self):
            self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
            self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
            self.executed = []

        def reset(self, *, seed=None, options=None):
            return np.zeros(1, np.float32), {}

        def step(self, action):
            self.executed.append(np.array(action))
            return np.zeros(1, np.float32), 0.0, False, False, {}

    def noise_of(seed, sigma=0.1, rho=0.9, clean=0.0, steps=4000):
        env = ExecutionNoise(Echo(), sigma, rho, seed)
        env.reset(seed=seed)
        for _ in range(steps):
            env.step(np.full(3, clean, np.float32))
        return np.array(env.unwrapped.executed) - clean

    n = noise_of(7)
    assert np.array_equal(n, noise_of(7)) and not np.array_equal(n, noise_of(8))  # seeded per episode seed
    assert 0.08 < n.std() < 0.12  # stationary std sigma (4000 correlated steps: a few per cent of sampling error)
    lag1 = np.mean([np.corrcoef(n[:-1, d], n[1:, d])[0, 1] for d in range(3)])
    assert 0.85 < lag1 < 0.95  # AR(1) with rho 0.9, not white noise
    assert np.abs(noise_of(7, sigma=0.5, clean=0.9, steps=200) + 0.9).max() <= 1.0 + 1e-6  # clipped to the space


def test_noisy_demonstrations_keep_the_clean_action():
    """A DART episode records the expert's own (clean) action, and the noise changes what the expert saw."""
    from step_envs.collect import run_expert_episode

    clean = run_expert_episode("pusht", "state", 100_000)
    noisy = run_expert_episode("pusht", "state", 100_000, action_noise=8.0)  # pixels of Push-T's 512 px board
    again = run_expert_episode("pusht", "state", 100_000, action_noise=8.0)
    for key in noisy["episode"]:
        np.testing.assert_array_equal(noisy["episode"][key], again["episode"][key])  # a rerun redoes the seed exactly
    # The first action depends only on the initial state (the same seed): recorded clean, it is the noiseless
    # expert's to the bit; recorded with the noise it would be ~8 px off. Later states differ (the noise acted).
    np.testing.assert_array_equal(noisy["episode"]["action"][0], clean["episode"]["action"][0])
    steps = min(len(clean["episode"]["action"]), len(noisy["episode"]["action"]))
    assert not np.allclose(clean["episode"]["observation.state"][:steps], noisy["episode"]["observation.state"][:steps])


def test_collect_refuses_a_folder_made_with_other_noise(tmp_path):
    out = tmp_path / "demos"
    base = dict(task="pusht", agent="random", episodes=1, out=str(out), obs_type="state", workers=1,
                seed_start=100_010, min_max_reward=0.0)
    collect(CollectConfig(**base), progress=False)
    with pytest.raises(ValueError, match="action_noise"):
        collect(CollectConfig(**base, action_noise=2.0), progress=False)
    with pytest.raises(ValueError, match="below 1"):
        CollectConfig(**base, action_noise_corr=1.0)
