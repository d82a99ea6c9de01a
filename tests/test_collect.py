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
