"""The outbox table: notifications owed for finished jobs (webhooks, the on_finish hook).

A job's notifications are rows written in the same transaction that finishes the job (see
`Store.finish`), so a crash cannot lose one and a restart delivers what was left. Any daemon
sharing the database may deliver them (`notifications.Sender`): it claims a row for a while
(`claim_until`), tries it, and marks it delivered, due again later, or given up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update

from i2v_daemon.queue.clock import aware, db_time, utcnow
from i2v_daemon.queue.schema import outbox

#: How long a sender owns a row it is delivering; past it, another sender may take it over.
CLAIM_SECONDS = 300.0


@dataclass(frozen=True)
class OutboxEntry:
    """One notification to write beside a finished job."""

    kind: str  # "webhook" | "hook"
    target: str  # the URL, or the hook's argv as JSON
    payload: dict[str, Any]


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: int
    kind: str
    target: str
    payload: dict[str, Any]
    attempts: int  # tries made before this one
    created_at: datetime


class Outbox:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, conn: Connection, job_id: int, entries: Iterable[OutboxEntry], *, now: datetime) -> None:
        """Write `entries` inside the caller's transaction (the one that finishes the job)."""
        rows = [
            {"job_id": job_id, "kind": e.kind, "target": e.target, "payload": e.payload, "created_at": db_time(now),
             "next_at": db_time(now), "attempts": 0, "delivered": False}
            for e in entries
        ]
        if rows:
            conn.execute(insert(outbox), rows)

    def claim(
        self, owner: str, *, kinds: Iterable[str], now: datetime | None = None, limit: int = 1,
    ) -> list[OutboxItem]:
        """Take up to `limit` due rows of `kinds` that nobody else is delivering."""
        now = now or utcnow()
        free = outbox.c.claim_until.is_(None) | (outbox.c.claim_until < db_time(now))
        due = (outbox.c.done_at.is_(None)) & (outbox.c.next_at <= db_time(now)) & free & outbox.c.kind.in_(list(kinds))
        pick = select(outbox.c.id).where(due).order_by(outbox.c.next_at, outbox.c.id).limit(limit)
        pick = pick.with_for_update(skip_locked=True)
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(outbox).where(outbox.c.id.in_(pick.scalar_subquery()), due)
                .values(claimed_by=owner, claim_until=db_time(now + timedelta(seconds=CLAIM_SECONDS)))
                .returning(*outbox.c)
            ).mappings().all()
        return [
            OutboxItem(r["id"], r["job_id"], r["kind"], r["target"], r["payload"] or {}, r["attempts"],
                       aware(r["created_at"]))  # type: ignore[arg-type]
            for r in rows
        ]

    def done(self, item_id: int, owner: str, *, delivered: bool, error: str | None = None,
             now: datetime | None = None) -> None:
        """Delivered, or given up (with why)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(outbox).where(outbox.c.id == item_id, outbox.c.claimed_by == owner)
                .values(done_at=db_time(now or utcnow()), delivered=delivered, last_error=error,
                        attempts=outbox.c.attempts + 1, claimed_by=None, claim_until=None)
            )

    def later(self, item_id: int, owner: str, *, at: datetime, error: str) -> None:
        """Not delivered this time; due again at `at`."""
        with self.engine.begin() as conn:
            conn.execute(
                update(outbox).where(outbox.c.id == item_id, outbox.c.claimed_by == owner)
                .values(next_at=db_time(at), last_error=error, attempts=outbox.c.attempts + 1, claimed_by=None,
                        claim_until=None)
            )

    def pending(self) -> int:
        """Notifications not yet delivered or given up."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            return int(conn.execute(select(func.count()).where(outbox.c.done_at.is_(None))).scalar_one())

    def for_job(self, job_id: int) -> list[dict[str, Any]]:
        """Every notification of one job, as rows (for `show` and the tests)."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(select(outbox).where(outbox.c.job_id == job_id).order_by(outbox.c.id)).mappings()
            return [dict(r) for r in rows]
