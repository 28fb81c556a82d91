"""Rows every daemon sharing the database obeys or shows: the pause switch, reported problems, the cards.

A problem is something that keeps work from progressing that is not one job's fault (a model
that cannot be fetched, an inbox file that cannot be moved, a full disk): the daemon that hit
it writes one row, `status` on any host prints it, and the daemon removes it once it is fixed.

A card is a GPU worker's advertisement of the memory it offers a job (`card:` rows, refreshed while
it runs, marked stopped when it stops; a killed worker's stays live for CARD_LIVE_SECONDS): a job
whose need no live card meets says so, and intake refuses a job no card ever seen here could take.
Rows not refreshed for CARD_FORGET_SECONDS are forgotten.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError

from i2v_daemon.queue.clock import aware, db_time, utcnow
from i2v_daemon.queue.schema import control

PROBLEM = "problem:"
CARD = "card:"
#: A card whose worker refreshed it this recently is live (its worker refreshes it every CARD_REFRESH_SECONDS).
CARD_LIVE_SECONDS = 120.0
CARD_REFRESH_SECONDS = 30.0
#: A card not seen for a week is forgotten: intake no longer counts on it.
CARD_FORGET_SECONDS = 7 * 86400.0


class Control:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _put(self, key: str, value: Any, *, by: str | None, now: datetime | None) -> None:
        row = {"value": value, "updated_at": db_time(now or utcnow()), "updated_by": by}
        with self.engine.begin() as conn:
            if conn.execute(update(control).where(control.c.key == key).values(**row)).rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(control.insert().values(key=key, **row))
                except IntegrityError:  # another process inserted it a moment ago: ours is the later word
                    conn.execute(update(control).where(control.c.key == key).values(**row))

    # ---- pause -------------------------------------------------------------------------------------

    def set_paused(self, paused: bool, *, by: str | None = None, now: datetime | None = None) -> None:
        """Stop (or restart) taking new jobs on every worker sharing this database; a running job finishes."""
        self._put("paused", {"paused": paused}, by=by, now=now)

    def pause_state(self) -> dict[str, Any]:
        """`{"paused": bool, "since": datetime | None, "by": str | None}`."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            row = conn.execute(select(control).where(control.c.key == "paused")).mappings().first()
        return _pause(row)

    def overview(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The pause state and every reported problem, in one read (for `status`)."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(select(control).order_by(control.c.updated_at)).mappings().all()
        pause = _pause(next((r for r in rows if r["key"] == "paused"), None))
        return pause, [_problem(r) for r in rows if r["key"].startswith(PROBLEM)]

    # ---- problems ----------------------------------------------------------------------------------

    def report(self, key: str, message: str, *, fix: str = "", by: str, now: datetime | None = None) -> None:
        """Record (or refresh) the problem `key` seen by `by` (a worker id)."""
        self._put(_key(key, by), {"message": message, "fix": fix, "what": key}, by=by, now=now)

    def resolve(self, key: str, *, by: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(control).where(control.c.key == _key(key, by)))

    def resolve_all(self, *, by: str) -> None:
        """A daemon that stops takes its problems with it (a new run reports again what still holds)."""
        with self.engine.begin() as conn:
            conn.execute(delete(control).where(control.c.updated_by == by, control.c.key.like(f"{PROBLEM}%")))

    def problems(self) -> list[dict[str, Any]]:
        """Every reported problem: `{"what", "message", "fix", "by", "since"}`, oldest first."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(
                select(control).where(control.c.key.like(f"{PROBLEM}%")).order_by(control.c.updated_at)
            ).mappings().all()
        return [_problem(r) for r in rows]


    # ---- cards -------------------------------------------------------------------------------------

    def advertise_card(self, worker_id: str, *, host: str, device: str, budget_bytes: int,
                       now: datetime | None = None) -> None:
        """This worker offers `budget_bytes` of its card to jobs (written again while it runs)."""
        now = now or utcnow()
        value = {"worker": worker_id, "host": host, "device": device, "budget_bytes": int(budget_bytes)}
        self._put(CARD + hashlib.sha256(worker_id.encode()).hexdigest()[:48], value, by=worker_id, now=now)
        forgotten = db_time(now - timedelta(seconds=CARD_FORGET_SECONDS))
        with self.engine.begin() as conn:
            conn.execute(delete(control).where(control.c.key.like(f"{CARD}%"), control.c.updated_at < forgotten))

    def retire_card(self, worker_id: str, *, now: datetime | None = None) -> None:
        """The worker stopped: its card is no longer live, and still known (as when it was last seen)."""
        key = CARD + hashlib.sha256(worker_id.encode()).hexdigest()[:48]
        with self.engine.begin() as conn:
            row = conn.execute(select(control.c.value).where(control.c.key == key)).first()
            if row is not None:
                value = {**(row[0] or {}), "stopped": True}
                conn.execute(update(control).where(control.c.key == key).values(value=value))

    def cards(self, *, now: datetime | None = None) -> list[dict[str, Any]]:
        """Every card seen within CARD_FORGET_SECONDS, largest first: `{worker, host, device, budget_bytes,
        seen, live}` (the advertisements delete older rows)."""
        now = now or utcnow()
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(select(control).where(control.c.key.like(f"{CARD}%"))).mappings().all()
        out = []
        for row in rows:
            seen = aware(row["updated_at"])
            age = (now - seen).total_seconds() if seen is not None else float("inf")
            if age <= CARD_FORGET_SECONDS:
                value = row["value"] or {}
                live = age <= CARD_LIVE_SECONDS and not value.get("stopped")
                out.append({**value, "seen": seen, "live": live})
        return sorted(out, key=lambda c: -int(c.get("budget_bytes") or 0))


def _key(what: str, by: str) -> str:
    """The row's key: one per (worker, problem), within the column's 64 characters."""
    return PROBLEM + hashlib.sha256(f"{by}|{what}".encode()).hexdigest()[:48]


def _pause(row: Any) -> dict[str, Any]:
    if row is None or not (row["value"] or {}).get("paused"):
        return {"paused": False, "since": None, "by": None}
    return {"paused": True, "since": aware(row["updated_at"]), "by": row["updated_by"]}


def _problem(row: Any) -> dict[str, Any]:
    return {**(row["value"] or {}), "by": row["updated_by"], "since": aware(row["updated_at"])}
