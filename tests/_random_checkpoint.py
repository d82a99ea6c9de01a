"""An untrained tiny Push-T state policy + predictor saved as a checkpoint, without training (fast, and
independent of the training code): tests that compare two runtimes or two APIs need the same weights,
not good ones."""

from __future__ import annotations

from pathlib import Path

import torch


def make_random_checkpoint(out: Path) -> Path:
    from agents.backbone import PRESETS, Backbone
    from agents.checkpoint import features_from_spaces, save_policy, save_predictor
    from agents.latency import fresh_predictor
    from step_envs.registry import make_env

    env = make_env("pusht", obs_type="state")
    torch.manual_seed(0)
    backbone = Backbone(PRESETS["tiny"], features_from_spaces(env.observation_space, env.action_space))
    env.close()
    norm = backbone.normalizer
    norm.state_min.fill_(20.0), norm.state_max.fill_(490.0), norm.action_min.fill_(15.0), norm.action_max.fill_(495.0)
    norm.env_min.fill_(0.0), norm.env_max.fill_(512.0)
    predictor = fresh_predictor(backbone)
    with torch.no_grad():  # the head starts at zero (predictor = shifted previous chunk); make it matter
        predictor.head.weight.normal_(0, 0.1)
    save_policy(out, backbone.eval(), task="pusht", obs_type="state")
    save_predictor(out / "predictor", predictor, backbone)
    return out
