"""``step train-policy --task pusht --dataset DIR --out CKPT [--config configs/pusht_state_policy.yaml]``"""

from __future__ import annotations

import json

from agents.config_files import build_config
from agents.training import TrainPolicyConfig, train_policy

# option -> TrainPolicyConfig field; every option defaults to None so only given ones override the file
OPTIONS = {
    "task": str, "dataset": str, "out": str, "preset": str, "obs_type": str, "steps": int, "stop_at": int, "batch_size": int,
    "lr": float, "warmup_steps": int, "save_every": int, "eval_every": int, "eval_episodes": int,
    "eval_method": str, "seed": int, "threads": int, "precision": str,
}


def add_arguments(parser) -> None:
    d = TrainPolicyConfig(dataset="", out="")
    parser.add_argument("--config", default=None, help="YAML file of TrainPolicyConfig fields (see configs/)")
    help_text = {
        "dataset": "LeRobotDataset root or `step collect` folder",
        "out": "checkpoint folder (resumes if it holds a run)",
        "preset": "backbone size: state (= pusht_state), pusht_image, tiny",
        "eval_every": "0: no periodic rollouts",
        "stop_at": "stop (and save) at this step; rerun to resume towards --steps",
        "threads": "torch CPU threads (0: every core)",
        "precision": "auto | bf16 | fp32 (auto: bf16 for image encoders on a CPU with native bf16)",
    }
    for name, kind in OPTIONS.items():
        default = getattr(d, name) if name not in ("dataset", "out") else "required"
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"{help_text.get(name, '')} (default: {default})".strip())


def run(args) -> int:
    cfg = build_config(TrainPolicyConfig, args.config, **{name: getattr(args, name) for name in OPTIONS})
    if cfg.obs_type not in ("state", "pixels"):
        raise ValueError("obs_type must be 'state' or 'pixels'")
    print(json.dumps(train_policy(cfg), indent=2))
    return 0
