"""``step train-bench --task pusht [--obs-type state|pixels] [--json FILE]``"""

from __future__ import annotations

from agents.config_files import add_config_arguments, config_from_args
from agents.train_bench import TrainBenchConfig, markdown, run_train_bench, write_results


def add_arguments(parser) -> None:
    add_config_arguments(parser, TrainBenchConfig)


def run(args) -> int:
    cfg = config_from_args(TrainBenchConfig, args)
    result = run_train_bench(cfg)
    print(markdown(result))
    if cfg.json:
        write_results(result, cfg.json)
        print(f"wrote {cfg.json} (+ .md, .png)")
    return 0
