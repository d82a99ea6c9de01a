import json

import pytest

from agents.cli import main


def test_latency_command_on_tiny_checkpoint(tiny_checkpoint, tmp_path):
    """Every method spec through make_agent, the ablation variants and the predictor alone included."""
    out = tmp_path / "lat.json"
    rc = main(["latency", "--checkpoint", str(tiny_checkpoint), "--methods",
               "ddim:2,dpmsolver:2,step-spatial:2,step-temporal:2,step:2,step:0",
               "--calls", "3", "--warmup", "1", "--nfe-calls", "3", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["note"] is None and report["calls"] == 3 and report["threads"] == 1
    rows = report["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [
        ("ddim", 2), ("dpmsolver", 2), ("step-spatial", 2), ("step-temporal", 2), ("step", 2), ("step", 0)]
    for r in rows:
        assert set(r) == {"method", "steps", "runtime", "latency_ms", "nfe_ms_median", "nfe_per_replan",
                          "actions_per_replan", "ms_per_action", "ratio"}
        assert r["runtime"] == "torch"  # the default --runtime
        assert 0 < r["latency_ms"]["median"] <= r["latency_ms"]["p90"] and r["nfe_ms_median"] > 0
        # ratio = chunk time / (steps x one NFE); step:0 runs no NFE and is counted in units of one
        assert r["ratio"] == pytest.approx(r["latency_ms"]["median"] / (max(r["steps"], 1) * r["nfe_ms_median"]))


def test_latency_untrained_default_backbone(tmp_path):
    from agents.latency import LatencyConfig, default_backbone, fresh_predictor, measure_latency

    backbone, space = default_backbone(preset="tiny")
    rows = measure_latency(backbone, fresh_predictor(backbone),
                           LatencyConfig(methods=("step:2", "ddpm"), calls=2, warmup=1, nfe_calls=3), space)
    assert [(r["method"], r["steps"]) for r in rows] == [("step", 2), ("ddpm", 100)]
    assert rows[1]["ratio"] == pytest.approx(rows[1]["latency_ms"]["median"] / (100 * rows[1]["nfe_ms_median"]))
