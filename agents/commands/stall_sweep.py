"""``step stall-sweep --task so101-pickplace-sim --checkpoint CKPT [--sigmas 0.2,0.5,1.0] [--episodes 20]
[--env-kwargs '{"servo": "lerobot"}']``"""

from __future__ import annotations

from agents.commands.evaluate import parse_env_kwargs
from agents.config_files import check_minimums
from agents.stall_sweep import StallSweepConfig, markdown_table, run_stall_sweep


def add_arguments(parser) -> None:
    d = StallSweepConfig()
    parser.add_argument("--task", default=d.task)
    parser.add_argument("--checkpoint", required=True, help="policy checkpoint with a predictor in <ckpt>/predictor")
    parser.add_argument("--method", default=d.method, help="a STEP spec, e.g. step:2")
    parser.add_argument("--sigmas", default=",".join(f"{s:g}" for s in d.sigmas))
    parser.add_argument("--lam-stall", type=float, default=d.lam_stall)
    parser.add_argument("--eps", type=float, default=d.eps)
    parser.add_argument("--episodes", type=int, default=d.episodes)
    parser.add_argument("--seed-start", type=int, default=d.seed_start)
    parser.add_argument("--num-envs", type=int, default=d.num_envs)
    parser.add_argument("--out", default=d.out)
    parser.add_argument("--max-steps", type=int, default=None, help="cap episodes (smoke runs; not for reports)")
    parser.add_argument("--env-kwargs", default=None,
                        help='env keyword arguments as JSON, e.g. \'{"servo": "lerobot", "dead_band_deg": 1.0}\'')
    parser.add_argument("--freeze-tol", type=float, default=d.freeze_tol,
                        help="agent_pos change per step below which the robot counts as frozen (env units)")
    parser.add_argument("--freeze-steps", type=int, default=d.freeze_steps, help="steps without motion that make a freeze")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads")


def run(args) -> int:
    if not args.method.startswith("step"):
        raise ValueError("--method must be a STEP spec (the perturbation belongs to STEP's warm start)")
    try:
        sigmas = tuple(float(s) for s in args.sigmas.split(",") if s.strip())
    except ValueError as err:
        raise ValueError(f"--sigmas must be comma-separated numbers: {err}") from err
    check_minimums(args, episodes=1, num_envs=1, max_steps=1, freeze_steps=1, threads=1)
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    cfg = StallSweepConfig(task=args.task, checkpoint=args.checkpoint, method=args.method, sigmas=sigmas,
                           lam_stall=args.lam_stall, eps=args.eps, episodes=args.episodes,
                           seed_start=args.seed_start, num_envs=args.num_envs, out=args.out,
                           max_steps=args.max_steps, env_kwargs=env_kwargs, freeze_tol=args.freeze_tol,
                           freeze_steps=args.freeze_steps, threads=args.threads)
    print(markdown_table(run_stall_sweep(cfg)))
    return 0
