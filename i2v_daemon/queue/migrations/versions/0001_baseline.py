"""The job table as the first release made it (with `metadata.create_all`, before Alembic).

A database made by that release has a `jobs` table and no `alembic_version`; `i2v_daemon.queue.migrate`
stamps it with this revision instead of running it, so this file must describe that table exactly.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("intake_key", sa.String(128), nullable=False),
        sa.Column("inputs", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("negative_prompt", sa.Text, nullable=False),
        sa.Column("params", sa.JSON(none_as_null=True)),
        sa.Column("rejection", sa.JSON(none_as_null=True)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("not_before", sa.DateTime),
        sa.Column("worker_id", sa.String(255)),
        sa.Column("lease_until", sa.DateTime),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("total_steps", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("effective", sa.JSON(none_as_null=True)),
        sa.Column("tries", sa.JSON(none_as_null=True)),
        sa.Column("error", sa.JSON(none_as_null=True)),
        sa.Column("final_dir", sa.String(1024)),
        sa.Column("previous_dir", sa.Text),
        sa.Column("output", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("device", sa.String(64)),
        sa.Column("host", sa.String(255)),
        # Unnamed, as create_all made them, so a stamped first-release database has the same constraints.
        sa.UniqueConstraint("intake_key"),
        sa.UniqueConstraint("final_dir"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.drop_table("jobs")
