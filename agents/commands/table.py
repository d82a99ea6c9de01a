"""``step table results/pusht results/lift results/can results/square [--out results/table]``"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agents.config_files import add_config_arguments, config_from_args, option


@dataclass
class TableConfig:
    results: tuple[str, ...] = option(positional=True, help="`step bench` output folders (one per task)")
    out: str | None = option(None, help="also write table.md and pareto.png here")


def add_arguments(parser) -> None:
    add_config_arguments(parser, TableConfig)


def run(args) -> int:
    from agents.bench import combined_plot, combined_table, load_report

    cfg = config_from_args(TableConfig, args)
    reports = [load_report(folder) for folder in cfg.results]
    table = combined_table(reports)
    print(table)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table)
        combined_plot(reports, out / "pareto.png")
        print(f"wrote {out}/table.md, pareto.png")
    return 0
