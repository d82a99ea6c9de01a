"""``step stall-sweep --task so101-pickplace-sim --checkpoint CKPT [--sigmas 0.2,0.5,1.0] [--episodes 20]
[--env-kwargs '{"servo": "lerobot"}']``"""

from __future__ import annotations

from agents.config_files import add_config_arguments, config_from_args
from agents.stall_sweep import StallSweepConfig, markdown_table, run_stall_sweep


def add_arguments(parser) -> None:
    add_config_arguments(parser, StallSweepConfig)


def run(args) -> int:
    print(markdown_table(run_stall_sweep(config_from_args(StallSweepConfig, args))))
    return 0
