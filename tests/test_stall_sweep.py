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


def test_stall_sweep_refuses_non_step_method(tiny_checkpoint, tmp_path, capsys):
    assert main(["stall-sweep", "--checkpoint", str(tiny_checkpoint), "--method", "ddim:2", "--out", str(tmp_path)]) == 2
    assert "STEP spec" in capsys.readouterr().err
