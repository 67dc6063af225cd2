"""The store API: the only code in repbench that speaks SQL. Runners write through it, reports read through it."""

from __future__ import annotations

import fcntl
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, delete, event, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .models import ARTIFACT_KINDS, Artifact, Environment, Metric, Param, Run, now_ms

MIGRATIONS = Path(__file__).parent / "migrations"
DEFAULT_URL = "sqlite:///results/repbench.sqlite"
FINAL = ("finished", "diverged")  # a re-run skips these; failed (and dead running) runs are retried


class StoreError(RuntimeError):
    """A database that cannot be opened or used (bad URL, unreachable server, stale schema)."""


class SchemaMissing(StoreError):
    """The database exists but holds no repbench schema (nothing was ever stored in it)."""


@dataclass
class MetricRecord:
    """One measured value with everything needed to compare it: unit, device, batch, resolution, dtype, threads,
    and how it was measured."""

    name: str
    value: float | None
    unit: str
    step: int = 0
    device: str | None = None
    batch: int | None = None
    resolution: int | None = None
    dtype: str | None = None
    threads: int | None = None
    method: str | None = None


@dataclass
class RunSpec:
    """What identifies a run: its deterministic key and the full resolved config (stored as immutable params)."""

    run_key: str
    table_name: str
    row_name: str
    scale: str
    seed: int
    config_hash: str
    config: dict = field(default_factory=dict)


def resolve_url(url: str | None) -> str:
    """``--db``, else ``$REPBENCH_DB``, else the SQLite file ``results/repbench.sqlite`` in the working directory."""
    return url or os.environ.get("REPBENCH_DB") or DEFAULT_URL


def check_url(url: str) -> None:
    """Validate a database URL without touching any database (so bad input writes nothing)."""
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise StoreError(f"bad database URL {url!r}: {e}") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"unsupported database {parsed.get_backend_name()!r} in {url!r} (sqlite or postgresql)")


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True)
    return out


