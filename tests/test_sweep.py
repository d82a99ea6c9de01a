"""`step sweep`: the sweep file's checks, fingerprints and the merge of seed blocks; then on a local Ray of 2 workers:
the merged rows equal `step bench` on the same seeds, a driver killed after its first cell resumes without
recomputing that cell, and a cell that raises is reported while the others finish."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agents.cli import main
from agents.sweep import SweepSpec, checkpoint_hash, load_spec, make_plan, merge_blocks, seed_blocks, wave_width

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"rollout_seconds", "latency_ms", "nfe_ms_median", "encode_ms_median", "ratio", "ratio_with_encode",
               "ms_per_action"}  # differ run to run


def write_spec(path: Path, checkpoint, **changes) -> Path:
    spec = {"tasks": {"pusht": str(checkpoint)}, "methods": ["ddim:2", "step:2"],
            "seeds": {"start": 0, "episodes": 4, "block": 2}, "num_envs": 2, "max_steps": 20, "latency_calls": 3}
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec))
    return path


# ------------------------------------------------------------------ without Ray
@pytest.mark.parametrize("changes, message", [
    ({"bogus": 1}, "Unknown SweepSpec field(s) ['bogus']"),
    ({"seeds": None, "seed_blocks": [[0, 4], [2, 4]]}, "overlap"),
    ({"seeds": None, "seed_blocks": [[0, 2], [4, 2]]}, "leave seeds 2-3 out"),
    ({"seeds": {"start": 0, "episodes": 6, "block": 3}}, "not a multiple of the wave width 2"),
    ({"seeds": {"start": 99_998, "episodes": 4, "block": 2}}, "leaves the evaluation seeds"),
    ({"methods": ["ddim:x"]}, "steps must be a positive integer"),
    ({"grid": {"warp_speed": [1, 2]}}, "unknown agent setting 'warp_speed'"),
    ({"tasks": {"pusht": "/nonexistent/ckpt"}}, "No policy checkpoint at /nonexistent/ckpt"),
])
def test_bad_sweep_files_are_refused_in_one_line(tiny_checkpoint, tmp_path, capsys, changes, message):
    spec = write_spec(tmp_path / "sweep.yaml", tiny_checkpoint, **changes)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "cells").exists()  # refused before any work


def test_wave_width_caps_camera_policies_as_bench_does():
    spec = SweepSpec(tasks=["lift"], seeds={"start": 0, "episodes": 50})
    blocks = seed_blocks(spec)
    assert wave_width(spec, blocks) == 50  # state policies: one wave per block
    assert wave_width(spec, blocks, camera_width=10) == 10  # image policies: the task's camera_num_envs
    spec.num_envs = 25
    assert wave_width(spec, blocks, camera_width=10) == 25  # num_envs wins, as --num-envs does
    spec.num_envs, spec.seeds = None, {"start": 0, "episodes": 50, "block": 25}
    with pytest.raises(ValueError, match="not a multiple of the wave width 20"):
        wave_width(spec, seed_blocks(spec), camera_width=20)


def test_blocks_cells_and_fingerprints(tiny_checkpoint, tmp_path):
    plan = make_plan(load_spec(write_spec(tmp_path / "a.yaml", tiny_checkpoint)))
    assert plan.blocks == [(0, 2), (2, 2)] and plan.width == 2
    assert sorted(c.id for c in plan.cells) == sorted([
        "pusht.latency.ddim-2", "pusht.latency.step-2",
        "pusht.default.ddim-2.seeds0-1", "pusht.default.ddim-2.seeds2-3",
        "pusht.default.step-2.seeds0-1", "pusht.default.step-2.seeds2-3"])
    # A capped episode length changes every rollout cell's fingerprint, not the latency cells'.
    other = make_plan(load_spec(write_spec(tmp_path / "b.yaml", tiny_checkpoint, max_steps=30)))
    for cell in plan.cells:
        same = plan.payloads[cell.id] == other.payloads[cell.id]
        assert same == (cell.kind == "latency")
    # The checkpoint hash follows the content of the files a method reads, and only those.
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    assert checkpoint_hash(copy) == checkpoint_hash(tiny_checkpoint)
    spec = write_spec(tmp_path / "d.yaml", copy)
    first = make_plan(load_spec(spec)).payloads
    (copy / "streaming").mkdir()
    (copy / "streaming" / "config.json").write_text("{}")  # another model trained into a subfolder
    (copy / "loss.jsonl").write_text("{}\n")  # a log
    assert make_plan(load_spec(spec)).payloads == first
    predictor = copy / "predictor" / "config.json"
    predictor.write_text(predictor.read_text() + " ")
    changed = make_plan(load_spec(spec)).payloads
    assert {cid for cid in first if first[cid] != changed[cid]} == {
        "pusht.latency.step-2", "pusht.default.step-2.seeds0-1", "pusht.default.step-2.seeds2-3"}
    # A grid multiplies the rollout cells (latency is measured once per method).
    grid = make_plan(load_spec(write_spec(tmp_path / "c.yaml", tiny_checkpoint, grid={"first_call": ["predictor", "noise"]})))
    assert len([c for c in grid.cells if c.kind == "rollout"]) == 8
    assert {c.setting for c in grid.cells if c.kind == "rollout"} == {"first_call=predictor", "first_call=noise"}


def test_explicit_blocks_are_sorted_and_contiguous():
    from agents.sweep import SweepSpec

    spec = SweepSpec(tasks=["pusht"], seed_blocks=([10, 5], [0, 10]))
    assert seed_blocks(spec) == [(0, 10), (10, 5)]


def _cell(seed_start, successes, rewards):
    episodes = [{"seed": seed_start + i, "success": s, "max_reward": r, "length": 5, "agent_seconds": 0.1, "video": None}
                for i, (s, r) in enumerate(zip(successes, rewards))]
    row = {"method": "ddim", "steps": 2, "episodes": len(episodes), "seed_start": seed_start,
           "success_rate": sum(successes) / len(successes), "mean_max_reward": sum(rewards) / len(rewards),
           "rollout_seconds": 1.0, "nfe_per_action": 0.25}
    return {"row": row, "per_episode": episodes}


def test_merge_adds_episodes_and_refuses_double_counting():
    merged = merge_blocks([_cell(3, [False, False, True], [0.1, 0.2, 1.0]), _cell(0, [True, True, False], [1.0, 1.0, 0.3])])
    assert merged["episodes"] == 6 and merged["seed_start"] == 0
    assert merged["success_rate"] == 0.5 and merged["rollout_seconds"] == 2.0 and merged["nfe_per_action"] == 0.25
    assert merged["mean_max_reward"] == pytest.approx((0.1 + 0.2 + 1.0 + 1.0 + 1.0 + 0.3) / 6)
    with pytest.raises(ValueError, match="counted twice"):
        merge_blocks([_cell(0, [True, True], [1.0, 1.0]), _cell(1, [True], [1.0])])


# ------------------------------------------------------------------ on a local Ray of 2 workers
@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One local Ray instance (2 CPUs) for the in-process sweeps of this module; `run_sweep` uses it as it is."""
    import tempfile

    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="step-ray-test-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _report(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _assert_same_rows(swept: list[dict], bench: list[dict]) -> None:
    """Same keys, same integers and strings; floats equal to 1e-9 relative (a Ray worker's torch may round a
    reward's last bit differently from the test process: that is not a different result)."""
    assert [sorted(_without_timing(r)) for r in swept] == [sorted(_without_timing(r)) for r in bench]
    for a, b in zip(swept, bench):
        for key, value in _without_timing(a).items():
            if isinstance(value, float):
                assert math.isclose(value, b[key], rel_tol=1e-9, abs_tol=1e-12), (a["method"], key, value, b[key])
            else:
                assert value == b[key], (a["method"], key, value, b[key])


