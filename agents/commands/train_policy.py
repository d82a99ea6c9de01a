"""``step train-policy --task pusht --dataset DIR --out CKPT [--steps N] [--batch-size B]``"""

from __future__ import annotations

import json

from agents.training import TrainPolicyConfig, train_policy


def add_arguments(parser) -> None:
    d = TrainPolicyConfig(dataset="", out="")
    parser.add_argument("--task", default=d.task)
    parser.add_argument("--dataset", required=True, help="LeRobotDataset root or `step collect` folder")
    parser.add_argument("--out", required=True, help="checkpoint folder (resumes if it holds a run)")
    parser.add_argument("--preset", default=d.preset, help="backbone size: pusht_state, pusht_image, tiny")
    parser.add_argument("--obs-type", default=d.obs_type, choices=["state", "pixels"])
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--save-every", type=int, default=d.save_every)
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="0: no periodic rollouts")
    parser.add_argument("--eval-episodes", type=int, default=d.eval_episodes)
    parser.add_argument("--eval-method", default=d.eval_method)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")


def run(args) -> int:
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be positive")
    cfg = TrainPolicyConfig(
        dataset=args.dataset, out=args.out, task=args.task, preset=args.preset, obs_type=args.obs_type,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        save_every=args.save_every, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
        eval_method=args.eval_method, seed=args.seed, threads=args.threads,
    )
    print(json.dumps(train_policy(cfg), indent=2))
    return 0
