"""Claims that fit the card: record the smallest card budget each job can run on (`need_bytes`).

A worker claims only jobs whose need fits its card (or whose need is not known yet); the need is
worked out from the model's configs, at intake where it can be and otherwise by the first worker
that claims the job. Additive and nullable, so a daemon of the previous release keeps working
against it (it ignores the column and claims as before).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("need_bytes", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite before 3.35 cannot drop a column in place
        batch.drop_column("need_bytes")