def test_sweep_rows_equal_bench_on_the_same_seeds(tiny_checkpoint, ray_session, tmp_path, capsys):
    spec = write_spec(tmp_path / "sweep.yaml", tiny_checkpoint)
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    # The bench as the cells run it: waves of num_envs = 2, one torch thread (cpus_per_cell = 1).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["bench", "--task", "pusht", "--checkpoint", str(tiny_checkpoint), "--methods", "ddim:2,step:2",
                     "--episodes", "4", "--num-envs", "2", "--max-steps", "20", "--latency-calls", "3",
                     "--out", str(tmp_path / "bench")]) == 0
    finally:
        torch.set_num_threads(threads)
    swept, bench = _report(out / "pusht"), _report(tmp_path / "bench")
    _assert_same_rows(swept["rows"], bench["rows"])
    assert [r["episodes"] for r in swept["rows"]] == [4, 4]
    assert set(swept) == set(bench) and set(swept["rows"][0]) == set(bench["rows"][0])
    assert {k: v for k, v in swept["config"].items() if k != "out"} == {k: v for k, v in bench["config"].items() if k != "out"}
    # The Markdown tables agree in every column that is not a timing.
    def untimed(folder):
        lines = (folder / "results.md").read_text().splitlines()
        return [line.split(" | ")[:4] for line in lines if line.startswith("| ")]
    assert untimed(out / "pusht") == untimed(tmp_path / "bench")
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["cells"], summary["ran"], summary["skipped"], summary["failed"]) == (6, 6, 0, [])
    assert summary["cluster"]["CPU"] == 2
    # `step table` reads the merged folder as it reads a bench folder.
    capsys.readouterr()
    assert main(["table", str(out / "pusht"), str(tmp_path / "bench")]) == 0
    assert "| Method | Step | pusht success | pusht ms | pusht success | pusht ms |" in capsys.readouterr().out


