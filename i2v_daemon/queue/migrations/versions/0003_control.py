"""`i2v-daemon pause` / `resume`: a small key-value table of switches every worker obeys.

The flag lives in the database, not in a file, because the database is the one thing every
worker sharing the queue sees (several hosts on one PostgreSQL included), and the CLI that
flips it already has it open. Additive: a daemon of the previous release ignores the table.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "control",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.JSON(none_as_null=True)),
        sa.Column("updated_at", sa.DateTime),
        sa.Column("updated_by", sa.String(255)),
    )


def downgrade() -> None:
    op.drop_table("control")
