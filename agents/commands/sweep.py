"""``step sweep SPEC.yaml [--address ADDR] [--out DIR] [--num-cpus N]``: bench cells on Ray (agents/sweep.py)."""

from __future__ import annotations

from agents.config_files import add_config_arguments, config_from_args
from agents.sweep import SweepConfig, run_sweep


def add_arguments(parser) -> None:
    # The sweep file is the command's own YAML, so no --config: flags come from SweepConfig like every command's.
    parser.add_argument("spec", help=SweepConfig.__dataclass_fields__["spec"].metadata["help"])
    add_config_arguments(parser, SweepConfig, config_file=False)


def run(args) -> int:
    cfg = config_from_args(SweepConfig, args, spec=args.spec)
    summary = run_sweep(cfg)
    print(f"sweep: {summary['cells']} cells: {summary['ran']} ran, {summary['skipped']} skipped (already done), "
          f"{len(summary['failed'])} failed; {summary['wall_seconds']:.0f} s")
    for failure in summary["failed"]:
        print(f"  failed {failure['cell']}: {failure['error']}")
    if summary["incomplete"]:
        print(f"  left out of the results (a cell failed): {', '.join(summary['incomplete'])}")
    for folder in summary["results"]:
        print(f"wrote {folder}/results.json, results.md, pareto.png")
    print(f"wrote {summary['out']}/sweep.json")
    return 1 if summary["failed"] else 0