def test_killed_driver_resumes_without_recomputing(tiny_checkpoint, ray_session, tmp_path):
    spec = write_spec(tmp_path / "sweep.yaml", tiny_checkpoint)
    out = tmp_path / "sweep"
    # The driver (its own embedded local Ray) is SIGKILLed right after writing its first cell file.
    env = dict(os.environ, STEP_FAULT="sweep-cell:1")
    killed = subprocess.run([sys.executable, "-m", "agents.cli", "sweep", str(spec), "--out", str(out), "--num-cpus", "2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    files = sorted((out / "cells").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["status"] == "ok"
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    assert not (out / "pusht" / "results.json").exists()

    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["skipped"], summary["ran"], summary["failed"]) == (1, 5, [])
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before  # not recomputed, not rewritten
    assert len(list((out / "cells").glob("*.json"))) == 6
    rows = _report(out / "pusht")["rows"]
    assert [(r["method"], r["steps"], r["episodes"], r["seed_start"]) for r in rows] == [("ddim", 2, 4, 0), ("step", 2, 4, 0)]

    # Complete: a third run recomputes nothing and writes the same rows.
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["skipped"], summary["ran"]) == (6, 0)
    assert _report(out / "pusht")["rows"] == rows


def test_a_failing_cell_is_reported_and_the_others_finish(tiny_checkpoint, ray_session, tmp_path, capsys):
    no_predictor = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, no_predictor, ignore=shutil.ignore_patterns("predictor"))
    spec = write_spec(tmp_path / "sweep.yaml", no_predictor)  # step:2 needs the predictor: its cells raise
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    summary = json.loads((out / "sweep.json").read_text())
    assert sorted(f["cell"] for f in summary["failed"]) == [
        "pusht.default.step-2.seeds0-1", "pusht.default.step-2.seeds2-3", "pusht.latency.step-2"]
    assert all("STEP needs" in f["error"] for f in summary["failed"]) and "failed pusht.latency.step-2" in printed
    assert summary["incomplete"] == ["pusht/default/step:2"]
    failed_file = json.loads((out / "cells" / "pusht.latency.step-2.json").read_text())
    assert failed_file["status"] == "failed" and "Traceback" in failed_file["traceback"]
    rows = _report(out / "pusht")["rows"]  # the methods whose cells all finished
    assert [(r["method"], r["episodes"]) for r in rows] == [("ddim", 4)]
    # A re-run retries only the failed cells.
    assert main(["sweep", str(spec), "--out", str(out)]) == 1
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["skipped"], summary["ran"], len(summary["failed"])) == (3, 3, 3)


def test_unreachable_cluster_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    spec = write_spec(tmp_path / "sweep.yaml", tiny_checkpoint)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--address", "127.0.0.1:1"]) == 2
    assert "No Ray cluster answers at 127.0.0.1:1" in capsys.readouterr().err
