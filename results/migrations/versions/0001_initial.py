"""Initial schema: runs, params, metrics, environments.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = ("scheduled", "running", "finished", "failed", "diverged")  # frozen copy: migrations never import models


def upgrade():
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_key", sa.String(64), nullable=False, unique=True),
        sa.Column("table_name", sa.String(100), nullable=False, index=True),
        sa.Column("row_name", sa.String(200), nullable=False),
        sa.Column("scale", sa.String(20), nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("executor", sa.String(20)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("slurm_job_id", sa.String(64)),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("started_ms", sa.BigInteger),
        sa.Column("ended_ms", sa.BigInteger),
        sa.Column("error", sa.Text),
        sa.Column("traceback", sa.Text),
        sa.Column("diverged_step", sa.Integer),
        sa.CheckConstraint(f"status IN {STATUSES}", name="run_status"),
    )
    op.create_table(
        "params",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.String(250), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("value", sa.Float(precision=53)),
        sa.Column("is_nan", sa.Boolean, nullable=False),
        sa.Column("unit", sa.String(20), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("device", sa.String(200)),
        sa.Column("batch", sa.Integer),
        sa.Column("resolution", sa.Integer),
        sa.Column("dtype", sa.String(20)),
        sa.Column("threads", sa.Integer),
        sa.Column("method", sa.Text),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("run_id", "name", "step", name="metric_per_step"),
    )
    op.create_index("metrics_run_id", "metrics", ["run_id"])
    op.create_table(
        "environments",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("git_commit", sa.String(64)),
        sa.Column("git_dirty", sa.Boolean),
        sa.Column("python", sa.String(50), nullable=False),
        sa.Column("torch", sa.String(50), nullable=False),
        sa.Column("cuda", sa.String(50)),
        sa.Column("mmcv", sa.String(50)),
        sa.Column("device_name", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("platform", sa.String(200)),
    )


def downgrade():
    for table in ("environments", "metrics", "params", "runs"):
        op.drop_table(table)
