"""``step collect --task pusht --episodes N --out DIR``"""

from __future__ import annotations

import json

from step_envs.collect import CollectConfig, collect


def add_arguments(parser) -> None:
    defaults = CollectConfig()
    parser.add_argument("--task", default=defaults.task)
    parser.add_argument("--agent", default=defaults.agent, help="expert (default) or random (test data)")
    parser.add_argument("--episodes", type=int, default=defaults.episodes, help="good episodes to keep")
    parser.add_argument("--out", required=True, help="output folder (raw/ episode cache + lerobot/ dataset)")
    parser.add_argument("--obs-type", default=defaults.obs_type, choices=["state", "pixels", "pixels_state"])
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--seed-start", type=int, default=defaults.seed_start)
    parser.add_argument("--max-seeds", type=int, default=defaults.max_seeds)
    parser.add_argument("--min-max-reward", type=float, default=defaults.min_max_reward,
                        help="keep an episode whose best reward reaches this")


def run(args) -> int:
    cfg = CollectConfig(
        task=args.task, agent=args.agent, episodes=args.episodes, out=args.out, obs_type=args.obs_type, workers=args.workers,
        seed_start=args.seed_start, max_seeds=args.max_seeds, min_max_reward=args.min_max_reward,
    )
    report = collect(cfg)
    print(json.dumps(report, indent=2))
    return 0
