"""The ``run_suite`` command line.

    run_suite list [TABLE]
    run_suite TABLE [--scale smoke|mini|paper] [--db URL] [--data-root DIR] [--executor local|slurm]
                    [--only ROW ...] [--seeds N] [--devices N] [--follow code|paper] [--artifacts DIR]
                    [--force] [--dry-run] [--wait] [--cluster FILE] [--partition P] [--account A] [--qos Q]
                    [--constraint C]
    run_suite status TABLE [--scale S] [--db URL] [--wait]
    run_suite report TABLE|all|finetune|published [--db URL] [--format md|html] [--out DIR]
    run_suite finetune CONFIG --backbone ARCH:REP[:VARIANT] ...        (runners/finetune.py)
    run_suite evaluate --checkpoint PATH --source SOURCE --arch ARCH --rep REP ...   (runners/evaluate.py)

Bad input (unknown table or row, a scale the table lacks, a bad or unusable --db, a missing external dataset or an
explicit root that does not exist, a bad cluster file) prints one line and exits with code 2 before anything is
written. A database password is never shown: URLs are printed masked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table as RichTable
from sqlalchemy.exc import SQLAlchemyError

import suites
from results import FINAL, StoreError, check_location, check_url, mask_url, resolve_url, split_secret

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """One line for the user; exit code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached run_suite."""


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
        epilog="Other commands: 'run_suite list [TABLE]', 'run_suite status TABLE', 'run_suite report TABLE|all'. "
               "A bare table name (table4) means OREPA's.")
    parser.add_argument("table", help="e.g. table4, orepa.table4, orepa.fig8 ('run_suite list' shows all)")
    parser.add_argument("--scale", default="smoke", choices=suites.SCALES,
                        help="smoke (default: plumbing, seconds), mini (minutes on a CPU), paper (GPUs)")
    parser.add_argument("--db", help="database URL (default: $REPBENCH_DB, else sqlite:///results/repbench.sqlite)")
    parser.add_argument("--data-root", help="datasets and generated data (default: $REPBENCH_DATA, else data/)")
    parser.add_argument("--executor", default="local", choices=("local", "slurm"))
    parser.add_argument("--only", nargs="+", metavar="ROW", help="only these rows (names as in 'run_suite list')")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds 0..N-1 per row (default: the scale's, 3 at mini, else 1); costs are measured in "
                             "seed 0's run only")
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
    parser.add_argument("--scales", metavar="FILE",
                        help="RepOpt rows: use this scales file (this suite's or the official RepOpt-VGG-*-scales.pth "
                             "layout) instead of running their Hyper-Search; its sha256 enters the run key")
    parser.add_argument("--pretrained", nargs="+", metavar="ROW=PATH", default=[],
                        help="dense tables: the checkpoint a row's backbone starts from (a repbench classification "
                             "checkpoint, train or deploy form), instead of the classification run in the database "
                             "(the recipe's); its sha256 enters the run key")
    parser.add_argument("--force", action="store_true",
                        help="re-run finished runs too, from scratch (their old checkpoints are removed)")
    parser.add_argument("--quantize", action="store_true",
                        help="add the quantization column to a classification table: each trained model deployed, "
                             "INT8 PTQ top-1 and its drop, INT8 and float latency on this CPU (runners/quant.py); "
                             "the column is part of the runs' config, so these are runs of their own")
    parser.add_argument("--dry-run", action="store_true", help="show the plan; run and write nothing")
    parser.add_argument("--wait", action="store_true",
                        help="slurm: follow the submitted runs until they end (default: return after submitting)")
    cluster = parser.add_argument_group("slurm site settings (override the cluster file)")
    cluster.add_argument("--cluster", metavar="FILE",
                         help="TOML file with the site's settings (default: $REPBENCH_CLUSTER); see runners/slurm.py")
    for flag in ("partition", "account", "qos", "constraint"):
        cluster.add_argument(f"--{flag}", help=f"Slurm {flag}")
    return parser


def status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_suite status",
                                     description="Every run of a table from the database: status, attempt, Slurm "
                                                 "job, host, elapsed time, last heartbeat (never asks sacct).")
    parser.add_argument("table", help="a table name (e.g. table4)")
    parser.add_argument("--scale", choices=suites.SCALES, help="only this scale")
    parser.add_argument("--db", help="database URL (same precedence as runs)")
    parser.add_argument("--wait", action="store_true", help="follow until no run is queued or running")
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
        view = RichTable(title=escape(f"{table.key} — {table.title} [scales: {scales}]"), title_justify="left")
        for column in ("row", "arch", "rep", "variant", *table.metrics):
            view.add_column(column)
        for row in table.rows:  # names are text, not rich markup
            view.add_row(*(escape(text) for text in (row.name, row.arch, row.rep, str(row.variant or "-"),
                         *(row.paper[m].text if m in row.paper else "" for m in table.metrics))))
        console.print(view)
    return 0


def _validated_run(args):
    """Every check that can fail on user input, before anything touches the database or the disk."""
    from runners.data import EXTERNAL, DatasetMissing, check_dataset, resolve_data_root

    table = _table(args.table)
    if args.scale not in table.recipes:
        raise BadInput(f"{table.key} has no runner at scale {args.scale!r} "
                       f"({'declared only; its runner comes in a later issue' if not table.recipes else 'scales: ' + ', '.join(table.scales)})")
    if args.only:
        args.only = list(dict.fromkeys(args.only))  # a row given twice is planned once
    for name in args.only or []:
        try:
            row = table.row(name)
        except KeyError as e:
            raise BadInput(e.args[0]) from None
        if row.declared:
            raise BadInput(f"{table.key} / {name} is declared only, not run: {row.declared}")
    if args.quantize:
        if table.runner != "classification":
            raise BadInput(f"--quantize: {table.key} is a {table.runner} table; the quantization column is for "
                           "classification tables")
        from runners.quant import QUANT_COLUMN
        table = replace(table, metrics=table.metrics + tuple(m for m in QUANT_COLUMN if m not in table.metrics))
    if args.seeds is None:
        args.seeds = table.recipes[args.scale].seeds
    if args.seeds < 1:
        raise BadInput("--seeds must be >= 1")
    if args.devices < 1:
        raise BadInput("--devices must be >= 1")
    rows = [table.row(name) for name in args.only] if args.only else [r for r in table.rows if not r.declared]
    data_root = resolve_data_root(args.data_root)
    if table.runner == "dense":
        _validated_dense(table, rows, args, data_root)
        recipes = {}
    else:
        if args.pretrained:
            raise BadInput(f"--pretrained: {table.key} is not a dense table (its rows train from scratch)")
        from runners.jobs import batch_plan, row_recipe
        recipes = {row.name: row_recipe(table, args.scale, row, args.follow, data_root) for row in rows}
        try:
            for recipe in dict.fromkeys(recipes.values()):
                batch_plan(recipe, args.devices)
        except ValueError as e:
            raise BadInput(f"--devices {args.devices}: {table.key} at {args.scale}: {e}") from None
    if not args.dry_run:
        _check_cuda_devices(args.devices)
    url = _checked_url(args.db, must_exist=False)
    site = None
    if args.executor == "slurm":
        if args.db is None and url.startswith("sqlite"):
            raise BadInput("--executor slurm needs the database given explicitly with --db (PostgreSQL: many nodes "
                           "writing one SQLite file over a network file system lose data)")
        if shutil.which("sbatch") is None and not args.dry_run:
            raise BadInput("--executor slurm needs Slurm's sbatch on PATH (run on a cluster login node)")
        from runners.slurm import Site, slurm_parameters
        try:
            site = Site.load(args.cluster, partition=args.partition, account=args.account, qos=args.qos,
                             constraint=args.constraint)
            slurm_parameters(table.resources[args.scale], args.devices, site, "check")
        except ValueError as e:
            raise BadInput(str(e)) from None
    if data_root.exists() and not data_root.is_dir():
        raise BadInput(f"--data-root {data_root} is not a directory")
    # the data of every row, and of the runs the rows consume (RepOpt rows: their Hyper-Search)
    needed = [recipe.dataset for recipe in recipes.values()]
    for row in rows if table.runner == "classification" else ():  # a dense row's scales served its pretraining
        if row.scales is not None and row.scales.upstream and args.scales is None:
            source = _table(row.scales.table)
            needed.append(row_recipe(source, args.scale, source.row(row.scales.row), args.follow, data_root).dataset)
    needed = list(dict.fromkeys(needed))
    if not data_root.exists() and set(needed) - set(EXTERNAL):  # external data: check_dataset says it is missing
        ancestor = next(p for p in data_root.absolute().parents if p.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise BadInput(f"--data-root {data_root} does not exist and cannot be created in {ancestor}")
    if args.scales is not None:
        if not any(row.scales is not None for row in rows):
            raise BadInput(f"--scales: {table.key} has no RepOpt row{' among --only' if args.only else ''} to use it")
        from backbones.repopt import load_scales
        try:
            load_scales(args.scales)
        except (OSError, ValueError, RuntimeError) as e:
            raise BadInput(f"--scales {args.scales}: {getattr(e, 'strerror', None) or e}") from None
    missing = None
    try:
        for dataset in needed:
            check_dataset(dataset, data_root)
    except DatasetMissing as e:
        if not args.dry_run:
            raise BadInput(str(e)) from None
        missing = str(e)  # a plan is shown without the data; the note says what a real run would need
    return table, url, data_root, missing, site


def _validated_dense(table, rows, args, data_root) -> None:
    """A dense table's own checks: the batch arithmetic of each row's stock config on --devices, --pretrained's
    rows and files (read strictly as repbench checkpoints), and a real dataset's presence (generated tiny data is
    written by the run). Leaves ``args.pretrained`` as {row: {"path", "sha256", "source": "file"}}."""
    from backbones import CheckpointError, read_checkpoint
    from runners.dense import DatasetMissing, batch_plan, ensure_data, task_of
    from runners.jobs import sha256_of
    recipe = table.recipes[args.scale]
    try:
        for row in rows:
            batch_plan(table.recipe(args.scale, row), row.config, args.devices, row.cfg_options)
    except ValueError as e:
        raise BadInput(f"--devices {args.devices}: {table.key} at {args.scale}: {e}") from None
    given = {}
    for item in args.pretrained:
        name, sep, path = item.rpartition("=")
        if not sep or not name or not path:
            raise BadInput(f"--pretrained {item!r}: expected ROW=PATH")
        if name not in {row.name for row in rows}:
            raise BadInput(f"--pretrained {item!r}: {name!r} is not a row of this run; rows: "
                           f"{', '.join(row.name for row in rows)}")
        try:
            read_checkpoint(path)
        except CheckpointError as e:
            raise BadInput(f"--pretrained {name}: {e}") from None
        given[name] = {"path": str(Path(path).resolve()), "sha256": sha256_of(Path(path)), "source": "file"}
    args.pretrained = given
    if recipe.data == "real":
        try:
            for task in dict.fromkeys(task_of(row.config) for row in rows):
                ensure_data(task, recipe, data_root)
        except DatasetMissing as e:
            if not args.dry_run:
                raise BadInput(str(e)) from None


def _dense_pretrained(store_url: str, table, rows, args) -> tuple[dict[str, dict], str | None]:
    """Each dense row's starting checkpoint: --pretrained's, else (a recipe with ``pretrained="suite"``) the
    classification run of the same backbone in the database (runners/dense.py find_pretrained); one line naming the
    run to do first when there is none (a dry run shows the plan without it, and that line as a note)."""
    recipe = table.recipes[args.scale]
    found = dict(args.pretrained)
    from results import SchemaMissing, Store
    from runners.dense import find_pretrained, origin_of_file
    from runners.jobs import _model_of
    store = None
    if not (store_url.startswith("sqlite:///") and not Path(store_url[len("sqlite:///"):]).exists()):
        try:
            store = Store(store_url, migrate=False)
        except (SchemaMissing, StoreError):
            store = None
    try:
        for name, given in found.items():  # a file this suite wrote: the run it came from is its lineage
            given.update(origin_of_file(store, given["sha256"]) if store else {})
        for row in rows if recipe.pretrained == "suite" else ():
            if row.name in found:
                continue
            model = _model_of(replace(row, rep=row.pretrained_rep, variant=None, dyrep=None, recipe={})
                              if row.pretrained_rep else row)
            hit = store and find_pretrained(store, model["arch"], model["rep"], model["variant"],
                                            recipe.pretrained_scale, table.paper)
            if not hit:
                source = next((f"'run_suite {t.key} --scale {recipe.pretrained_scale} --only \"{r.name}\"'"
                               for t in sorted(suites.TABLES.values(), key=lambda t: t.paper != table.paper)
                               if t.runner == "classification"
                               and recipe.pretrained_scale in t.recipes for r in t.rows
                               if not r.declared and _model_of(r) == model), "a classification run of it")
                line = (f"{table.key} / {row.name} starts from the final weights of a {recipe.pretrained_scale}-scale "
                        f"classification run of {row.arch}/{model['rep']}, and the database has none: run {source} first, "
                        f"or give --pretrained '{row.name}=PATH'")
                if args.dry_run:
                    return found, line
                raise BadInput(line)
            found[row.name] = {**hit, "source": "suite run"}
    finally:
        if store is not None:
            store.close()
    return found, None


def _checked_url(db: str | None, must_exist: bool) -> str:
    """The database URL to use, checked without writing anything (exit 2 on a bad one)."""
    url = resolve_url(db)
    try:
        check_url(url)
        check_location(url, must_exist=must_exist)
    except StoreError as e:
        raise BadInput(str(e)) from None
    return url


def cmd_run(argv, console: Console) -> int:
    args = run_parser().parse_args(argv)
    table, url, data_root, missing, site = _validated_run(args)
    if not args.table.count("."):
        console.print(f"[dim]{args.table} -> {table.key}[/dim]")
    from results import Store
    from results.models import now_ms
    from runners.jobs import plan, resolve_artifacts_root

    artifacts = resolve_artifacts_root(args.artifacts or (site.artifacts if site else None))
    public_url, secret_env = split_secret(url)  # workers get the URL without its password, and the password in env
    if args.executor == "slurm":  # array tasks run elsewhere, in the submission's folder: absolute paths
        data_root, artifacts = Path(data_root).resolve(), artifacts.resolve()
    since = now_ms()
    scales = str(Path(args.scales).resolve()) if args.scales else None
    pretrained = None
    if table.runner == "dense":
        pretrained, note = _dense_pretrained(url, table, [table.row(n) for n in args.only] if args.only else
                                             [r for r in table.rows if not r.declared], args)
        missing = missing or note
    jobs = plan(table, args.scale, args.seeds, args.only, str(data_root), public_url, args.executor, args.devices,
                args.follow, str(artifacts), args.force, since_ms=since, scales_file=scales, pretrained=pretrained)
    if args.dry_run:
        done = _already_done(url, jobs) if not args.force else {}
        console.print(_plan_view(table, args, jobs, done))
        if missing:
            console.print(f"note: {missing}")
        return 0
    try:
        store = Store(url)
    except StoreError as e:
        raise BadInput(str(e)) from None
    try:  # generated data (smoke, mini) goes into a new folder; an external dataset was checked to be there
        data_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        store.close()
        raise BadInput(f"--data-root {data_root}: cannot create it ({e.strerror})") from None
    os.environ.update(secret_env)
    from runners.jobs import COMMAND_ENV  # what each run records of how it was started
    os.environ[COMMAND_ENV] = " ".join(["run_suite", *(mask_url(a) if "://" in a else a for a in argv)])
    executor = None
    if args.executor == "local":
        from runners.executors import LocalExecutor
        executor = LocalExecutor()
    try:
        todo, changed, superseded = [], set(), 0
        for job in jobs:
            run = store.ensure_run(job.spec)
            job.run_id = run.id
            if run.status in FINAL and not args.force:
                continue
            todo.append(job)
            for keys in store.superseded(job.spec).values():
                superseded += 1
                changed.update(keys)
        if superseded:
            shown = sorted(changed)
            console.print(f"{superseded} finished run(s) of these rows were measured with an older config (changed: "
                          f"{', '.join(shown[:6])}{', ...' if len(shown) > 6 else ''}): running the new config; "
                          "the report shows the new numbers only and lists the old runs as superseded")
        if not todo:
            console.print(f"nothing to do: all {len(jobs)} runs of {table.key} at {args.scale} are already done "
                          f"(--force re-runs them; 'run_suite report {table.key}' shows them)")
            return 0
        console.print(f"{table.key} at {args.scale}: {len(todo)} of {len(jobs)} runs to do "
                      f"({len(jobs) - len(todo)} already done), executor {args.executor}, database {store.url}")
        if args.executor == "slurm":
            return _submit(todo, store, table, args, site, console)
        return _run_local(executor, todo, store, table, args, console)
    finally:
        store.close()


def _run_local(executor, todo, store, table, args, console) -> int:
    start = time.perf_counter()
    statuses, shown, interrupted = {}, set(), False
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(escape(todo[0].label), total=len(todo))

        def progress(job, status):
            statuses[job.spec.run_key] = status
            bar.advance(task)
            if not console.is_terminal:  # nohup, CI, Slurm logs: no live bar, so a line per finished run
                bar.console.print(f"[{len(statuses)}/{len(todo)}] {escape(job.label)}: {status} "
                                  f"({time.perf_counter() - start:.0f} s)", highlight=False)
            following = [j for j in todo if j.spec.run_key not in statuses]
            bar.update(task, description=escape(following[0].label) if following else "done")

        def waiting(held):
            key = tuple(sorted(run.id for run in held))
            if key not in shown:
                shown.add(key)
                bar.console.print(f"waiting for {len(held)} run(s) held by other workers: "
                                  + "; ".join(_holder(run) for run in held))

        try:
            with _interruptible():
                executor.run(todo, store, progress, waiting)
        except Interrupted:
            bar.console.print("interrupted: stopping the workers (a training run checkpoints first) ...")
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the checkpoint short
                signal.signal(sig, signal.SIG_IGN)
            executor.stop()
            interrupted = True
    if interrupted:
        console.print(f"stopped; 'run_suite {table.key} --scale {args.scale}' resumes the unfinished runs")
        return 130
    elapsed = time.perf_counter() - start
    console.print(_summary(store, table, args.scale, [job.run_id for job in todo]))
    failed = [k for k, s in statuses.items() if s == "failed"]
    console.print(f"{len(todo)} runs in {elapsed:.1f} s; {len(failed)} failed. "
                  f"Report: run_suite report {table.key}" + (f" --db {mask_url(args.db)}" if args.db else ""))
    return 1 if failed else 0


def _submit(todo, store, table, args, site, console) -> int:
    """Submit the runs nobody works on or has queued; return at once (``--wait``: follow them)."""
    from runners.claims import expire_dead_local
    from runners.executors import claimable
    from runners.slurm import SlurmExecutor, queued_jobs

    expire_dead_local(store)
    queued = queued_jobs()
    runs = store.runs(job.run_id for job in todo)
    ready = [job for job in todo if claimable(runs[job.run_id], job.since_ms, job.fresh)
             and not (runs[job.run_id].status == "scheduled" and runs[job.run_id].slurm_job_id in queued)]
    if len(ready) < len(todo):
        console.print(f"{len(todo) - len(ready)} run(s) already queued or running: not submitted again")
    if ready:
        executor = SlurmExecutor(site, table.resources[args.scale])
        ids = executor.submit(ready, store, name=f"repbench-{table.name}-{args.scale}")
        arrays = sorted({i.split("_")[0] for i in ids})
        console.print(f"submitted {len(ready)} run(s) as Slurm job array(s) {', '.join(arrays)} "
                      f"(tasks {ids[0]} .. {ids[-1]}); logs in {site.folder}")
    db = f" --db {mask_url(args.db)}" if args.db else ""
    if not args.wait:
        console.print(f"follow them: run_suite status {table.key} --scale {args.scale}{db} [--wait]")
        return 0
    return _follow(store, table, args.scale, [job.run_id for job in todo], console)


def _holder(run) -> str:
    where = f"job {run.slurm_job_id} on {run.host}" if run.slurm_job_id else f"{run.host} pid {run.pid}"
    beat = f", heartbeat {_ago(run.heartbeat_ms)} ago" if run.heartbeat_ms else ""
    return f"{run.row_name} seed {run.seed} ({where}{beat})"


def _ago(ms, until_ms=None) -> str:
    """Time from ``ms`` (epoch milliseconds) to ``until_ms`` (default now), as 42s, 3m05s or 2h10m."""
    from results.models import now_ms
    if ms is None or ms != ms:
        return "-"
    until = now_ms() if until_ms is None or until_ms != until_ms else int(until_ms)
    seconds = max(0, (until - int(ms)) // 1000)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _interruptible:
    """Within: SIGINT and SIGTERM raise Interrupted in the main thread (so the workers can be stopped cleanly)."""

    def __enter__(self):
        def handler(signum, frame):
            raise Interrupted(signal.Signals(signum).name)
        self.previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _follow(store, table, scale, run_ids, console, poll_s: float = 5.0) -> int:
    """Follow runs until none is queued or running: a progress bar of ended runs, and a line when one ends. Exit 0
    if every run ended finished (or diverged, a result), 1 otherwise."""
    from runners.claims import expire_dead_local
    from runners.slurm import queued_jobs

    run_ids = list(run_ids)
    reported: set[int] = set()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(f"{table.key} at {scale}", total=len(run_ids))
        try:
            with _interruptible():
                while True:
                    expire_dead_local(store)
                    runs = store.runs(run_ids)
                    queued = queued_jobs()
                    active = [r for r in runs.values() if r.status == "running"
                              or (r.status == "scheduled" and r.slurm_job_id in queued)]
                    for run in runs.values():
                        if run not in active and run.id not in reported and run.status != "scheduled":
                            reported.add(run.id)
                            bar.console.print(f"{run.row_name} seed {run.seed}: {run.status}"
                                              + (f" ({run.error})" if run.error and run.status == "failed" else ""))
                    bar.update(task, completed=len(reported),
                               description=f"{table.key} at {scale}: {sum(r.status == 'running' for r in active)} "
                                           f"running, {sum(r.status == 'scheduled' for r in active)} queued")
                    if not active:
                        break
                    time.sleep(poll_s)
        except Interrupted:
            console.print("stopped following (the jobs go on; 'run_suite status' shows them)")
            return 130
    statuses = [r.status for r in store.runs(run_ids).values()]
    console.print(_status_view(store, table, scale if scale in suites.SCALES else None))
    return 0 if all(status in FINAL for status in statuses) else 1


def _already_done(url: str, jobs) -> dict[str, str]:
    """Run key -> status of the planned runs the database already holds finished (or diverged), read without
    creating or migrating anything; empty when there is no database yet."""
    from results import SchemaMissing, Store
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return {}
    try:
        store = Store(url, migrate=False)
    except (SchemaMissing, StoreError):
        return {}
    try:
        runs = {job.spec.run_key: store.get_run(job.spec.run_key) for job in jobs}
        return {key: run.status for key, run in runs.items() if run is not None and run.status in FINAL}
    finally:
        store.close()


def _plan_view(table, args, jobs, done: dict[str, str] | None = None) -> RichTable:
    """The plan of a dry run: per row the batch arithmetic, lr, schedule, the switches in force and an estimate of
    device-hours, and which runs the database already holds done (``done``: run key -> status); nothing is
    written."""
    done = done or {}
    if table.runner == "dense":
        return _dense_plan_view(table, args, jobs, done)
    from runners.data import TRAIN_IMAGES
    recipe = table.recipes[args.scale].following(args.follow)
    from runners.jobs import batch_plan, lr_text
    c = batch_plan(recipe, args.devices)
    switches = "; ".join(f"{k}: {v}" for k, v in recipe.switches().items())
    view = RichTable(title=f"plan: {table.key} at {args.scale} ({len(jobs) - len(done)} of {len(jobs)} runs to do, "
                           f"{len(done)} already done; nothing written)\n"
                           f"the table's recipe (a row's own departures: its columns): devices {c.get('world_size')} (paper: {recipe.devices}), per-device batch "
                           f"{recipe.batch}, grad accumulation {c.get('grad_accum')}, global batch "
                           f"{c.get('global_batch')} (paper: {recipe.global_batch}), lr {recipe.lr:g}, "
                           f"{recipe.epochs} epoch(s), {recipe.dataset} {recipe.resolution}px\n{switches}",
                     title_justify="left")
    for column in ("row", "seed", "arch / rep", "data", "global batch, lr", "steps", "device-hours (est.)",
                   "run key", "in database"):
        view.add_column(column, no_wrap=column in ("run key", "in database"))
    for job in jobs:  # each run's own recipe: a row's departures, an upstream Hyper-Search run's table
        recipe = suites.Recipe.from_dict(job.config["recipe"])
        images = TRAIN_IMAGES.get(recipe.dataset)
        steps = recipe.epochs * (images // recipe.global_batch) if images and recipe.train_accuracy else None
        if recipe.max_iters is not None and steps is not None:
            steps = min(steps, recipe.max_iters)
        view.add_row(job.spec.row_name, str(job.spec.seed), f"{job.config['arch']} / {job.config['rep']}",
                     f"{recipe.dataset} {recipe.resolution}px"
                     + (f" (test {recipe.test_resolution}px)" if recipe.test_resolution != recipe.resolution else ""),
                     f"{job.config['global_batch']}, {lr_text(job.config, recipe)}",
                     str(steps) if steps else "-",
                     _device_hours(table, job, recipe, steps), job.spec.run_key[:12],
                     f"{done[job.spec.run_key]}: skipped" if job.spec.run_key in done else "to do")
    return view


def _dense_plan_view(table, args, jobs, done: dict[str, str]) -> RichTable:
    """A dense table's plan: per row its config, batch arithmetic (the stock config's as the paper ran it), schedule
    and the checkpoint its backbone starts from."""
    recipe = table.recipes[args.scale]
    switches = "; ".join(f"{k}: {v}" for k, v in recipe.switches().items())
    view = RichTable(title=f"plan: {table.key} at {args.scale} ({len(jobs) - len(done)} of {len(jobs)} runs to do, "
                           f"{len(done)} already done; nothing written)\n{switches}", title_justify="left")
    for column in ("row", "seed", "arch / rep", "config", "devices x accum x batch, lr", "pretrained", "run key",
                   "in database"):
        view.add_column(column, no_wrap=column in ("run key", "in database"))
    for job in jobs:
        c = job.config
        p = c.get("pretrained")
        view.add_row(job.spec.row_name, str(job.spec.seed), f"{c['arch']} / {c['rep']}",
                     Path(c["dense"]["config"]).name,
                     f"{c['world_size']} x {c['grad_accum']} x {c['per_device_batch']} = {c['global_batch']} "
                     f"(paper {c['paper_global_batch']}), {c['lr']:g}",
                     "none" if not p else (f"{p['table']} / {p['row']} ({p['sha256'][:12]})" if p.get("table")
                                           else f"{Path(job.pretrained_file).name} ({p['sha256'][:12]})"),
                     job.spec.run_key[:12],
                     f"{done[job.spec.run_key]}: skipped" if job.spec.run_key in done else "to do")
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


def _summary(store, table, scale, run_ids) -> RichTable:
    runs = store.runs_frame(table.key)
    runs = runs[(runs.scale == scale) & runs.id.isin(run_ids)]
    metrics = store.metrics_frame(table.key)
    view = RichTable(title=f"{table.key} at {scale}")
    headers = {"top1": "top-1 %", "map": "mAP %", "map_deployed": "mAP deployed", "miou": "mIoU %",
               "miou_deployed": "mIoU deployed", "train_memory": "mem GiB", "train_memory_ratio": "mem x base",
               "time_per_batch": "s/batch", "time_per_batch_ratio": "time x base",
               "time_per_50_steps": "min/50 steps", "time_per_50_steps_ratio": "time x base", "latency": "latency s"}
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


def _status_view(store, table, scale) -> RichTable:
    runs = store.runs_frame(table.key)
    if scale:
        runs = runs[runs.scale == scale]
    view = RichTable(title=f"{table.key}" + (f" at {scale}" if scale else "") + f" ({len(runs)} runs)",
                     title_justify="left")
    for column in ("row", "seed", "scale", "status", "attempt", "slurm job", "host", "elapsed", "heartbeat",
                   "error"):
        view.add_column(column, no_wrap=column in ("row", "slurm job"))
    for _, run in runs.iterrows():
        elapsed = _ago(run.started_ms, run.ended_ms)
        beat = _ago(run.heartbeat_ms) + " ago" if run.status == "running" else "-"
        error = run.error.splitlines()[0][:80] if isinstance(run.error, str) and run.error else ""
        view.add_row(run.row_name, str(run.seed), run.scale, run.status, str(run.attempt),
                     _cell(run.slurm_job_id), _cell(run.host), elapsed, beat, error)
    return view


def _cell(value) -> str:
    """A frame cell as text: missing values (None, or pandas' NaN) as '-'."""
    return "-" if value is None or value != value else str(value)


def cmd_status(argv, console: Console) -> int:
    args = status_parser().parse_args(argv)
    table = _table(args.table)
    url = _checked_url(args.db, must_exist=True)
    from results import Store
    try:
        store = Store(url, migrate=False)
    except StoreError as e:
        raise BadInput(str(e)) from None
    try:
        if args.wait:
            runs = store.runs_frame(table.key)
            ids = [int(i) for i in (runs[runs.scale == args.scale] if args.scale else runs).id]
            return _follow(store, table, args.scale or "all scales", ids, console)
        console.print(_status_view(store, table, args.scale))
        return 0
    finally:
        store.close()


def cmd_finetune(argv, console: Console) -> int:
    """``run_suite finetune``: runners/finetune.py; checked like a run (one line, exit 2, nothing written)."""
    from backbones import CheckpointError, read_checkpoint
    from runners import finetune
    from runners.data import resolve_data_root
    from runners.dense import DatasetMissing, batch_plan, config_path, ensure_data, task_of
    from suites import DenseRecipe

    args = finetune.parser().parse_args(argv)
    path = config_path(args.config)
    if not path.is_file():
        raise BadInput(f"config {args.config}: no such file (a path, or a name under configs/)")
    try:
        task = task_of(str(args.config))
        finetune.parse_backbone(args.backbone)
    except Exception as e:  # noqa: BLE001 - a config that does not parse, an unknown arch / rep / variant
        raise BadInput(f"{type(e).__name__}: {e}".splitlines()[0] if not isinstance(e, ValueError)
                       else str(e).splitlines()[0]) from None
    for flag in ("devices", "iters", "batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise BadInput(f"--{flag} must be >= 1")
    try:
        batch_plan(DenseRecipe(batch=args.batch), str(args.config), args.devices, args.cfg_options)
    except ValueError as e:
        raise BadInput(f"--devices {args.devices}: {e}") from None
    if args.pretrained:
        try:
            read_checkpoint(args.pretrained)
        except CheckpointError as e:
            raise BadInput(f"--pretrained: {e}") from None
    data_root = resolve_data_root(args.data_root)
    try:
        ensure_data(task, DenseRecipe(data="real"), data_root)
    except DatasetMissing as e:
        raise BadInput(str(e)) from None
    store, public_url, secret_env, artifacts = _single_store(args)
    job, table = finetune.plan_job(args, data_root, public_url, artifacts, store)
    args.scale = job.spec.scale
    return _run_single("finetune", job, table, store, secret_env, args, argv, console,
                       f"finetune {job.spec.row_name} at {args.scale}")


def _check_cuda_devices(devices: int) -> None:
    """More than one process on a CUDA machine needs as many devices (on CPU any count runs, over gloo)."""
    if devices > 1:
        import torch
        if torch.cuda.is_available() and torch.cuda.device_count() < devices:
            raise BadInput(f"--devices {devices}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _single_store(args):
    """The store of a single-job command (``--db``, ``--artifacts``): (store, URL without password, the password's
    environment, artifacts root); a bad database is bad input."""
    from results import Store
    from runners.jobs import resolve_artifacts_root
    url = _checked_url(args.db, must_exist=False)
    public_url, secret_env = split_secret(url)
    artifacts = str(resolve_artifacts_root(args.artifacts))
    try:
        return Store(url), public_url, secret_env, artifacts
    except StoreError as e:
        raise BadInput(str(e)) from None


def _run_single(command: str, job, table, store, secret_env: dict, args, argv, console: Console, start: str) -> int:
    """One job of ``run_suite finetune`` / ``evaluate`` in this process's executor (unless already done); closes
    ``store``. Its table's report: ``run_suite report <command's table>``."""
    os.environ.update(secret_env)
    from runners.executors import LocalExecutor
    from runners.jobs import COMMAND_ENV
    os.environ[COMMAND_ENV] = " ".join(["run_suite", command, *(mask_url(a) if "://" in a else a for a in argv)])
    try:
        run = store.ensure_run(job.spec)
        job.run_id = run.id
        if run.status in FINAL:
            console.print(f"nothing to do: {job.spec.row_name} (run {run.id}) is already {run.status} "
                          f"('run_suite report {job.spec.table_name.split('.', 1)[1]}' shows it)")
            return 0
        console.print(f"{start}: database {store.url}")
        return _run_local(LocalExecutor(), [job], store, table, args, console)
    finally:
        store.close()


def cmd_evaluate(argv, console: Console) -> int:
    """``run_suite evaluate``: runners/evaluate.py; checked like a run (one line, exit 2, nothing written)."""
    from backbones import build_classifier
    from backbones.official import OfficialError, from_official
    from runners import evaluate
    from runners.data import resolve_data_root

    args = evaluate.parser().parse_args(argv)
    if args.devices < 1:
        raise BadInput("--devices must be >= 1")
    _check_cuda_devices(args.devices)
    try:
        build_classifier(args.arch, args.rep, variant=args.variant, num_classes=2)
    except (KeyError, ValueError) as e:
        raise BadInput(str(e.args[0] if e.args else e).splitlines()[0]) from None
    try:  # the whole mapping, before anything is written
        from_official(args.checkpoint, args.arch, args.rep, args.source, variant=args.variant)
    except OfficialError as e:
        raise BadInput(f"--checkpoint: {e}") from None
    images = Path(args.images) if args.images else resolve_data_root(args.data_root) / "imagenet" / "val"
    if not images.is_dir() or not any(p.is_dir() for p in images.iterdir()):
        raise BadInput(f"{images}: no ImageFolder of validation images (class folders) there "
                       "(--images DIR, or --data-root with imagenet/val)")
    store, public_url, secret_env, artifacts = _single_store(args)
    job, table = evaluate.plan_job(args, images.resolve(), public_url, artifacts)
    args.scale = "paper"
    return _run_single("evaluate", job, table, store, secret_env, args, argv, console,
                       f"evaluate {job.spec.row_name} on {images}")


STORE_TABLES = {"finetune": "runners.finetune", "published": "runners.evaluate"}  # rows: the runs in the database


def cmd_report(argv, console: Console) -> int:
    args = report_parser().parse_args(argv)
    stored = next((name for name in STORE_TABLES if args.table in (name, f"repbench.{name}")), None)
    if not stored and args.table != "all":
        _table(args.table)  # an unknown table is bad input before the database is looked at
    url = _checked_url(args.db, must_exist=True)
    if stored:
        import importlib

        from results import Store
        store = Store(url, migrate=False)
        try:
            tables = [importlib.import_module(STORE_TABLES[stored]).table_from_store(store)]
        finally:
            store.close()
    else:
        tables = list(suites.TABLES.values()) if args.table == "all" else [_table(args.table)]
    out = Path(args.out)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise BadInput(f"--out {out}: {existing} is a file, not a folder")
    from reports import write_reports
    try:
        paths = write_reports(tables, url, args.format, out)
    except StoreError as e:
        raise BadInput(str(e)) from None
    for path in paths:
        console.print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    commands = {"list": cmd_list, "report": cmd_report, "status": cmd_status, "finetune": cmd_finetune,
                "evaluate": cmd_evaluate}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:], console)
        return cmd_run(argv, console)
    except BadInput as e:
        Console(stderr=True).print(f"run_suite: error: {e}", style="red", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except SQLAlchemyError as e:  # the database went away under a run: say so, no traceback, never the URL
        from results import error_reason
        Console(stderr=True).print(f"run_suite: database error: {error_reason(e)}; runs held by this invocation are "
                                   "retried by the next one once their lease expires", style="red",
                                   highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
