"""The ``run_suite`` command line.

Commands: ``run_suite list`` (every declared table with its rows and scales). Running and reporting tables arrive
with the results store (see the README's roadmap).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table as RichTable

import suites


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_suite",
        description="repbench: re-measure the tables of re-parameterization papers.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    listing = commands.add_parser("list", help="every declared table with its rows and the scales it supports")
    listing.add_argument("table", nargs="?", help="only this table (e.g. table4 or orepa.table4)")
    return parser


def cmd_list(args, console: Console) -> int:
    tables = list(suites.TABLES.values())
    if args.table:
        try:
            tables = [suites.get_table(args.table)]
        except KeyError as e:
            console.print(f"run_suite: {e.args[0]}", style="red", highlight=False)
            return 2
    for table in tables:
        view = RichTable(title=f"{table.key} — {table.title}  [scales: {', '.join(table.scales)}]",
                         title_justify="left")
        for column in ("row", "arch", "rep", "variant", *table.metrics):
            view.add_column(column)
        for row in table.rows:
            view.add_row(row.name, row.arch, row.rep, str(row.variant or "-"),
                         *(row.paper[m].text if m in row.paper else "" for m in table.metrics))
        console.print(view)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    return {"list": cmd_list}[args.command](args, console)


if __name__ == "__main__":
    sys.exit(main())
