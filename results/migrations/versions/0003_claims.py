"""Claims: a run's owner token, lease expiry and heartbeat; every attempt kept with its error and traceback.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ATTEMPT_STATUSES = ("running", "finished", "failed", "diverged", "preempted", "lost")


def upgrade():
    op.add_column("runs", sa.Column("owner", sa.String(64)))
    op.add_column("runs", sa.Column("lease_expires_ms", sa.BigInteger))
    op.add_column("runs", sa.Column("heartbeat_ms", sa.BigInteger))
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("executor", sa.String(20)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("slurm_job_id", sa.String(64)),
        sa.Column("started_ms", sa.BigInteger, nullable=False),
        sa.Column("ended_ms", sa.BigInteger),
        sa.Column("error", sa.Text),
        sa.Column("traceback", sa.Text),
        sa.UniqueConstraint("run_id", "attempt", name="attempt_per_run"),
        sa.CheckConstraint(f"status IN {ATTEMPT_STATUSES}", name="attempt_status"),
    )
    op.create_index("ix_attempts_run_id", "attempts", ["run_id"])


def downgrade():
    op.drop_table("attempts")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("heartbeat_ms")
        batch.drop_column("lease_expires_ms")
        batch.drop_column("owner")
