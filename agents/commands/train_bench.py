"""``step train-bench --task pusht [--obs-type state|pixels] [--json FILE]``"""

from __future__ import annotations

from agents.train_bench import TrainBenchConfig, markdown, run_train_bench, write_results


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def add_arguments(parser) -> None:
    d = TrainBenchConfig()
    parser.add_argument("--task", default=d.task)
    parser.add_argument("--obs-type", default=d.obs_type, choices=["state", "pixels"])
    parser.add_argument("--preset", default=None, help="backbone preset (default: state, or pusht_image for pixels)")
    parser.add_argument("--precisions", default=",".join(d.precisions), help="comma list of fp32,bf16")
    parser.add_argument("--threads", default=",".join(map(str, d.threads)), help="comma list; 0 = every core")
    parser.add_argument("--batch-sizes", default=",".join(map(str, d.batch_sizes)), help="comma list")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed optimizer steps per setting")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps before timing each setting")
    parser.add_argument("--dataset", default=None, help="time on real windows of this dataset (default: synthetic)")
    parser.add_argument("--config", default=None, help="training config to mark (default configs/<task>_<obs>_policy.yaml)")
    parser.add_argument("--channels-last", action="store_true", help="image encoder in NHWC memory format")
    parser.add_argument("--json", default=None, help="write JSON here, with .md and .png beside it")


def run(args) -> int:
    cfg = TrainBenchConfig(
        task=args.task, obs_type=args.obs_type, preset=args.preset, precisions=tuple(args.precisions.split(",")),
        threads=_ints(args.threads), batch_sizes=_ints(args.batch_sizes), steps=args.steps, warmup=args.warmup,
        dataset=args.dataset, config=args.config, channels_last=args.channels_last,
    )
    result = run_train_bench(cfg)
    print(markdown(result))
    if args.json:
        write_results(result, args.json)
        print(f"wrote {args.json} (+ .md, .png)")
    return 0
