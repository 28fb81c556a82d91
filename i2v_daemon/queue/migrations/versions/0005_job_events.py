"""The log of job states for the events stream: one row each time a job's shown status changes.

`serve` reads the jobs table for progress, but a state shorter than its poll (a job taken the
moment it is queued, a run of a fraction of a second) would never be seen there. Each row holds
the job's `status --json` entry as it was at that moment, written in the transaction that made
the change. Rows older than a day are deleted by the daemons' housekeeping. Additive only: a
daemon of the previous release keeps working against it (it just writes no rows).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("at_us", sa.BigInteger, nullable=False),
        sa.Column("entry", sa.JSON(none_as_null=True), nullable=False),
    )
    op.create_index("ix_job_events_at_us", "job_events", ["at_us"])


def downgrade() -> None:
    op.drop_table("job_events")
