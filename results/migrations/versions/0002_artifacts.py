"""Artifacts: the files a run leaves (checkpoints, log, final weights in train and deploy form) with size and sha256.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(30), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("run_id", "path", name="artifact_per_path"),
    )
    op.create_index("artifacts_run_id", "artifacts", ["run_id"])


def downgrade():
    op.drop_table("artifacts")
