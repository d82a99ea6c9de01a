"""`step curves`: the knee, the Wilson intervals, the files it writes and its errors on bad logs."""

import json

import pytest

from agents.cli import main
from agents.curves import CurvesConfig, knee_step, run_curves


def _write_run(folder, evals, losses=((50, 1.0, 10.0), (1000, 0.1, 200.0), (2000, 0.05, 400.0), (3000, 0.04, 600.0))):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loss.jsonl").write_text("".join(json.dumps({"step": s, "loss": v, "seconds": t}) + "\n"
                                               for s, v, t in losses))
    (folder / "eval.jsonl").write_text("".join(json.dumps({"step": s, "episodes": n, "success_rate": r}) + "\n"
                                               for s, n, r in evals))
    (folder / "train_config.json").write_text(json.dumps({"eval_seed_start": 900000, "init_from": None}))
    return folder


def test_knee_is_the_first_step_within_tolerance_of_the_best():
    evals = [{"step": 1000, "success_rate": 0.2}, {"step": 2000, "success_rate": 0.7},
             {"step": 3000, "success_rate": 0.8}, {"step": 4000, "success_rate": 0.75}]
    assert knee_step(evals, 0.1) == 2000
    assert knee_step(evals, 0.0) == 3000
    assert knee_step(evals, 1.0) == 1000
    assert knee_step([], 0.1) is None


def test_curves_report_intervals_losses_and_files(tmp_path):
    run = _write_run(tmp_path / "run", [(1000, 10, 0.0), (2000, 10, 0.5), (3000, 10, 0.6)])
    report = run_curves(CurvesConfig(runs=(str(run),), out=str(tmp_path / "out")))
    curve = report["runs"][0]
    assert curve["knee_step"] == 2000 and curve["last_step"] == 3000 and curve["wall_seconds"] == 600.0
    first, second = curve["evals"][0], curve["evals"][1]
    assert first["ci95"][0] == 0.0 and 0.25 < first["ci95"][1] < 0.32  # 0/10: Wilson upper bound 0.28
    assert first["ci95"][0] <= first["success_rate"] <= first["ci95"][1]
    assert second["loss"] == 0.05 and second["seconds"] == 400.0  # the loss record at the evaluated step
    assert "seeds 900000-900009" in report["table"]
    for name in ("curves.json", "curves.md", "curves.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "curves.json").read_text())["runs"][0]["knee_step"] == 2000


def test_curves_refuse_a_folder_without_logs_and_a_corrupt_record(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["curves", str(tmp_path / "empty")]) == 2
    assert "no loss.jsonl" in capsys.readouterr().err
    run = _write_run(tmp_path / "run", [(1000, 10, 0.3)])
    with open(run / "eval.jsonl", "a") as f:
        f.write('{"step": 2000, "episodes": 10, "succ')  # a record a running training is still writing
    assert [p["step"] for p in run_curves(CurvesConfig(runs=(str(run),)))["runs"][0]["evals"]] == [1000]
    with open(run / "eval.jsonl", "a") as f:
        f.write("\n")  # ... and the same torn record once other lines follow it: corrupt, said so
    with pytest.raises(ValueError, match=r"eval.jsonl:2 is not a JSON record"):
        run_curves(CurvesConfig(runs=(str(run),)))
