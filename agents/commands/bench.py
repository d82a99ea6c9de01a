"""``step bench --task pusht [--methods ...] [--episodes 50] [--seed-start S] [--out DIR]``"""

from __future__ import annotations

from agents.bench import BenchConfig, markdown_table, run_bench
from agents.config_files import add_config_arguments, config_from_args


def add_arguments(parser) -> None:
    add_config_arguments(parser, BenchConfig)


def run(args) -> int:
    cfg = config_from_args(BenchConfig, args)
    print(markdown_table(run_bench(cfg)))
    print(f"wrote {cfg.out}/results.json, results.md, pareto.png")
    return 0
