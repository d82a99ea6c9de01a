"""``step bench --task pusht [--methods ...] [--episodes 50] [--seed-start S] [--out DIR]``"""

from __future__ import annotations

from agents.bench import BenchConfig, run_bench
from agents.config_files import check_minimums


def add_arguments(parser) -> None:
    d = BenchConfig()
    parser.add_argument("--task", default=d.task)
    parser.add_argument("--methods", default=",".join(d.methods), help="comma-separated method specs")
    parser.add_argument("--episodes", type=int, default=d.episodes)
    parser.add_argument("--seed-start", type=int, default=d.seed_start)
    parser.add_argument("--num-envs", type=int, default=d.num_envs, help="envs batched per wave")
    parser.add_argument("--checkpoint", default=None, help="policy checkpoint (default: the committed checkpoints/<task>)")
    parser.add_argument("--out", default=None, help="output folder (default results/<task>)")
    parser.add_argument("--latency-calls", type=int, default=d.latency_calls)
    parser.add_argument("--max-steps", type=int, default=None, help="cap episodes (smoke runs; not for reports)")
    parser.add_argument("--latency-threads", type=int, default=d.latency_threads)
    parser.add_argument("--latency-only", action="store_true",
                        help="keep the success rows of OUT/results.json and re-measure only the latency")


def run(args) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods:
        raise ValueError("--methods is empty")
    check_minimums(args, episodes=1, num_envs=1, latency_calls=1, latency_threads=1, max_steps=1)
    cfg = BenchConfig(task=args.task, methods=methods, episodes=args.episodes, seed_start=args.seed_start,
                      num_envs=args.num_envs, checkpoint=args.checkpoint, out=args.out or f"results/{args.task}",
                      latency_calls=args.latency_calls, latency_threads=args.latency_threads, max_steps=args.max_steps,
                      latency_only=args.latency_only)
    report = run_bench(cfg)
    from agents.bench import markdown_table

    print(markdown_table(report))
    print(f"wrote {cfg.out}/results.json, results.md, pareto.png")
    return 0
