"""``step train-predictor --policy CKPT --dataset DIR [--out PRED_CKPT]``"""

from __future__ import annotations

import json

from agents.training import TrainPredictorConfig, train_predictor


def add_arguments(parser) -> None:
    d = TrainPredictorConfig(policy="", dataset="")
    parser.add_argument("--policy", required=True, help="policy checkpoint (step train-policy --out)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", default=None, help="predictor folder (default <policy>/predictor)")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction)
    parser.add_argument("--prev-source", default=d.prev_source, choices=["dataset", "policy"],
                        help="previous chunk: demo window Ta steps earlier, or the backbone's own chunk there")
    parser.add_argument("--no-ablation", action="store_true", help="skip the spatial-only predictor")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")


def run(args) -> int:
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be positive")
    cfg = TrainPredictorConfig(
        policy=args.policy, dataset=args.dataset, out=args.out, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, val_fraction=args.val_fraction, prev_source=args.prev_source, ablation=not args.no_ablation,
        seed=args.seed, threads=args.threads,
    )
    print(json.dumps(train_predictor(cfg), indent=2))
    return 0
