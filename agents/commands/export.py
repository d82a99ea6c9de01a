"""``step export --checkpoint runs/lift_state --out checkpoints/lift [--float32] [--overwrite]``"""

from __future__ import annotations

import json

from agents.checkpoint import export_checkpoint


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a `step train-policy` folder (with its predictor/)")
    parser.add_argument("--out", required=True, help="release folder, e.g. checkpoints/<task>")
    parser.add_argument("--float32", action="store_true", help="keep float32 weights (default: float16 storage)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    report = export_checkpoint(args.checkpoint, args.out, half=not args.float32, overwrite=args.overwrite)
    print(json.dumps(report, indent=2))
    return 0
