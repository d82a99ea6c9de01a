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
        assert set(r) == {"method", "steps", "runtime", "latency_ms", "nfe_ms_median", "encode_ms_median",
                          "nfe_per_replan", "actions_per_replan", "ms_per_action", "ratio", "ratio_with_encode"}
        assert r["runtime"] == "torch"  # the default --runtime
        assert 0 < r["latency_ms"]["median"] <= r["latency_ms"]["p90"] and r["nfe_ms_median"] > 0
        # ratio = chunk time / (steps x one NFE); step:0 runs no NFE and is counted in units of one
        assert r["ratio"] == pytest.approx(r["latency_ms"]["median"] / (max(r["steps"], 1) * r["nfe_ms_median"]))
        assert r["ratio_with_encode"] == pytest.approx(
            r["latency_ms"]["median"] / (r["encode_ms_median"] + max(r["steps"], 1) * r["nfe_ms_median"]))


def test_latency_untrained_default_backbone(tmp_path):
    from agents.latency import LatencyConfig, default_backbone, fresh_predictor, measure_latency

    backbone, space = default_backbone(preset="tiny")
    rows = measure_latency(backbone, fresh_predictor(backbone),
                           LatencyConfig(methods=("step:2", "ddpm"), calls=2, warmup=1, nfe_calls=3), space)
    assert [(r["method"], r["steps"]) for r in rows] == [("step", 2), ("ddpm", 100)]
    assert rows[1]["ratio"] == pytest.approx(rows[1]["latency_ms"]["median"] / (100 * rows[1]["nfe_ms_median"]))


def test_image_encoder_runs_once_per_replan_and_is_timed():
    """An image policy's encoder (the costly part of its global condition) runs once per chunk, never once per
    denoising step, for every sampler; `step latency` times it beside the NFE."""
    import dataclasses

    import gymnasium as gym
    import numpy as np
    import torch

    from agents.backbone import PRESETS, Backbone, FeatureSpec
    from agents.factory import make_agent
    from agents.latency import LatencyConfig, _random_history, fresh_predictor, measure_latency

    torch.manual_seed(0)
    backbone = Backbone(dataclasses.replace(PRESETS["tiny"], crop_shape=(24, 24)),
                        FeatureSpec(state_dim=2, action_dim=2, cameras={"top": [32, 32, 3]})).eval()
    predictor = fresh_predictor(backbone)
    space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    spaces = type("Spaces", (), {"observation_space": None, "action_space": space})()
    history = _random_history(backbone, torch.Generator().manual_seed(0))
    encodes, nfes = [0], [0]
    original = backbone.global_cond
    backbone.global_cond = lambda h: (encodes.__setitem__(0, encodes[0] + 1), original(h))[1]
    hook = backbone.model.unet.register_forward_hook(lambda *_: nfes.__setitem__(0, nfes[0] + 1))
    try:
        for spec, steps in (("ddim:4", 4), ("dpmsolver:2", 2), ("step:2", 2), ("ddpm", 100)):
            agent = make_agent(spec, spaces, backbone=backbone, predictor_model=predictor)
            for _ in range(2):  # STEP's second call warm-starts from the first's chunk
                encodes[0] = nfes[0] = 0
                agent.chunk(history)
                assert (encodes[0], nfes[0]) == (1, steps), spec
    finally:
        hook.remove()
        backbone.global_cond = original
    rows = measure_latency(backbone, predictor, LatencyConfig(methods=("step:2",), calls=2, warmup=1, nfe_calls=2), space)
    assert rows[0]["encode_ms_median"] > 0
