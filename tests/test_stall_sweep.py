"""`step stall-sweep` end to end on a tiny checkpoint: one row per setting, table and plot."""

import json

from agents.cli import main


def test_stall_sweep_writes_rows_table_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    code = main(["stall-sweep", "--task", "pusht", "--checkpoint", str(tiny_checkpoint), "--sigmas", "0.5,1",
                 "--episodes", "2", "--num-envs", "2", "--max-steps", "24", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert [r["sigma_stall"] for r in report["rows"]] == ["off", 0.5, 1.0]
    assert all(0.0 <= r["success_rate"] <= 1.0 and r["mean_episode_seconds"] > 0 for r in report["rows"])
    assert "none (detector off)" in (out / "results.md").read_text()
    assert (out / "sigma_sweep.png").read_bytes()[:4] == b"\x89PNG"
    for row in report["rows"]:  # freezes and what the detector saw are reported per row
        assert 0.0 <= row["frozen_rate"] <= 1.0 and 0.0 <= row["fired_rate"] <= 1.0
        assert row["replans"] == 2 * 2 and row["delta_median"] >= 0  # 3 replans per episode, 2 with a previous chunk
    assert report["rows"][0]["fired_rate"] == 0.0  # detector off


def test_stall_statistics_counts_freezes_and_detector():
    """A synthetic wave: row 0 moves then freezes until the end (failed), row 1 keeps moving (success)."""
    import numpy as np

    from agents.stall_sweep import StallRecorder, StallSweepConfig, stall_statistics
    from step_envs.rollout import EpisodeResult

    rec = StallRecorder(agent=None)
    moving = np.arange(60, dtype=float)
    frozen = np.concatenate([np.arange(10, dtype=float), np.full(50, 9.0)])
    rec.waves.append({"pos": [np.array([[frozen[t]], [moving[t]]]) for t in range(60)],
                      "replans": [(t, np.array([t >= 24, False]), np.array([0.0 if t >= 24 else 0.5, 0.5]))
                                  for t in range(8, 60, 8)]})
    results = [EpisodeResult(0, False, 0.0, 60, 0.0), EpisodeResult(1, True, 1.0, 60, 0.0)]
    stats = stall_statistics(rec, results, 2, StallSweepConfig(checkpoint="unused", freeze_steps=30), shift=8)
    assert stats["frozen_rate"] == 0.5 and stats["frozen_at_end_rate"] == 0.5
    assert stats["replans"] == 14 and stats["fired_rate"] == 5 / 14  # row 0 at t = 24, 32, 40, 48, 56
    assert stats["frozen_replans"] == 5 and stats["frozen_delta_median"] == 0.0  # row 0 at t = 24 .. 56


def test_stall_sweep_refuses_non_step_method(tiny_checkpoint, tmp_path, capsys):
    assert main(["stall-sweep", "--checkpoint", str(tiny_checkpoint), "--method", "ddim:2", "--out", str(tmp_path)]) == 2
    assert "STEP spec" in capsys.readouterr().err
