"""``step cost --task pusht [--checkpoint DIR] [--results results/pusht] [--out DIR]`` (agents/cost.py)"""

from __future__ import annotations

from agents.config_files import add_config_arguments, config_from_args
from agents.cost import CostConfig, run_cost


def add_arguments(parser) -> None:
    add_config_arguments(parser, CostConfig)


def run(args) -> int:
    cfg = config_from_args(CostConfig, args)
    print(run_cost(cfg)["table"])
    if cfg.out:
        print(f"wrote {cfg.out}/cost.json, cost.md, cost.png")
    return 0
