"""`step bench` end to end on a tiny checkpoint: JSON rows, Markdown table and Pareto plot."""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from agents.cli import main
from agents.factory import make_agent
from step_envs.registry import make_env
from step_envs.rollout import rollout, summarize

REPO = Path(__file__).resolve().parents[1]


def test_bench_writes_json_markdown_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--task", "pusht", "--checkpoint", str(tiny_checkpoint), "--methods",
                 "ddim:2,step:2,step-temporal:2", "--episodes", "2", "--num-envs", "2", "--out", str(out),
                 "--latency-calls", "3", "--max-steps", "40"])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["steps"]) for r in report["rows"]] == [("ddim", 2), ("step", 2), ("step-temporal", 2)]
    assert report["config"]["num_envs"] == 2
    assert {r["rollout_threads"] for r in report["rows"]} == {torch.get_num_threads()}  # torch's default
    for row in report["rows"]:
        assert row["episodes"] == 2 and row["seed_start"] == 0
        assert row["latency_ms"]["median"] > 0 and row["nfe_ms_median"] > 0
    # The rows are the rollout loop's numbers on seeds 0-1, exactly: the same agent rolled out here agrees.
    env = make_env("pusht", obs_type="state", num_envs=2)
    try:
        results = rollout(env, make_agent("ddim:2", env, task="pusht", checkpoint=str(tiny_checkpoint)), [0, 1],
                          progress=False, max_steps=40)
    finally:
        env.close()
    expected = summarize(results)
    assert report["rows"][0]["success_rate"] == expected["success_rate"]
    assert report["rows"][0]["mean_max_reward"] == expected["mean_max_reward"]
    table = (out / "results.md").read_text()
    assert "| STEP | 2 |" in table and "| DDIM | 2 |" in table
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # Merged rows join them (a step@t variant is a row of its own); the report's config names every row's method.
    assert main(["bench", "--task", "pusht", "--checkpoint", str(tiny_checkpoint), "--methods", "ddim:1,step@30:1",
                 "--episodes", "2", "--num-envs", "2", "--out", str(out), "--latency-calls", "2", "--max-steps", "40",
                 "--merge", "--threads", "1"]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert [r["rollout_threads"] for r in merged["rows"]] == [torch.get_num_threads()] * 3 + [1, 1]
    assert merged["config"]["methods"] == ["ddim:2", "step:2", "step-temporal:2", "ddim:1", "step@30:1"]
    # Rows of two runs: the table gives each row's own rollout seconds, and names the wall time as the last run's.
    merged_md = (out / "results.md").read_text()
    assert "Bench wall time" in table and "Last merged run wall time" in merged_md
    assert "| STEP, warm start t=30 | 1 |" in merged_md
    assert f"DDIM-2 {report['rows'][0]['rollout_seconds']:.0f}, STEP-2" in merged_md and "DDIM-1 " in merged_md
    # Latency re-measured alone keeps every success row, and measures each row's own method (not the last
    # merge's): every row's network calls per replan are its steps.
    assert main(["bench", "--task", "pusht", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--latency-only", "--latency-calls", "2"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["latency_remeasured"] and again["wall_seconds"] == merged["wall_seconds"] and again["merged"]
    assert [(r["method"], r["steps"], r["success_rate"]) for r in again["rows"]] == [
        (r["method"], r["steps"], r["success_rate"]) for r in merged["rows"]]
    assert [r["nfe_per_replan"] for r in again["rows"]] == [2, 2, 2, 1, 1]


def test_row_specs_rebuild_the_specs_of_older_rows():
    from agents.bench import row_specs

    rows = [{"method": "ddpm", "steps": 100}, {"method": "sdp", "steps": 16}, {"method": "rnrdp", "steps": 15},
            {"method": "falcon", "steps": 2}, {"method": "step", "steps": 2, "spec": "step:2"}]
    assert row_specs(rows) == ("ddpm:100", "sdp", "rnrdp", "falcon:2", "step:2")


def test_image_policies_of_mujoco_tasks_bench_in_narrower_waves_than_state_policies():
    from agents.bench import wave_width
    from step_envs.registry import get_task

    # 50 robosuite camera envs hold ~22 GB: an image policy of a RoboMimic task gets the task's camera width
    assert wave_width(None, get_task("lift"), "pixels") == get_task("lift").camera_num_envs == 10
    assert wave_width(None, get_task("lift"), "state") == 50
    assert wave_width(None, get_task("pusht"), "pixels") == 50  # a 2-D env: its images cost little
    assert wave_width(7, get_task("lift"), "pixels") == 7  # --num-envs wins


def test_bench_without_checkpoint_is_clear(tmp_path, capsys):
    code = main(["bench", "--task", "pusht", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert code == 2
    assert "No policy checkpoint" in capsys.readouterr().err


def _report(task, rows):
    return {"task": task, "rows": [
        {"method": m, "steps": k, "episodes": 10, "seed_start": 0, "success_rate": s, "latency_ms": {"median": ms}}
        for m, k, s, ms in rows]}


def test_table_puts_tasks_side_by_side(tmp_path, capsys):
    for task, rows in {"lift": [("ddpm", 100, 1.0, 700.0), ("step", 2, 0.9, 15.0)],
                       "can": [("step", 2, 0.5, 16.0), ("ddim", 2, 0.2, 14.0)]}.items():
        (tmp_path / task).mkdir()
        (tmp_path / task / "results.json").write_text(json.dumps(_report(task, rows)))
    assert main(["table", str(tmp_path / "lift"), str(tmp_path / "can"), "--out", str(tmp_path / "t")]) == 0
    table = (tmp_path / "t" / "table.md").read_text()
    assert "| Method | Step | lift success | lift ms | can success | can ms |" in table
    assert "| STEP | 2 | 0.90 [0.60, 0.98] | 15.0 | 0.50 [0.24, 0.76] | 16.0 |" in table
    assert "| Vanilla (DDPM) | 100 | 1.00 [0.72, 1.00] | 700.0 | - | - |" in table  # a method one task lacks
    assert "| DDIM | 2 | - | - | 0.20 [0.06, 0.51] | 14.0 |" in table
    assert "lift 10 episodes on seeds 0-9" in table
    assert (tmp_path / "t" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["table", str(tmp_path / "missing")]) == 2


def test_combined_plot_wraps_many_tasks_into_rows_of_four(tmp_path):
    import matplotlib.image

    from agents.bench import combined_plot

    reports = [_report(f"task{i}", [("ddpm", 100, 1.0, 700.0), ("step", 2, 0.9, 15.0)]) for i in range(6)]
    combined_plot(reports, tmp_path / "six.png")
    combined_plot(reports[:4], tmp_path / "four.png")
    six, four = matplotlib.image.imread(tmp_path / "six.png"), matplotlib.image.imread(tmp_path / "four.png")
    assert six.shape[1] == four.shape[1]  # four panels wide either way
    assert six.shape[0] == 2 * four.shape[0]  # six tasks take a second row


def test_table_shows_state_and_image_policies_of_one_task_side_by_side(tmp_path):
    for name, obs_type in (("pusht", "state"), ("pusht_image", "pixels")):
        (tmp_path / name).mkdir()
        report = {**_report("pusht", [("step", 2, 0.8, 5.0)]), "obs_type": obs_type}
        (tmp_path / name / "results.json").write_text(json.dumps(report))
    assert main(["table", str(tmp_path / "pusht"), str(tmp_path / "pusht_image"), "--out", str(tmp_path / "t")]) == 0
    table = (tmp_path / "t" / "table.md").read_text()
    assert "| Method | Step | pusht success | pusht ms | pusht image success | pusht image ms |" in table
    assert "pusht image 10 episodes on seeds 0-9" in table


def test_image_report_shows_encode_time_beside_the_denoiser():
    from agents.bench import markdown_table

    row = {"method": "step", "steps": 2, "episodes": 10, "seed_start": 0, "success_rate": 0.8, "mean_max_reward": 0.9,
           "latency_ms": {"median": 30.0, "p90": 35.0}, "nfe_ms_median": 5.0, "encode_ms_median": 12.0,
           "ratio": 3.0, "ratio_with_encode": 30.0 / 22.0}
    tables = {obs: markdown_table({"task": "pusht", "obs_type": obs, "latency_threads": 1, "wall_seconds": 1.0,
                                   "rows": [row]}) for obs in ("state", "pixels")}
    assert "Encode" not in tables["state"]
    lines = [line for line in tables["pixels"].splitlines() if line.startswith("|")]
    assert "| Encode (ms) | Time / (Encode + Step x NFE) |" in lines[0]
    assert len({line.count("|") for line in lines}) == 1  # header, rule and row have the same columns
    assert "| 3.00 | 12.00 | 1.36 | 2 |" in lines[2]


def test_wilson_interval_known_values():
    import pytest

    from agents.bench import wilson_interval

    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # textbook value
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and hi == pytest.approx(0.0714, abs=1e-4)  # never a zero-width interval at 0/n
    assert wilson_interval(50, 50)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def _blocked_on_a_lock(pid: int) -> bool:
    """Linux lists a process waiting for a flock in /proc/locks with '->' before the lock's type."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines() if len(line.split()) > 5)


def test_merge_waits_for_another_merge_and_keeps_its_rows(tiny_checkpoint, tmp_path):
    """Two `--merge` runs into one folder (two lanes): the one that finishes second waits for the folder's lock,
    then reads the rows the first one wrote, so neither loses the other's."""
    from agents.bench import load_report
    from step_envs.safe_io import folder_lock

    out = tmp_path / "bench"
    common = ["--task", "pusht", "--checkpoint", str(tiny_checkpoint), "--episodes", "2", "--num-envs", "2",
              "--out", str(out), "--latency-calls", "2", "--max-steps", "20"]
    assert main(["bench", "--methods", "ddim:2", *common]) == 0
    with folder_lock(out, "test: another lane"):
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from agents.cli import main; "
                                 "sys.exit(main(sys.argv[1:]))", "bench", "--methods", "ddim:1", "--merge", *common,
                                 "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 300  # a bound on the wait for the other process, not a measured time
        while not _blocked_on_a_lock(proc.pid):
            assert proc.poll() is None, f"bench --merge did not wait for the lock: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "bench --merge never reached the folder's lock"
            time.sleep(0.2)
        # the other lane's rows land while this one waits
        report = load_report(out)
        report["rows"].append({**report["rows"][0], "steps": 3, "spec": "ddim:3"})
        (out / "results.json").write_text(json.dumps(report))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    merged = load_report(out)
    assert [(r["method"], r["steps"]) for r in merged["rows"]] == [("ddim", 2), ("ddim", 3), ("ddim", 1)]


def test_latency_only_keeps_rows_merged_while_it_measured(tiny_checkpoint, tmp_path, monkeypatch):
    """`--latency-only` reads results.json again under the folder's lock before it writes: a `--merge` lane that
    lands a row while the latency is being measured keeps it."""
    import agents.bench as bench
    from agents.bench import load_report

    out = tmp_path / "bench"
    common = ["--task", "pusht", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--latency-calls", "2"]
    assert main(["bench", "--methods", "ddim:2", "--episodes", "2", "--num-envs", "2", "--max-steps", "20",
                 *common]) == 0
    measure = bench.bench_latency

    def measure_while_another_lane_merges(*args, **kwargs):
        latency = measure(*args, **kwargs)
        report = load_report(out)  # the other lane's row lands between this run's read and its write
        report["rows"].append({**report["rows"][0], "steps": 3, "spec": "ddim:3", "success_rate": 0.5,
                               "nfe_ms_median": -1.0})
        (out / "results.json").write_text(json.dumps(report))
        return latency

    monkeypatch.setattr(bench, "bench_latency", measure_while_another_lane_merges)
    assert main(["bench", "--latency-only", *common]) == 0
    rows = load_report(out)["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("ddim", 2), ("ddim", 3)]
    assert rows[0]["nfe_ms_median"] > 0  # re-measured
    assert rows[1]["success_rate"] == 0.5 and rows[1]["nfe_ms_median"] == -1.0  # the merged row, untouched
    assert load_report(out)["config"]["methods"] == ["ddim:2", "ddim:3"]
