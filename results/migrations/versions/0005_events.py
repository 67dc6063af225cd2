"""Events: changes of a run's network structure while it trains (DyRep's grow, cut and collapse), in order.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("site", sa.String(300), nullable=False),
        sa.Column("branches", sa.Text, nullable=False),
        sa.Column("score", sa.Float(precision=53)),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("run_id", "epoch", "kind", "site", name="event_per_site"),
    )
    op.create_index("events_run_id", "events", ["run_id"])


def downgrade():
    op.drop_table("events")
