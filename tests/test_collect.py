"""Demonstration collection: LeRobotDataset round trip and resume without loss or duplicates."""

import json

import numpy as np

from step_envs.collect import CollectConfig, collect, read_summaries
from step_envs.dataset import load_dataset


def test_collect_resume_and_round_trip(tmp_path):
    out = tmp_path / "demos"
    cfg = CollectConfig(task="pusht", agent="random", episodes=2, out=str(out), obs_type="state", workers=2,
                        seed_start=10, min_max_reward=0.0)
    collect(cfg, progress=False)
    first = read_summaries(out)
    assert sorted(first) == [10, 11]
    # A killed worker leaves a temp file behind; the next run must clean it and only add new seeds.
    (out / "raw" / "seed_0000012.npz.tmp999").write_bytes(b"partial")
    cfg.episodes = 3
    report = collect(cfg, progress=False)
    summaries = read_summaries(out)
    assert sorted(summaries)[:3] == [10, 11, 12]
    assert not list((out / "raw").glob("*.tmp*"))
    assert report["episodes_in_dataset"] == 3

    dataset = load_dataset(out)
    assert dataset.num_episodes == 3
    assert set(dataset.features) >= {"observation.state", "observation.environment_state", "action"}
    # Frame-exact round trip of one episode against the raw cache.
    raw = np.load(out / "raw" / "seed_0000011.npz")
    # Episodes are written in seed order, so seed 11 is episode 1.
    ep_index = np.asarray(dataset.hf_dataset["episode_index"])
    rows = np.flatnonzero(ep_index == 1)
    assert len(rows) == raw["action"].shape[0]
    for key in ("action", "observation.state", "observation.environment_state"):
        got = np.stack([dataset[int(i)][key].numpy() for i in rows[:5]])
        np.testing.assert_allclose(got, raw[key][:5], rtol=0, atol=1e-6)
    assert json.loads((out / "collect_report.json").read_text())["seeds_tried"] >= 3