class Store:
    """A results database. ``Store(url)`` opens it, creating the schema (Alembic ``upgrade head``) if needed."""

    def __init__(self, url: str | None = None, migrate: bool = True):
        self.url = resolve_url(url)
        check_url(self.url)
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(self.url, future=True)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        try:
            if migrate:
                self.upgrade()
            else:
                self.check_schema()
        except StoreError:
            self.engine.dispose()
            raise
        except OperationalError as e:
            self.engine.dispose()
            raise StoreError(f"cannot open database {parsed.render_as_string(hide_password=True)}: "
                             f"{str(e.orig).strip().splitlines()[0]}") from None

    # -- schema --------------------------------------------------------------------------------------------------
    def _alembic(self, connection) -> Config:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        return config

    def upgrade(self) -> None:
        """Bring the schema to the newest revision; one process at a time (file lock / advisory lock)."""
        with self._migration_lock(), self.engine.begin() as connection:
            if not self.is_sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(7263001)"))
            command.upgrade(self._alembic(connection), "head")

    def check_schema(self) -> None:
        with self.engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            head = ScriptDirectory.from_config(self._alembic(connection)).get_current_head()
        if current is None:
            raise SchemaMissing("the database holds no repbench results yet")
        if current != head:
            raise StoreError(f"database schema is at {current}, the code needs {head}")

    def schema_revision(self) -> str | None:
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @contextmanager
    def _migration_lock(self):
        database = make_url(self.url).database
        if not self.is_sqlite or database in (None, "", ":memory:"):
            yield
            return
        with open(f"{database}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def session(self):
        with self._session() as session:
            try:
                yield session
                session.commit()
            except SQLAlchemyError:
                session.rollback()
                raise

    def close(self) -> None:
        self.engine.dispose()

    # -- runs ----------------------------------------------------------------------------------------------------
    def get_run(self, run_key: str) -> Run | None:
        with self.session() as s:
            return s.scalar(select(Run).where(Run.run_key == run_key))

    def ensure_run(self, spec: RunSpec) -> Run:
        """The run with this key, created as ``scheduled`` with its params if new. Params are immutable: the key
        includes the config hash, so the same key always carries the same config."""
        with self.session() as s:
            run = s.scalar(select(Run).where(Run.run_key == spec.run_key))
            if run is None:
                run = Run(run_key=spec.run_key, table_name=spec.table_name, row_name=spec.row_name,
                          scale=spec.scale, seed=spec.seed, config_hash=spec.config_hash, status="scheduled",
                          attempt=0)
                run.params = [Param(key=k, value=v) for k, v in _flatten(spec.config).items()]
                s.add(run)
            return run

    def start_run(self, run_id: int, *, pid: int | None, host: str, executor: str,
                  slurm_job_id: str | None = None) -> None:
        """Mark a run ``running``; a retried run's partial metrics and environment are removed first, so the store
        ends as a clean run's would."""
        with self.session() as s:
            run = s.get(Run, run_id)
            s.execute(delete(Metric).where(Metric.run_id == run_id))
            s.execute(delete(Environment).where(Environment.run_id == run_id))
            run.status, run.attempt = "running", run.attempt + 1
            run.pid, run.host, run.executor, run.slurm_job_id = pid, host, executor, slurm_job_id
            run.started_ms, run.ended_ms, run.error, run.traceback, run.diverged_step = now_ms(), None, None, None, None

    def log_metrics(self, run_id: int, records: list[MetricRecord]) -> None:
        with self.session() as s:
            for r in records:
                finite = r.value is not None and math.isfinite(r.value)
                s.add(Metric(run_id=run_id, name=r.name, value=r.value if finite else None,
                             is_nan=r.value is not None and not finite, unit=r.unit, step=r.step, device=r.device,
                             batch=r.batch, resolution=r.resolution, dtype=r.dtype, threads=r.threads,
                             method=r.method))

    def log_environment(self, run_id: int, env: dict) -> None:
        with self.session() as s:
            s.merge(Environment(run_id=run_id, **env))

    def finish_run(self, run_id: int, status: str, error: str | None = None, traceback: str | None = None,
                   diverged_step: int | None = None) -> None:
        with self.session() as s:
            run = s.get(Run, run_id)
            run.status, run.ended_ms = status, now_ms()
            run.error, run.traceback, run.diverged_step = error, traceback, diverged_step

    def log_artifact(self, run_id: int, kind: str, path: str, size_bytes: int, sha256: str,
                     epoch: int | None = None) -> None:
        """Record (or update) a file the run left: checkpoint, log, weights_train or weights_deploy."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}; known: {ARTIFACT_KINDS}")
        with self.session() as s:
            artifact = s.scalar(select(Artifact).where(Artifact.run_id == run_id, Artifact.path == path))
            if artifact is None:
                artifact = Artifact(run_id=run_id, path=path)
                s.add(artifact)
            artifact.kind, artifact.size_bytes, artifact.sha256, artifact.epoch = kind, size_bytes, sha256, epoch
            artifact.created_ms = now_ms()

    def remove_artifacts(self, run_id: int, path: str | None = None) -> None:
        """Forget one artifact (``path``) or all of a run's (its files were removed)."""
        with self.session() as s:
            query = delete(Artifact).where(Artifact.run_id == run_id)
            s.execute(query if path is None else query.where(Artifact.path == path))

    def artifacts_frame(self, run_id: int | None = None, table_name: str | None = None) -> pd.DataFrame:
        query = select(Artifact.run_id, Run.table_name, Run.row_name, Run.scale, Run.seed, Artifact.kind,
                       Artifact.path, Artifact.size_bytes, Artifact.sha256, Artifact.epoch).join(Run)
        if run_id is not None:
            query = query.where(Artifact.run_id == run_id)
        if table_name:
            query = query.where(Run.table_name == table_name)
        with self.engine.connect() as c:
            return pd.DataFrame(c.execute(query.order_by(Artifact.id)).mappings().all(),
                                columns=[col.name for col in query.selected_columns])

    def fail_dead_runs(self, is_alive) -> list[int]:
        """Runs left ``running`` whose process is gone (``is_alive(run) -> bool``) become ``failed``."""
        dead = []
        with self.session() as s:
            for run in s.scalars(select(Run).where(Run.status == "running")):
                if not is_alive(run):
                    run.status, run.ended_ms = "failed", now_ms()
                    run.error = f"process {run.pid} on {run.host} died while the run was running"
                    dead.append(run.id)
        return dead

    # -- reading (reports) ---------------------------------------------------------------------------------------
    def runs_frame(self, table_name: str | None = None) -> pd.DataFrame:
        query = select(Run.id, Run.run_key, Run.table_name, Run.row_name, Run.scale, Run.seed, Run.config_hash,
                       Run.status, Run.attempt, Run.executor, Run.host, Run.started_ms, Run.ended_ms, Run.error,
                       Run.diverged_step)
        if table_name:
            query = query.where(Run.table_name == table_name)
        with self.engine.connect() as c:
            return pd.DataFrame(c.execute(query.order_by(Run.id)).mappings().all(),
                                columns=[col.name for col in query.selected_columns])

    def metrics_frame(self, table_name: str | None = None, history: bool = False) -> pd.DataFrame:
        """Every run's metrics; a metric stored at several steps (per-epoch top-1, loss) gives its last step's value
        unless ``history``."""
        query = select(Metric.run_id, Run.table_name, Run.row_name, Run.scale, Run.seed, Run.status, Metric.name,
                       Metric.value, Metric.is_nan, Metric.unit, Metric.step, Metric.device, Metric.batch,
                       Metric.resolution, Metric.dtype, Metric.threads, Metric.method).join(Run)
        if table_name:
            query = query.where(Run.table_name == table_name)
        with self.engine.connect() as c:
            frame = pd.DataFrame(c.execute(query.order_by(Metric.id)).mappings().all(),
                                 columns=[col.name for col in query.selected_columns])
        frame.loc[frame["is_nan"].astype(bool), "value"] = float("nan")
        if not history and len(frame):
            last = frame.groupby(["run_id", "name"])["step"].transform("max")
            frame = frame[frame["step"] == last].reset_index(drop=True)
        return frame

    def environments_frame(self, table_name: str | None = None) -> pd.DataFrame:
        query = select(Environment, Run.table_name, Run.row_name).join(Run)
        if table_name:
            query = query.where(Run.table_name == table_name)
        with self.session() as s:
            rows = s.execute(query).all()
        return pd.DataFrame([{**{c.name: getattr(env, c.name) for c in Environment.__table__.columns},
                              "table_name": t, "row_name": r} for env, t, r in rows])

    def params_of(self, run_id: int) -> dict[str, object]:
        with self.session() as s:
            return {p.key: json.loads(p.value) for p in s.scalars(select(Param).where(Param.run_id == run_id))}


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
