"""The ``run_suite`` command line.

    run_suite list [TABLE]
    run_suite TABLE [--scale smoke|mini|paper] [--db URL] [--data-root DIR] [--executor local|slurm]
                    [--only ROW ...] [--seeds N] [--devices N] [--follow code|paper] [--artifacts DIR]
                    [--force] [--dry-run]
    run_suite report TABLE|all [--db URL] [--format md|html] [--out DIR]

Bad input (unknown table or row, a scale the table lacks, a bad --db URL, a missing external dataset or an explicit
root that does not exist) prints one line and exits with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable

import suites
from results import FINAL, StoreError, check_url, resolve_url

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """One line for the user; exit code 2."""


def _table(name: str):
    try:
        return suites.get_table(name)
    except KeyError as e:
        raise BadInput(e.args[0]) from None


def list_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_suite list", description="Every declared table, its rows and scales.")
    parser.add_argument("table", nargs="?", help="only this table (e.g. table4 or orepa.table4)")
    return parser


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_suite", description="Re-measure a paper table and store every number in the results database.",
        epilog="Other commands: 'run_suite list [TABLE]', 'run_suite report TABLE|all'. A bare table name "
               "(table4) means OREPA's.")
    parser.add_argument("table", help="e.g. table4, orepa.table4, orepa.fig8 ('run_suite list' shows all)")
    parser.add_argument("--scale", default="smoke", choices=suites.SCALES,
                        help="smoke (default: plumbing, seconds), mini (minutes on a CPU), paper (GPUs)")
    parser.add_argument("--db", help="database URL (default: $REPBENCH_DB, else sqlite:///results/repbench.sqlite)")
    parser.add_argument("--data-root", help="datasets and generated data (default: $REPBENCH_DATA, else data/)")
    parser.add_argument("--executor", default="local", choices=("local", "slurm"))
    parser.add_argument("--only", nargs="+", metavar="ROW", help="only these rows (names as in 'run_suite list')")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per row (default 1)")
    parser.add_argument("--devices", type=int, default=1, metavar="N",
                        help="processes per run, one per device (CUDA devices, else CPU processes with gloo); the "
                             "recipe's global batch is kept by gradient accumulation (default 1)")
    parser.add_argument("--follow", default="code", choices=("code", "paper"),
                        help="where the official code and the paper's text disagree (e.g. OREPA's warm-up: 5 "
                             "iterations in the code, 5 epochs in the text), follow the code (default: it produced "
                             "the printed numbers) or the text")
    parser.add_argument("--artifacts", metavar="DIR",
                        help="checkpoints, logs and final weights (default: $REPBENCH_ARTIFACTS, else "
                             "results/artifacts/)")
    parser.add_argument("--force", action="store_true",
                        help="re-run finished runs too, from scratch (their old checkpoints are removed)")
    parser.add_argument("--dry-run", action="store_true", help="show the plan; run and write nothing")
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_suite report",
                                     description="Render tables from the results database (never runs anything).")
    parser.add_argument("table", help="a table name, or 'all'")
    parser.add_argument("--db", help="database URL (same precedence as runs)")
    parser.add_argument("--format", default="md", choices=("md", "html"))
    parser.add_argument("--out", default="reports/out", help="output directory (default reports/out/)")
    return parser


def cmd_list(argv, console: Console) -> int:
    args = list_parser().parse_args(argv)
    tables = [_table(args.table)] if args.table else list(suites.TABLES.values())
    for table in tables:
        scales = ", ".join(table.scales) or f"none yet ({table.runner} runner comes later)"
        view = RichTable(title=f"{table.key} — {table.title} [scales: {scales}]", title_justify="left")
        for column in ("row", "arch", "rep", "variant", *table.metrics):
            view.add_column(column)
        for row in table.rows:
            view.add_row(row.name, row.arch, row.rep, str(row.variant or "-"),
                         *(row.paper[m].text if m in row.paper else "" for m in table.metrics))
        console.print(view)
    return 0


def _validated_run(args):
    """Every check that can fail on user input, before anything touches the database or the disk."""
    from runners.data import DatasetMissing, check_dataset, resolve_data_root

    table = _table(args.table)
    if args.scale not in table.recipes:
        raise BadInput(f"{table.key} has no runner at scale {args.scale!r} "
                       f"({'declared only; its runner comes in a later issue' if not table.recipes else 'scales: ' + ', '.join(table.scales)})")
    for name in args.only or []:
        try:
            table.row(name)
        except KeyError as e:
            raise BadInput(e.args[0]) from None
    if args.seeds < 1:
        raise BadInput("--seeds must be >= 1")
    if args.devices < 1:
        raise BadInput("--devices must be >= 1")
    from runners.jobs import batch_plan
    recipe = table.recipes[args.scale].following(args.follow)
    try:
        batch_plan(recipe, args.devices)
    except ValueError as e:
        raise BadInput(f"--devices {args.devices}: {table.key} at {args.scale}: {e}") from None
    if args.devices > 1 and not args.dry_run:
        import torch
        if torch.cuda.is_available() and torch.cuda.device_count() < args.devices:
            raise BadInput(f"--devices {args.devices}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.executor == "slurm" and shutil.which("sbatch") is None and not args.dry_run:
        raise BadInput("--executor slurm needs Slurm's sbatch on PATH (run on a cluster login node)")
    url = resolve_url(args.db)
    try:
        check_url(url)
    except StoreError as e:
        raise BadInput(str(e)) from None
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise BadInput(f"--data-root {args.data_root} does not exist")
    data_root = resolve_data_root(args.data_root)
    missing = None
    try:
        check_dataset(recipe.dataset, data_root)
    except DatasetMissing as e:
        if not args.dry_run:
            raise BadInput(str(e)) from None
        missing = str(e)  # a plan is shown without the data; the note says what a real run would need
    return table, url, data_root, missing


def cmd_run(argv, console: Console) -> int:
    args = run_parser().parse_args(argv)
    table, url, data_root, missing = _validated_run(args)
    if not args.table.count("."):
        console.print(f"[dim]{args.table} -> {table.key}[/dim]")
    from results import Store
    from runners.executors import build_executor, run_is_alive
    from runners.jobs import plan

    from runners.jobs import resolve_artifacts_root
    jobs = plan(table, args.scale, args.seeds, args.only, str(data_root), url, args.executor, args.devices,
                args.follow, str(resolve_artifacts_root(args.artifacts)), args.force)
    if args.dry_run:
        console.print(_plan_view(table, args, jobs))
        if missing:
            console.print(f"note: {missing}")
        return 0
    try:
        store = Store(url)
    except StoreError as e:
        raise BadInput(str(e)) from None
    dead = store.fail_dead_runs(run_is_alive)
    if dead:
        console.print(f"{len(dead)} run(s) left 'running' by a dead process will be retried")
    todo = []
    for job in jobs:
        run = store.ensure_run(job.spec)
        job.run_id = run.id
        if run.status in FINAL and not args.force:
            continue
        todo.append(job)
    if not todo:
        console.print(f"nothing to do: all {len(jobs)} runs of {table.key} at {args.scale} are already done "
                      f"(--force re-runs them; 'run_suite report {table.key}' shows them)")
        return 0
    console.print(f"{table.key} at {args.scale}: {len(todo)} of {len(jobs)} runs to do "
                  f"({len(jobs) - len(todo)} already done), executor {args.executor}, database {store.url}")
    start = time.perf_counter()
    statuses = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(todo[0].label, total=len(todo))

        def progress(job, status):
            statuses[job.spec.run_key] = status
            bar.advance(task)
            following = [j for j in todo if j.spec.run_key not in statuses]
            bar.update(task, description=following[0].label if following else "done")

        build_executor(args.executor).run(todo, store, progress)
    elapsed = time.perf_counter() - start
    console.print(_summary(store, table, args.scale))
    failed = [k for k, s in statuses.items() if s == "failed"]
    console.print(f"{len(todo)} runs in {elapsed:.1f} s; {len(failed)} failed. "
                  f"Report: run_suite report {table.key}" + (f" --db {args.db}" if args.db else ""))
    store.close()
    return 1 if failed else 0


def _plan_view(table, args, jobs) -> RichTable:
    """The plan of a dry run: per row the batch arithmetic, lr, schedule, the switches in force and an estimate of
    device-hours; nothing is written."""
    from runners.data import TRAIN_IMAGES
    recipe = table.recipes[args.scale].following(args.follow)
    c = jobs[0].config if jobs else {}
    switches = "; ".join(f"{k}: {v}" for k, v in recipe.switches().items())
    view = RichTable(title=f"plan: {table.key} at {args.scale} ({len(jobs)} runs; nothing written)\n"
                           f"devices {c.get('world_size')} (paper: {recipe.devices}), per-device batch "
                           f"{recipe.batch}, grad accumulation {c.get('grad_accum')}, global batch "
                           f"{c.get('global_batch')} (paper: {recipe.global_batch}), lr {recipe.lr:g}, "
                           f"{recipe.epochs} epoch(s), {recipe.dataset} {recipe.resolution}px\n{switches}",
                     title_justify="left")
    for column in ("row", "seed", "arch", "rep", "steps", "device-hours (est., paper GPUs)", "run key"):
        view.add_column(column)
    images = TRAIN_IMAGES.get(recipe.dataset)
    for job in jobs:
        steps = recipe.epochs * (images // recipe.global_batch) if images and recipe.train_accuracy else None
        if recipe.max_iters is not None and steps is not None:
            steps = min(steps, recipe.max_iters)
        view.add_row(job.spec.row_name, str(job.spec.seed), job.config["arch"], job.config["rep"],
                     str(steps) if steps else "-", _device_hours(table, job, recipe, steps), job.spec.run_key[:12])
    return view


def _device_hours(table, job, recipe, steps) -> str:
    """Paper-scale estimate: optimizer steps x the paper's printed time per step (on its devices) x its devices.
    The time comes from a row of any table of the same paper with the same arch and rep (OREPA Table 4 prints
    time/batch per 4 x 64 step); where none is printed there is no estimate."""
    if not steps or recipe.dataset not in ("imagenet",):
        return "-"
    seconds = None
    for other in suites.TABLES.values():
        if other.paper != table.paper:
            continue
        for row in other.rows:
            printed = row.paper.get("time_per_batch")
            if row.arch == job.config["arch"] and row.rep == job.config["rep"] and printed and printed.value:
                if row.name == job.spec.row_name or seconds is None:
                    seconds = printed.value
    if seconds is None:
        return "-"
    return f"{steps * seconds * recipe.devices / 3600:.0f}"


def _summary(store, table, scale) -> RichTable:
    runs = store.runs_frame(table.key)
    runs = runs[runs.scale == scale]
    metrics = store.metrics_frame(table.key)
    view = RichTable(title=f"{table.key} at {scale}")
    headers = {"top1": "top-1 %", "train_memory": "mem GiB", "time_per_batch": "s/batch", "latency": "latency s"}
    columns = [m for m in headers if m in set(metrics.name)]
    for column in ("row", "seed", "status", *(headers[c] for c in columns)):
        view.add_column(column, no_wrap=column == "row")
    for _, run in runs.iterrows():
        values = metrics[metrics.run_id == run.id].set_index("name")["value"]
        cells = []
        for name in columns:
            value = values.get(name)
            cells.append("-" if value is None else f"{value:.4g}")
        view.add_row(run.row_name, str(run.seed), run.status, *cells)
    return view


def cmd_report(argv, console: Console) -> int:
    args = report_parser().parse_args(argv)
    tables = list(suites.TABLES.values()) if args.table == "all" else [_table(args.table)]
    url = resolve_url(args.db)
    try:
        check_url(url)
    except StoreError as e:
        raise BadInput(str(e)) from None
    from reports import write_reports
    try:
        paths = write_reports(tables, url, args.format, Path(args.out))
    except StoreError as e:
        raise BadInput(str(e)) from None
    for path in paths:
        console.print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    commands = {"list": cmd_list, "report": cmd_report}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:], console)
        return cmd_run(argv, console)
    except BadInput as e:
        Console(stderr=True).print(f"run_suite: error: {e}", style="red", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
