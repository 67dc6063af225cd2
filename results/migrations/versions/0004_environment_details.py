"""Environment details: torchvision, mmengine, numpy, cuDNN, driver, GPU count, CPU affinity, the command line
(any password masked) and the sha256 of uv.lock.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = (("torchvision", sa.String(50)), ("mmengine", sa.String(50)), ("numpy", sa.String(50)),
           ("cudnn", sa.String(50)), ("driver", sa.String(50)), ("gpu_count", sa.Integer),
           ("cpu_affinity", sa.String(200)), ("command", sa.Text), ("uv_lock_sha256", sa.String(64)))


def upgrade():
    for name, kind in COLUMNS:
        op.add_column("environments", sa.Column(name, kind))


def downgrade():
    with op.batch_alter_table("environments") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
