"""The ``step`` command line. Each sub-command lives in its own module with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module implementing it (imported only when that command runs, so `step --help` is fast)
COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("agents.commands.collect", "make demonstrations with a scripted expert (LeRobotDataset)"),
    "eval": ("agents.commands.evaluate", "evaluate an agent on seeded episodes, with videos"),
    "record": ("agents.commands.record", "record SO-101 demonstrations (leader arm or expert) to LeRobotDataset"),
    "import-robomimic": ("agents.commands.import_robomimic", "import a RoboMimic hdf5 dataset as a LeRobotDataset"),
    "train-policy": ("agents.commands.train_policy", "train the diffusion backbone (resumable, EMA, rollout score)"),
    "train-predictor": ("agents.commands.train_predictor", "train STEP's predictor on truly shifted chunk pairs"),
    "train-baseline": ("agents.commands.train_baseline", "the trained few-step peers from the DDPM backbone: "
                                                         "Consistency Policy (cp:k), OneDP (onedp), BRIDGeR (bridger:k)"),
    "train-bench": ("agents.commands.train_bench", "training samples/s over precision x threads x batch size"),
    "export": ("agents.commands.export", "copy a trained policy + predictor, or a train-baseline student, "
                                           "to a small release folder (float16)"),
    "cost": ("agents.commands.cost", "training cost (params, steps, core-hours) vs success of STEP and its trained peers"),
    "curves": ("agents.commands.curves", "training curves: rollout score with its interval, loss, and the knee"),
    "bench": ("agents.commands.bench", "every method on the same seeds: success, latency, Pareto plot"),
    "table": ("agents.commands.table", "several tasks' bench results side by side (Table 2/3) + Pareto panels"),
    "sweep": ("agents.commands.sweep", "bench cells (task x method x seed block x setting) on Ray, resumable, merged"),
    "stall-sweep": ("agents.commands.stall_sweep", "STEP with and without the stall perturbation, over sigma"),
    "latency": ("agents.commands.latency", "batch-1 chunk latency per method beside the one-NFE time"),
    "analyze": ("agents.commands.analyze", "the paper's Appendix E: Lipschitz bounds, contraction, K' selection, MARE"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="step", description="STEP: fast closed-loop diffusion policies.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"step {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
