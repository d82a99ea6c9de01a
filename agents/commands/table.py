"""``step table results/pusht results/lift results/can results/square [--out results/table]``"""

from __future__ import annotations

from pathlib import Path

from agents.bench import combined_plot, combined_table, load_report


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="+", help="`step bench` output folders (one per task)")
    parser.add_argument("--out", default=None, help="also write table.md and pareto.png here")


def run(args) -> int:
    reports = [load_report(folder) for folder in args.results]
    table = combined_table(reports)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table)
        combined_plot(reports, out / "pareto.png")
        print(f"wrote {out}/table.md, pareto.png")
    return 0
