"""`step bench` end to end on a tiny checkpoint: JSON rows, Markdown table and Pareto plot."""

import json

from agents.cli import main


def test_bench_writes_json_markdown_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--task", "pusht", "--checkpoint", str(tiny_checkpoint), "--methods",
                 "ddim:2,step:2,step-temporal:2", "--episodes", "2", "--num-envs", "2", "--out", str(out),
                 "--latency-calls", "3", "--max-steps", "40"])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["steps"]) for r in report["rows"]] == [("ddim", 2), ("step", 2), ("step-temporal", 2)]
    for row in report["rows"]:
        assert row["episodes"] == 2 and 0.0 <= row["success_rate"] <= 1.0
        assert row["latency_ms"]["median"] > 0 and row["nfe_ms_median"] > 0
    table = (out / "results.md").read_text()
    assert "| STEP | 2 |" in table and "| DDIM | 2 |" in table
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_without_checkpoint_is_clear(tmp_path, capsys):
    code = main(["bench", "--task", "pusht", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert code == 2
    assert "No policy checkpoint" in capsys.readouterr().err
