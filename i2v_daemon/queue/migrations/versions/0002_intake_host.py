"""Several hosts share one inbox: record which host took each job's files in (`intake_host`).

`host` and `device` (the worker that last claimed the job) were there from the start; with many
hosts scanning one inbox it also matters who moved the files out of it, when one goes missing.
Additive and nullable, so a daemon of the previous release keeps working against it.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("intake_host", sa.String(255)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite before 3.35 cannot drop a column in place
        batch.drop_column("intake_host")
