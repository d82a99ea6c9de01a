"""``step train-predictor --policy CKPT --dataset DIR [--out PRED_CKPT] [--config FILE]``"""

from __future__ import annotations

import json

from agents.config_files import build_config
from agents.training import TrainPredictorConfig, train_predictor

OPTIONS = {
    "policy": str, "dataset": str, "out": str, "steps": int, "batch_size": int, "lr": float,
    "val_fraction": float, "prev_source": str, "seed": int, "threads": int, "precision": str,
}


def add_arguments(parser) -> None:
    d = TrainPredictorConfig(policy="", dataset="")
    parser.add_argument("--config", default=None, help="YAML file of TrainPredictorConfig fields (see configs/)")
    help_text = {
        "policy": "policy checkpoint (step train-policy --out)",
        "out": "predictor folder (default <policy>/predictor)",
        "prev_source": "previous chunk: 'dataset' (demo window Ta steps earlier) or 'policy' (backbone's own chunk there)",
        "threads": "torch CPU threads (0: every core)",
        "precision": "auto | bf16 | fp32 (auto: fp32, the predictor is small)",
    }
    for name, kind in OPTIONS.items():
        default = getattr(d, name) if name not in ("policy", "dataset") else "required"
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"{help_text.get(name, '')} (default: {default})".strip())
    parser.add_argument("--no-ablation", action="store_true", help="skip the spatial-only predictor")


def run(args) -> int:
    overrides = {name: getattr(args, name) for name in OPTIONS}
    if args.no_ablation:
        overrides["ablation"] = False
    cfg = build_config(TrainPredictorConfig, args.config, **overrides)
    if cfg.prev_source not in ("dataset", "policy"):
        raise ValueError("prev_source must be 'dataset' or 'policy'")
    print(json.dumps(train_predictor(cfg), indent=2))
    return 0
