"""The store API: the only code in repbench that speaks SQL. Runners write through it, reports read through it."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import and_, create_engine, delete, event, or_, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .models import ARTIFACT_KINDS, EVENT_KINDS, Artifact, Attempt, Environment, Event, Metric, Param, Run, now_ms

MIGRATIONS = Path(__file__).parent / "migrations"
DEFAULT_URL = "sqlite:///results/repbench.sqlite"
FINAL = ("finished", "diverged")  # a re-run skips these; failed (and dead running) runs are retried


class StoreError(RuntimeError):
    """A database that cannot be opened or used (bad URL, unreachable server, stale schema)."""


class SchemaMissing(StoreError):
    """The database exists but holds no repbench schema (nothing was ever stored in it)."""


class LeaseLost(StoreError):
    """This worker no longer holds the run: its lease expired and another worker claimed it (or it was finished)."""


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a run: the owner token written by the claim, and which attempt it is."""

    run_id: int
    owner: str
    attempt: int


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


def mask_url(url: str) -> str:
    """The URL as it may be shown: any password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def split_secret(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without its password, the environment that supplies it): workers get the first in their pickled
    job and inherit the second (libpq reads ``PGPASSWORD``), so no file the suite writes ever holds the password."""
    parsed = make_url(url)
    if parsed.password is None:
        return url, {}
    # URL.set() ignores None; _replace is the documented namedtuple way to drop a field
    return parsed._replace(password=None).render_as_string(hide_password=False), {"PGPASSWORD": str(parsed.password)}


