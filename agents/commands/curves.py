"""``step curves RUN [RUN ...] [--out DIR] [--knee-tolerance 0.1]`` (agents/curves.py)"""

from __future__ import annotations

from agents.config_files import add_config_arguments, config_from_args
from agents.curves import CurvesConfig, run_curves


def add_arguments(parser) -> None:
    add_config_arguments(parser, CurvesConfig)


def run(args) -> int:
    cfg = config_from_args(CurvesConfig, args)
    print(run_curves(cfg)["table"])
    if cfg.out:
        print(f"wrote {cfg.out}/curves.json, curves.md, curves.png")
    return 0
