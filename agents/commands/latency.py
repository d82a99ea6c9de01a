"""``step latency --task pusht --methods ddpm:100,ddim:2,step:2 [--checkpoint CKPT] [--json FILE]``"""

from __future__ import annotations

import json
from pathlib import Path

from agents.config_files import add_config_arguments, config_from_args
from agents.latency import LatencyConfig, default_backbone, fresh_predictor, markdown_table, measure_latency, runtime_comparison


def add_arguments(parser) -> None:
    add_config_arguments(parser, LatencyConfig)


def run(args) -> int:
    from agents.checkpoint import default_checkpoint, find_predictor, load_policy, load_predictor
    from agents.factory import needs_predictor
    from step_envs.registry import make_env

    cfg = config_from_args(LatencyConfig, args)
    note = None
    checkpoint = cfg.checkpoint
    if checkpoint is None and cfg.preset is None:  # the task's committed checkpoint (trained weights), as `step bench`
        try:
            checkpoint = str(default_checkpoint(cfg.task))
        except FileNotFoundError:
            checkpoint = None
    if checkpoint:
        backbone, config = load_policy(checkpoint, task=cfg.task)
        env = make_env(cfg.task, obs_type=config["obs_type"])
        action_space = env.action_space
        env.close()
    else:
        preset = cfg.preset or "pusht_state"
        backbone, action_space = default_backbone(cfg.task, preset)
        note = f"untrained {preset} backbone (timing only)"
    predictor = None
    if any(needs_predictor(m) for m in cfg.methods):  # step, step-spatial, step:0 (not step-temporal)
        path = cfg.predictor or (find_predictor(checkpoint) if checkpoint else None)
        if path:
            predictor, _ = load_predictor(path, backbone)
        else:
            predictor = fresh_predictor(backbone)
            note = (note + "; " if note else "") + "untrained predictor (timing only)"
    rows = measure_latency(backbone, predictor, cfg, action_space)
    print(markdown_table(rows))
    if note:
        print(f"note: {note}")
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps({"task": cfg.task, "checkpoint": checkpoint, "threads": cfg.threads,
                                              "calls": cfg.calls,
                                              "runtimes": list(cfg.runtime), "note": note, "rows": rows,
                                              "runtime_comparison": runtime_comparison(rows)}, indent=2))
    return 0
