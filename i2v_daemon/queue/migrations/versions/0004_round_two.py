"""Round 2: staging, progress phases, the events feed's cursor, API idempotency, the webhook outbox.

- `jobs.updated_us` (µs since the epoch of the row's last change, indexed): `serve`'s events feed
  reads what changed since its cursor instead of re-reading every job.
- `jobs.phase`, `jobs.phase_started_at`: what a running job is doing (loading, denoising i/N,
  encoding, …), for `status`, the page and the ETA.
- `jobs.source`: the inbox folder a job came from ("inbox", "inbox/fast") or "api".
- `jobs.idempotency_key` (unique where set): a retried `POST /api/v1/jobs` returns the first job.
- `jobs.notes`: what was adjusted (rounding, conversions), for `show` as the manifest has it.
- `outbox`: notifications owed for finished jobs (webhooks, the on_finish hook), written in the
  transaction that finishes the job, so a crash cannot lose one.
The new status value `staging` needs no schema change. Additive only: a daemon of the previous
release keeps working against it (it never claims `staging` rows).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("updated_us", sa.BigInteger))
    op.add_column("jobs", sa.Column("phase", sa.String(32)))
    op.add_column("jobs", sa.Column("phase_started_at", sa.DateTime))
    op.add_column("jobs", sa.Column("source", sa.String(255)))
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(255)))
    op.add_column("jobs", sa.Column("notes", sa.JSON(none_as_null=True)))
    op.create_index("ix_jobs_updated_us", "jobs", ["updated_us"])
    op.create_index("ix_jobs_idempotency_key", "jobs", ["idempotency_key"], unique=True)
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("payload", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("next_at", sa.DateTime, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("done_at", sa.DateTime),
        sa.Column("delivered", sa.Boolean, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("claimed_by", sa.String(255)),
        sa.Column("claim_until", sa.DateTime),
    )
    op.create_index("ix_outbox_job_id", "outbox", ["job_id"])
    op.create_index("ix_outbox_next_at", "outbox", ["next_at"])


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_index("ix_jobs_idempotency_key", "jobs")
    op.drop_index("ix_jobs_updated_us", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("notes", "idempotency_key", "source", "phase_started_at", "phase", "updated_us"):
            batch.drop_column(name)