def check_url(url: str) -> None:
    """Validate a database URL without touching any database (so bad input writes nothing)."""
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise StoreError(f"bad database URL {mask_url(url)!r}: {e}".replace(url, mask_url(url))) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"unsupported database {parsed.get_backend_name()!r} in {mask_url(url)!r} "
                         "(sqlite or postgresql)")
    if parsed.get_backend_name() == "sqlite" and (parsed.database in (None, "", ":memory:")
                                                  or "memory" in str(parsed.query.get("mode", ""))):
        raise StoreError(f"{url} is an in-memory database: the results would vanish with the process (and each "
                         "worker would see its own); give a file, e.g. sqlite:///results/repbench.sqlite")


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_location(url: str, must_exist: bool = False) -> None:
    """For an SQLite file: that it can be opened as a results database, checked without writing anything. The file
    must be a database (or empty, or absent: then its folder must be creatable and writable); ``must_exist`` (for
    reading) refuses an absent file."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return
    path = Path(parsed.database)
    if path.exists():
        if path.is_dir():
            raise StoreError(f"--db {path} is a folder, not a database file")
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            raise StoreError(f"--db {path} is not an SQLite database (it holds something else)")
        if not must_exist and not os.access(path, os.W_OK):
            raise StoreError(f"--db {path} is not writable")
        return
    if must_exist:
        raise StoreError(f"there is no database at {path} (nothing has been run into it yet)")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise StoreError(f"--db {path}: {folder} is a file, not a folder")
    try:  # os.access says yes to root even on a read-only file system: try it (the file is gone at once)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise StoreError(f"--db {path}: cannot write in {folder} ({e.strerror})") from None


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
        self._url = resolve_url(url)
        check_url(self._url)
        self.url = mask_url(self._url)  # for display: never the password
        parsed = make_url(self._url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            check_location(self._url, must_exist=not migrate)
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # pre-ping: a server restarted under a long run leaves dead pooled connections, not a failed run
        self.engine = create_engine(self._url, future=True, pool_pre_ping=not self.is_sqlite)
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
            raise StoreError(f"cannot open database {self.url}: {error_reason(e)}") from None
        except SQLAlchemyError as e:
            self.engine.dispose()
            raise StoreError(f"cannot use database {self.url}: {error_reason(e)}") from None

    # -- schema --------------------------------------------------------------------------------------------------
    def _alembic(self, connection) -> Config:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        return config

    def upgrade(self) -> None:
        """Bring the schema to the newest revision; one process at a time (file lock / advisory lock). A database
        at a revision this code does not know (written by a newer repbench) is refused before anything is written."""
        with self.engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            script = ScriptDirectory.from_config(self._alembic(connection))
            known = {rev.revision for rev in script.walk_revisions()}
            head = script.get_current_head()
        if current is not None and current not in known:
            raise StoreError(f"the database {self.url} is at schema revision {current}, newer than this repbench "
                             f"knows (head {head}): update repbench to use it")
        if current == head:
            return
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
            raise StoreError(f"database {self.url} schema is at {current}, this repbench needs {head} "
                             "('run_suite TABLE' upgrades it)")

    def schema_revision(self) -> str | None:
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @contextmanager
    def _migration_lock(self):
        """SQLite: an exclusive flock on the database's folder (no lock file is left behind); PostgreSQL takes an
        advisory lock inside the migration's transaction instead."""
        if not self.is_sqlite:
            yield
            return
        fd = os.open(Path(make_url(self._url).database).resolve().parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

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
        includes the config hash, so the same key always carries the same config. Invocations that create the same
        run at once: one insert wins, the others read it."""
        for _ in range(2):
            try:
                with self.session() as s:
                    run = s.scalar(select(Run).where(Run.run_key == spec.run_key))
                    if run is None:
                        run = Run(run_key=spec.run_key, table_name=spec.table_name, row_name=spec.row_name,
                                  scale=spec.scale, seed=spec.seed, config_hash=spec.config_hash,
                                  status="scheduled", attempt=0)
                        run.params = [Param(key=k, value=v) for k, v in _flatten(spec.config).items()]
                        s.add(run)
                    return run
            except IntegrityError:
                continue  # another process inserted it between our read and our write
        raise StoreError(f"cannot create run {spec.run_key[:12]}")

    # -- claims: one worker per run (runners/claims.py holds the lease; these are its SQL) -------------------------
    def claim(self, run_id: int, *, lease_s: float, host: str, pid: int | None, executor: str,
              slurm_job_id: str | None = None, since_ms: int | None = None, force: bool = False) -> Claim | None:
        """Take the run, or None if it is not to be taken: one atomic conditional UPDATE, so of any number of
        workers trying at once exactly one gets it. Claimable: ``scheduled``; ``running`` under an expired lease
        (its worker is gone: its attempt becomes ``lost``); ``failed`` (and with ``force`` also finished and
        diverged) when it ended before ``since_ms`` (the start of the invocation or submission that asks, so that
        concurrent invocations do not each redo it). A live lease is never taken. The claimed run's partial metrics
        and environment from an earlier attempt are removed in the same transaction."""
        now = now_ms()
        owner = uuid.uuid4().hex
        ended_before = Run.ended_ms < (now if since_ms is None else since_ms)
        retry = ("failed", "finished", "diverged") if force else ("failed",)
        claimable = or_(Run.status == "scheduled",
                        and_(Run.status == "running", Run.lease_expires_ms < now),
                        and_(Run.status.in_(retry), ended_before))
        with self.session() as s:
            taken = s.execute(update(Run).where(Run.id == run_id, claimable).values(
                status="running", owner=owner, lease_expires_ms=now + int(lease_s * 1000), heartbeat_ms=now,
                attempt=Run.attempt + 1, pid=pid, host=host, executor=executor, slurm_job_id=slurm_job_id,
                started_ms=now, ended_ms=None, error=None, traceback=None, diverged_step=None,
            ).execution_options(synchronize_session=False))
            if taken.rowcount != 1:
                return None
            attempt = s.scalar(select(Run.attempt).where(Run.id == run_id))
            s.execute(update(Attempt).where(Attempt.run_id == run_id, Attempt.status == "running").values(
                status="lost", ended_ms=now,
                error="its lease expired (the worker died, hung or lost the database); another worker took the run"))
            s.execute(delete(Metric).where(Metric.run_id == run_id))
            s.execute(delete(Environment).where(Environment.run_id == run_id))
            s.add(Attempt(run_id=run_id, attempt=attempt, owner=owner, status="running", executor=executor,
                          host=host, pid=pid, slurm_job_id=slurm_job_id, started_ms=now))
        return Claim(run_id, owner, attempt)

    def renew(self, claim: Claim, lease_s: float) -> bool:
        """Heartbeat: extend the lease. False if the run is no longer this claim's."""
        with self.session() as s:
            return self._renew(s, claim.run_id, claim.owner, lease_s) == 1

    @staticmethod
    def _renew(s: Session, run_id: int, owner: str, lease_s: float | None = None) -> int:
        now = now_ms()
        values = {"heartbeat_ms": now} | ({"lease_expires_ms": now + int(lease_s * 1000)} if lease_s else {})
        return s.execute(update(Run).where(Run.id == run_id, Run.owner == owner, Run.status == "running")
                         .values(**values).execution_options(synchronize_session=False)).rowcount

    def _guard(self, s: Session, run_id: int, owner: str | None) -> None:
        """Inside a write: proceed only while ``owner`` holds the run (row-locks it until the commit, so a worker
        that lost its lease can never write into the next attempt's results)."""
        if owner is not None and self._renew(s, run_id, owner) != 1:
            raise LeaseLost(f"run {run_id} is no longer held by this worker (its lease expired and another worker "
                            "took it, or it was finished)")

    def expire_leases_of_dead(self, host: str, pid_alive) -> list[int]:
        """On ``host``, a lease whose owner process is gone (``pid_alive(pid) -> bool``) expires at once: a killed
        worker's run is claimable immediately instead of after its lease."""
        expired = []
        with self.session() as s:
            for run in s.scalars(select(Run).where(Run.status == "running", Run.host == host)):
                if run.pid is not None and not pid_alive(run.pid):
                    s.execute(update(Run).where(Run.id == run.id, Run.owner == run.owner, Run.status == "running")
                              .values(lease_expires_ms=0).execution_options(synchronize_session=False))
                    expired.append(run.id)
        return expired

    def expire_lease_of_job(self, run_id: int, slurm_job_id: str) -> None:
        """A requeued Slurm job expires the lease its earlier incarnation left (Slurm never runs one job id
        twice at once, so that worker is gone) and can claim the run without waiting for the lease to run out."""
        with self.session() as s:
            s.execute(update(Run).where(Run.id == run_id, Run.status == "running", Run.slurm_job_id == slurm_job_id)
                      .values(lease_expires_ms=0).execution_options(synchronize_session=False))

    def mark_submitted(self, run_id: int, slurm_job_id: str) -> None:
        """A scheduled run was submitted as this Slurm job (a re-invocation does not submit it again while the job
        is queued)."""
        with self.session() as s:
            s.execute(update(Run).where(Run.id == run_id, Run.status.in_(("scheduled", "failed")))
                      .values(slurm_job_id=slurm_job_id, executor="slurm")
                      .execution_options(synchronize_session=False))

    def runs(self, ids) -> dict[int, Run]:
        with self.session() as s:
            return {run.id: run for run in s.scalars(select(Run).where(Run.id.in_(list(ids))))}

    def attempts_frame(self, table_name: str | None = None) -> pd.DataFrame:
        query = select(Attempt.run_id, Run.table_name, Run.row_name, Run.scale, Run.seed, Attempt.attempt,
                       Attempt.status, Attempt.owner, Attempt.executor, Attempt.host, Attempt.pid,
                       Attempt.slurm_job_id, Attempt.started_ms, Attempt.ended_ms, Attempt.error,
                       Attempt.traceback).join(Run)
        if table_name:
            query = query.where(Run.table_name == table_name)
        with self.engine.connect() as c:
            return pd.DataFrame(c.execute(query.order_by(Attempt.run_id, Attempt.attempt)).mappings().all(),
                                columns=[col.name for col in query.selected_columns])

    def log_metrics(self, run_id: int, records: list[MetricRecord], owner: str | None = None) -> None:
        """Store measured values; with ``owner``, only while that claim holds the run (else LeaseLost)."""
        with self.session() as s:
            self._guard(s, run_id, owner)
            for r in records:
                finite = r.value is not None and math.isfinite(r.value)
                s.add(Metric(run_id=run_id, name=r.name, value=r.value if finite else None,
                             is_nan=r.value is not None and not finite, unit=r.unit, step=r.step, device=r.device,
                             batch=r.batch, resolution=r.resolution, dtype=r.dtype, threads=r.threads,
                             method=r.method))

    def log_environment(self, run_id: int, env: dict, owner: str | None = None) -> None:
        with self.session() as s:
            self._guard(s, run_id, owner)
            s.merge(Environment(run_id=run_id, **env))

    def finish_run(self, run_id: int, status: str, error: str | None = None, traceback: str | None = None,
                   diverged_step: int | None = None, claim: Claim | None = None, attempt_status: str | None = None
                   ) -> bool:
        """End a run (and, with ``claim``, its attempt: only if the claim still holds it; False otherwise). A
        preempted attempt leaves its run ``scheduled`` for the requeued job or the next invocation."""
        with self.session() as s:
            query = update(Run).where(Run.id == run_id)
            if claim is not None:
                query = query.where(Run.owner == claim.owner, Run.status == "running")
            ended = now_ms()
            done = s.execute(query.values(status=status, ended_ms=ended, error=error, traceback=traceback,
                                          diverged_step=diverged_step, lease_expires_ms=None)
                             .execution_options(synchronize_session=False)).rowcount == 1
            if done and claim is not None:
                s.execute(update(Attempt).where(Attempt.run_id == run_id, Attempt.attempt == claim.attempt)
                          .values(status=attempt_status or status, ended_ms=ended, error=error, traceback=traceback))
        return done

    def log_artifact(self, run_id: int, kind: str, path: str, size_bytes: int, sha256: str,
                     epoch: int | None = None, owner: str | None = None) -> None:
        """Record (or update) a file the run left (checkpoint, log, weights_train, weights_deploy, scales) or consumed
        (input_scales)."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}; known: {ARTIFACT_KINDS}")
        with self.session() as s:
            self._guard(s, run_id, owner)
            artifact = s.scalar(select(Artifact).where(Artifact.run_id == run_id, Artifact.path == path))
            if artifact is None:
                artifact = Artifact(run_id=run_id, path=path)
                s.add(artifact)
            artifact.kind, artifact.size_bytes, artifact.sha256, artifact.epoch = kind, size_bytes, sha256, epoch
            artifact.created_ms = now_ms()

    def log_events(self, run_id: int, events: list[dict], owner: str | None = None) -> None:
        """Record structure changes (dicts with epoch, kind, site, branches, score); an event recorded again (a run
        resumed before its checkpoint held the change) replaces the first record."""
        for e in events:
            if e["kind"] not in EVENT_KINDS:
                raise ValueError(f"unknown event kind {e['kind']!r}; known: {EVENT_KINDS}")
        with self.session() as s:
            self._guard(s, run_id, owner)
            for e in events:
                row = s.scalar(select(Event).where(Event.run_id == run_id, Event.epoch == e["epoch"],
                                                   Event.kind == e["kind"], Event.site == e["site"]))
                if row is None:
                    row = Event(run_id=run_id, epoch=e["epoch"], kind=e["kind"], site=e["site"])
                    s.add(row)
                row.branches, row.score = json.dumps(list(e.get("branches") or [])), e.get("score")
                row.created_ms = now_ms()

    def events_frame(self, table_name: str | None = None, run_id: int | None = None) -> pd.DataFrame:
        """Structure changes in the order they happened (branches as lists)."""
        query = select(Event.run_id, Run.table_name, Run.row_name, Run.scale, Run.seed, Event.epoch, Event.kind,
                       Event.site, Event.branches, Event.score).join(Run)
        if table_name:
            query = query.where(Run.table_name == table_name)
        if run_id is not None:
            query = query.where(Event.run_id == run_id)
        with self.engine.connect() as c:
            frame = pd.DataFrame(c.execute(query.order_by(Event.run_id, Event.epoch, Event.id)).mappings().all(),
                                 columns=["run_id", "table_name", "row_name", "scale", "seed", "epoch", "kind", "site",
                                          "branches", "score"])
        frame["branches"] = [json.loads(b) for b in frame["branches"]]
        return frame

    def remove_artifacts(self, run_id: int, path: str | None = None, owner: str | None = None) -> None:
        """Forget one artifact (``path``) or all of a run's (its files were removed)."""
        with self.session() as s:
            self._guard(s, run_id, owner)
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

    # -- reading (reports) ---------------------------------------------------------------------------------------
    def runs_frame(self, table_name: str | None = None) -> pd.DataFrame:
        query = select(Run.id, Run.run_key, Run.table_name, Run.row_name, Run.scale, Run.seed, Run.config_hash,
                       Run.status, Run.attempt, Run.executor, Run.host, Run.pid, Run.slurm_job_id, Run.started_ms,
                       Run.ended_ms, Run.heartbeat_ms, Run.lease_expires_ms, Run.error, Run.diverged_step)
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

    def superseded(self, spec: RunSpec) -> dict[int, list[str]]:
        """Finished (or diverged) runs of the same table, row, scale and seed as ``spec`` but another config: run id
        -> the config keys that differ (e.g. ``code.source``, ``recipe.lr``). Their numbers are not ``spec``'s."""
        new = _flatten(spec.config)
        with self.session() as s:
            old = s.scalars(select(Run).where(
                Run.table_name == spec.table_name, Run.row_name == spec.row_name, Run.scale == spec.scale,
                Run.seed == spec.seed, Run.config_hash != spec.config_hash, Run.status.in_(("finished", "diverged"))))
            out = {}
            for run in old:
                params = {p.key: p.value for p in run.params}
                out[run.id] = sorted(k for k in params.keys() | new.keys() if params.get(k) != new.get(k))
            return out

    def runs_matching(self, params: dict, status: str = "finished") -> pd.DataFrame:
        """Runs (``runs_frame``'s columns) in ``status`` whose config holds every value of ``params`` (nested dicts
        match key by key, as the config is stored), newest first: e.g. the classification runs of one backbone."""
        query = select(Run.id, Run.run_key, Run.table_name, Run.row_name, Run.scale, Run.seed, Run.ended_ms).where(
            Run.status == status)
        for key, value in _flatten(params).items():
            query = query.where(Run.id.in_(select(Param.run_id).where(Param.key == key, Param.value == value)))
        with self.engine.connect() as c:
            return pd.DataFrame(c.execute(query.order_by(Run.ended_ms.desc(), Run.id.desc())).mappings().all(),
                                columns=[col.name for col in query.selected_columns])

    def params_of(self, run_id: int) -> dict[str, object]:
        with self.session() as s:
            return {p.key: json.loads(p.value) for p in s.scalars(select(Param).where(Param.run_id == run_id))}


def error_reason(error: BaseException) -> str:
    """The first line of an error's message; for a database error, the driver's (never the URL, so never a
    password)."""
    orig = getattr(error, "orig", None) or error
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per commit; safe against a crashed process
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
