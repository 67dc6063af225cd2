"""The results schema (MLflow's tracking store, trimmed to what a benchmark needs).

Times are integer milliseconds since the epoch; NaN/inf are stored as a flag (not portable across SQL engines).
The schema itself is created and changed only by the Alembic migrations in ``results/migrations``.
"""

from __future__ import annotations

import time

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

STATUSES = ("scheduled", "running", "finished", "failed", "diverged")
# An attempt ends as its run would, or ``preempted`` (stopped by a signal after a checkpoint; the run is scheduled
# again) or ``lost`` (its lease expired: the worker died or lost the database, and another worker took the run).
ATTEMPT_STATUSES = ("running", "finished", "failed", "diverged", "preempted", "lost")


def now_ms() -> int:
    return int(time.time() * 1000)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(f"status IN {STATUSES}", name="run_status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_key: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    table_name: Mapped[str] = mapped_column(String(100), nullable=False, index=True)
    row_name: Mapped[str] = mapped_column(String(200), nullable=False)
    scale: Mapped[str] = mapped_column(String(20), nullable=False)
    seed: Mapped[int] = mapped_column(Integer, nullable=False)
    config_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="scheduled")
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    executor: Mapped[str | None] = mapped_column(String(20))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    slurm_job_id: Mapped[str | None] = mapped_column(String(64))
    created_ms: Mapped[int] = mapped_column(BigInteger, nullable=False, default=now_ms)
    started_ms: Mapped[int | None] = mapped_column(BigInteger)
    ended_ms: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    diverged_step: Mapped[int | None] = mapped_column(Integer)
    # the claim (runners/claims.py): who works on the run, until when the claim holds unless renewed, last renewal
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_ms: Mapped[int | None] = mapped_column(BigInteger)
    heartbeat_ms: Mapped[int | None] = mapped_column(BigInteger)

    params: Mapped[list[Param]] = relationship(back_populates="run", cascade="all, delete-orphan")
    metrics: Mapped[list[Metric]] = relationship(back_populates="run", cascade="all, delete-orphan")
    environment: Mapped[Environment | None] = relationship(back_populates="run", cascade="all, delete-orphan")
    artifacts: Mapped[list[Artifact]] = relationship(back_populates="run", cascade="all, delete-orphan")
    attempts: Mapped[list[Attempt]] = relationship(back_populates="run", cascade="all, delete-orphan")
    events: Mapped[list[Event]] = relationship(back_populates="run", cascade="all, delete-orphan")


class Attempt(Base):
    """One claim of a run by one worker, kept after a retry: where it ran, how it ended, its error and traceback."""

    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("run_id", "attempt", name="attempt_per_run"),
                      CheckConstraint(f"status IN {ATTEMPT_STATUSES}", name="attempt_status"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    owner: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    executor: Mapped[str | None] = mapped_column(String(20))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    slurm_job_id: Mapped[str | None] = mapped_column(String(64))
    started_ms: Mapped[int] = mapped_column(BigInteger, nullable=False)
    ended_ms: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    run: Mapped[Run] = relationship(back_populates="attempts")


class Param(Base):
    """The run's full resolved config, flattened to dotted keys; written once, never changed."""

    __tablename__ = "params"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(250), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)  # JSON
    run: Mapped[Run] = relationship(back_populates="params")


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "name", "step", name="metric_per_step"),
                      Index("metrics_run_id", "run_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    value: Mapped[float | None] = mapped_column(Float(precision=53))
    is_nan: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    unit: Mapped[str] = mapped_column(String(20), nullable=False)
    step: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    device: Mapped[str | None] = mapped_column(String(200))
    batch: Mapped[int | None] = mapped_column(Integer)
    resolution: Mapped[int | None] = mapped_column(Integer)
    dtype: Mapped[str | None] = mapped_column(String(20))
    threads: Mapped[int | None] = mapped_column(Integer)
    method: Mapped[str | None] = mapped_column(Text)  # how it was measured
    created_ms: Mapped[int] = mapped_column(BigInteger, nullable=False, default=now_ms)
    run: Mapped[Run] = relationship(back_populates="metrics")


class Environment(Base):
    __tablename__ = "environments"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    git_commit: Mapped[str | None] = mapped_column(String(64))
    git_dirty: Mapped[bool | None] = mapped_column(Boolean)
    python: Mapped[str] = mapped_column(String(50), nullable=False)
    torch: Mapped[str] = mapped_column(String(50), nullable=False)
    cuda: Mapped[str | None] = mapped_column(String(50))
    mmcv: Mapped[str | None] = mapped_column(String(50))
    device_name: Mapped[str] = mapped_column(String(200), nullable=False)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    platform: Mapped[str | None] = mapped_column(String(200))
    torchvision: Mapped[str | None] = mapped_column(String(50))
    mmengine: Mapped[str | None] = mapped_column(String(50))
    numpy: Mapped[str | None] = mapped_column(String(50))
    cudnn: Mapped[str | None] = mapped_column(String(50))
    driver: Mapped[str | None] = mapped_column(String(50))
    gpu_count: Mapped[int | None] = mapped_column(Integer)
    cpu_affinity: Mapped[str | None] = mapped_column(String(200))  # the CPUs this process may run on, e.g. "0-1"
    command: Mapped[str | None] = mapped_column(Text)  # the run_suite command line, any password masked
    uv_lock_sha256: Mapped[str | None] = mapped_column(String(64))
    run: Mapped[Run] = relationship(back_populates="environment")


# scales: a Hyper-Search run's scales file; input_scales: the file a RepOpt target run consumed (its lineage: the
# path and sha256 of another run's artifact)
ARTIFACT_KINDS = ("checkpoint", "log", "weights_train", "weights_deploy", "scales", "input_scales",
                  "input_weights")  # input_*: what a run consumed (a RepOpt row's scales, a dense row's backbone)


class Artifact(Base):
    """A file a run left on disk (machine-local path), with what verifies it: size and sha256. The final weights
    are what downstream finetuning and quantization consume."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("run_id", "path", name="artifact_per_path"),
                      Index("artifacts_run_id", "run_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)
    kind: Mapped[str] = mapped_column(String(30), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    epoch: Mapped[int | None] = mapped_column(Integer)
    created_ms: Mapped[int] = mapped_column(BigInteger, nullable=False, default=now_ms)
    run: Mapped[Run] = relationship(back_populates="artifacts")


EVENT_KINDS = ("grow", "cut", "collapse")


class Event(Base):
    """A change of a run's network structure while it trained (DyRep: a conv grown, branches cut, a block collapsed
    to a conv), in order; the events rebuild the structure of any epoch (runners/dyrep.py)."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("run_id", "epoch", "kind", "site", name="event_per_site"),
                      Index("events_run_id", "run_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)
    epoch: Mapped[int] = mapped_column(Integer, nullable=False)  # 0-based: after this epoch's training
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    site: Mapped[str] = mapped_column(String(300), nullable=False)  # the module path of the conv / block
    branches: Mapped[str] = mapped_column(Text, nullable=False, default="[]")  # JSON list of branch names
    score: Mapped[float | None] = mapped_column(Float(precision=53))
    created_ms: Mapped[int] = mapped_column(BigInteger, nullable=False, default=now_ms)
    run: Mapped[Run] = relationship(back_populates="events")
