"""``step latency --task pusht --methods ddpm:100,ddim:2,step:2 [--checkpoint CKPT] [--json FILE]``"""

from __future__ import annotations

import json
from pathlib import Path

from agents.config_files import check_minimums
from agents.latency import LatencyConfig, default_backbone, fresh_predictor, markdown_table, measure_latency


def add_arguments(parser) -> None:
    d = LatencyConfig()
    parser.add_argument("--task", default="pusht")
    parser.add_argument("--methods", default=",".join(d.methods), help="comma-separated specs, e.g. ddim:2,step:2")
    parser.add_argument("--checkpoint", default=None, help="policy checkpoint; default: a fresh untrained backbone")
    parser.add_argument("--predictor", default=None, help="predictor checkpoint (default <checkpoint>/predictor)")
    parser.add_argument("--preset", default="pusht_state", help="backbone preset when no checkpoint is given")
    parser.add_argument("--calls", type=int, default=d.calls, help="timed calls per method (>= 50 for reports)")
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (fixed for the whole run)")
    parser.add_argument("--json", default=None, help="write the rows here")


def run(args) -> int:
    from agents.checkpoint import find_predictor, load_policy, load_predictor
    from step_envs.registry import make_env

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods:
        raise ValueError("--methods is empty")
    check_minimums(args, calls=1, warmup=0, threads=1)
    note = None
    if args.checkpoint:
        backbone, config = load_policy(args.checkpoint, task=args.task)
        env = make_env(args.task, obs_type=config["obs_type"])
        action_space = env.action_space
        env.close()
    else:
        backbone, action_space = default_backbone(args.task, args.preset)
        note = f"untrained {args.preset} backbone (timing only)"
    predictor = None
    if any(m.split(":")[0].strip().lower() == "step" for m in methods):
        path = args.predictor or (find_predictor(args.checkpoint) if args.checkpoint else None)
        if path:
            predictor, _ = load_predictor(path, backbone)
        else:
            predictor = fresh_predictor(backbone)
            note = (note + "; " if note else "") + "untrained predictor (timing only)"
    cfg = LatencyConfig(methods=methods, calls=args.calls, warmup=args.warmup, threads=args.threads)
    rows = measure_latency(backbone, predictor, cfg, action_space)
    print(markdown_table(rows))
    if note:
        print(f"note: {note}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"task": args.task, "threads": args.threads, "calls": args.calls,
                                               "note": note, "rows": rows}, indent=2))
    return 0
