"""Rows every daemon sharing the database obeys or shows: the pause switch and reported problems.

A problem is something that keeps work from progressing that is not one job's fault (a model
that cannot be fetched, an inbox file that cannot be moved, a full disk): the daemon that hit
it writes one row, `status` on any host prints it, and the daemon removes it once it is fixed.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError

from i2v_daemon.queue.clock import aware, db_time, utcnow
from i2v_daemon.queue.schema import control

PROBLEM = "problem:"


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


def _key(what: str, by: str) -> str:
    """The row's key: one per (worker, problem), within the column's 64 characters."""
    return PROBLEM + hashlib.sha256(f"{by}|{what}".encode()).hexdigest()[:48]


def _pause(row: Any) -> dict[str, Any]:
    if row is None or not (row["value"] or {}).get("paused"):
        return {"paused": False, "since": None, "by": None}
    return {"paused": True, "since": aware(row["updated_at"]), "by": row["updated_by"]}


def _problem(row: Any) -> dict[str, Any]:
    return {**(row["value"] or {}), "by": row["updated_by"], "since": aware(row["updated_at"])}
