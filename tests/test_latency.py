import json

from agents.cli import main


def test_latency_command_on_tiny_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "lat.json"
    rc = main(["latency", "--checkpoint", str(tiny_checkpoint), "--methods", "ddim:2,dpmsolver:2,step:2",
               "--calls", "3", "--warmup", "1", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["ddim", "dpmsolver", "step"]
    for r in rows:
        assert r["steps"] == 2 and r["latency_ms"]["median"] > 0 and r["latency_ms"]["p90"] >= r["latency_ms"]["median"]
        assert r["nfe_ms_median"] > 0 and r["ratio"] > 0


def test_latency_untrained_default_backbone(tmp_path):
    from agents.latency import LatencyConfig, default_backbone, fresh_predictor, measure_latency

    backbone, space = default_backbone(preset="tiny")
    rows = measure_latency(backbone, fresh_predictor(backbone),
                           LatencyConfig(methods=("step:2",), calls=2, warmup=1, nfe_calls=3), space)
    assert rows[0]["method"] == "step"
