"""The job table and every transaction on it, named for what it means.

SQLAlchemy sessions never leave this module; callers get frozen `Job` values. Every status
change goes through `_transition`, which refuses what `jobs.TRANSITIONS` does not allow and
guards the UPDATE with the expected current status (and, for a worker, its lease), so a lost
race shows up as a row count of 0 rather than a double write.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError

from i2v_daemon import migrate
from i2v_daemon.jobs import TRANSITIONS, Job, JobRequest, JobStatus, Params

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("priority", Integer, nullable=False, default=0),
    Column("intake_key", String(128), nullable=False, unique=True),
    Column("inputs", JSON(none_as_null=True), nullable=False),
    Column("prompt", Text, nullable=False, default=""),
    Column("negative_prompt", Text, nullable=False, default=""),
    Column("params", JSON(none_as_null=True)),
    Column("rejection", JSON(none_as_null=True)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("not_before", DateTime),  # backoff after a transient error
    Column("worker_id", String(255)),
    Column("lease_until", DateTime),
    Column("progress", Float, nullable=False, default=0.0),
    Column("step", Integer, nullable=False, default=0),
    Column("total_steps", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("effective", JSON(none_as_null=True)),
    Column("tries", JSON(none_as_null=True)),
    Column("error", JSON(none_as_null=True)),
    Column("final_dir", String(1024), unique=True),  # output/S or failed/S once chosen (set before the move)
    Column("previous_dir", Text),  # where a retried job's files were (moved back to work/)
    Column("output", Text),
    Column("model", Text),
    Column("device", String(64)),
    Column("host", String(255)),
    Column("intake_host", String(255)),  # the host whose intake took the files from the inbox (revision 0002)
)

#: Switches every worker sharing this database obeys (revision 0003); one row per key.
control = Table(
    "control",
    metadata,
    Column("key", String(64), primary_key=True),  # "paused"
    Column("value", JSON(none_as_null=True)),
    Column("updated_at", DateTime),
    Column("updated_by", String(255)),  # user@host that flipped it, for `status`
)


class LeaseLost(Exception):
    """This worker no longer owns the job (lease expired and another took it, or it was canceled)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _db_time(dt: datetime | None) -> datetime | None:
    """Stored as naive UTC: SQLite has no time zones, and one convention keeps comparisons right."""
    if dt is None:
        return None
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt


def _aware(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def make_engine(url: str) -> Engine:
    """An engine with the settings the queue's guarantees rest on (WAL, FULL sync, immediate writes)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; we ship psycopg (3)
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        # pre_ping: a pooled connection that a server restart or a network drop killed is replaced on
        # checkout instead of failing the next query. libpq's timeout and keepalives: an unreachable
        # server, or one that vanished mid-query, is an error within a minute, not a hang.
        connect_args: dict[str, Any] = {}
        if parsed.get_driver_name() in ("psycopg", "psycopg2"):
            connect_args = {
                "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                "keepalives_count": 3,
            }
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    if parsed.database and parsed.database != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below): pysqlite's implicit BEGIN is DEFERRED, and a deferred
        # transaction that later writes can fail with "database is locked" despite busy_timeout.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        _enable_wal(cur)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("readonly") else "BEGIN IMMEDIATE")

    return engine


def _enable_wal(cur: Any, wait_seconds: float = 30.0) -> None:
    """PRAGMA journal_mode=WAL, waiting out other processes that are switching the same new file.

    The switch needs an exclusive lock, and SQLite answers "database is locked" at once, without
    consulting busy_timeout, while another connection holds one: several daemons starting on one
    new file at the same moment. WAL is a property of the file, so one switch serves everyone.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Store:
    def __init__(self, url: str, *, max_attempts: int = 3) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.max_attempts = max_attempts

    def create_schema(self) -> migrate.Upgrade:
        """Create or upgrade the schema to this release's revision (Alembic); idempotent, safe to race."""
        return migrate.upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _read(self) -> Any:
        return self.engine.connect().execution_options(readonly=True)

    # ---- intake ---------------------------------------------------------------------------

    def enqueue(
        self, req: JobRequest, *, now: datetime | None = None, host: str | None = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job; if this file instance was seen before (on any host), return that job instead."""
        now = now or utcnow()
        row = {
            "name": req.name,
            "status": JobStatus.QUEUED.value,
            "priority": req.priority,
            "intake_key": req.intake_key,
            "inputs": list(req.inputs),
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "params": req.params.as_dict() if req.params else None,
            "rejection": req.rejection,
            "attempts": 0,
            "max_attempts": self.max_attempts,
            "created_at": _db_time(now),
            "progress": 0.0,
            "step": 0,
            "total_steps": 0,
            "cancel_requested": False,
            "tries": [],
            "intake_host": host,
        }
        try:
            with self.engine.begin() as conn:
                job_id = conn.execute(jobs.insert().values(**row)).inserted_primary_key[0]
            return self.get(job_id), True
        except IntegrityError:
            existing = self.find_by_key(req.intake_key)
            if existing is None:  # not the unique key: a real error
                raise
            return existing, False

    def find_by_key(self, intake_key: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.intake_key == intake_key)).mappings().first()
        return _job(row) if row else None

    # ---- the worker's side ----------------------------------------------------------------

    def claim_next(
        self, worker_id: str, *, lease_seconds: float, now: datetime | None = None, host: str | None = None,
        device: str | None = None, job_id: int | None = None,
    ) -> Job | None:
        """Take the next runnable job (rejections and cancels first, then priority, then FIFO)."""
        now = now or utcnow()
        pick = select(jobs.c.id).where(jobs.c.status == JobStatus.QUEUED.value)
        if job_id is not None:  # a named job (cancel, a rejection) is taken even while in backoff
            pick = pick.where(jobs.c.id == job_id)
        else:
            pick = pick.where((jobs.c.not_before.is_(None)) | (jobs.c.not_before <= _db_time(now)))
        pick = (
            pick
            .order_by(
                (jobs.c.rejection.is_not(None) | jobs.c.cancel_requested).desc(),
                jobs.c.priority.desc(),
                jobs.c.id,
            )
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        with self.engine.begin() as conn:
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == pick.scalar_subquery())
                .where(jobs.c.status == JobStatus.QUEUED.value)
                .values(
                    status=JobStatus.RUNNING.value,
                    worker_id=worker_id,
                    lease_until=_db_time(now + timedelta(seconds=lease_seconds)),
                    attempts=jobs.c.attempts + 1,
                    started_at=_db_time(now),
                    progress=0.0,
                    step=0,
                    host=host,
                    device=device,
                )
                .returning(*jobs.c)
            ).mappings().first()
        return _job(row) if row else None

    def heartbeat(
        self, job_id: int, worker_id: str, *, lease_seconds: float, now: datetime | None = None,
        step: int | None = None, total_steps: int | None = None,
    ) -> bool:
        """Renew the lease (and record progress); returns whether a cancel was requested.

        Raises LeaseLost when the job is no longer ours: the caller must stop touching it.
        """
        now = now or utcnow()
        values: dict[str, Any] = {"lease_until": _db_time(now + timedelta(seconds=lease_seconds))}
        if step is not None and total_steps:
            values.update(step=step, total_steps=total_steps, progress=min(1.0, step / total_steps))
        with self.engine.begin() as conn:
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.worker_id == worker_id)
                .where(jobs.c.status == JobStatus.RUNNING.value)
                .values(**values)
                .returning(jobs.c.cancel_requested)
            ).first()
        if row is None:
            raise LeaseLost(f"job {job_id} is no longer owned by {worker_id}")
        return bool(row[0])

    def update_running(self, job_id: int, worker_id: str, **fields: Any) -> None:
        """Record facts about a running job (effective params, tries, chosen folder); fenced."""
        allowed = {"effective", "tries", "final_dir", "output", "model", "previous_dir", "prompt"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"update_running cannot set {sorted(bad)}")
        with self.engine.begin() as conn:
            n = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.worker_id == worker_id)
                .where(jobs.c.status == JobStatus.RUNNING.value)
                .values(**fields)
            ).rowcount
        if n != 1:
            raise LeaseLost(f"job {job_id} is no longer owned by {worker_id}")

    def finish(
        self, job_id: int, worker_id: str, status: JobStatus, *, now: datetime | None = None,
        error: dict[str, str] | None = None, **fields: Any,
    ) -> None:
        """running → succeeded / failed / canceled, only if this worker still holds the lease."""
        if not status.is_terminal:
            raise ValueError(f"finish() takes a terminal status, not {status}")
        now = now or utcnow()
        values = {"error": error, "finished_at": _db_time(now), "lease_until": None, **fields}
        if status is JobStatus.SUCCEEDED:
            values["progress"] = 1.0
        self._transition(job_id, JobStatus.RUNNING, status, worker_id=worker_id, values=values)

    def requeue(
        self, job_id: int, worker_id: str, *, error: dict[str, str] | None = None,
        not_before: datetime | None = None, refund_attempt: bool = False,
    ) -> None:
        """running → queued: a transient error (with backoff) or a shutdown that stopped the job."""
        values: dict[str, Any] = {
            "error": error, "worker_id": None, "lease_until": None, "not_before": _db_time(not_before),
            "progress": 0.0, "step": 0,
        }
        if refund_attempt:  # a shutdown is not the job's fault
            values["attempts"] = jobs.c.attempts - 1
        self._transition(job_id, JobStatus.RUNNING, JobStatus.QUEUED, worker_id=worker_id, values=values)

    # ---- housekeeping ---------------------------------------------------------------------

    def requeue_expired(self, *, now: datetime | None = None) -> list[int]:
        """Running jobs whose lease ran out (their worker died or hung) go back to the queue."""
        now = now or utcnow()
        return self._requeue_where(jobs.c.lease_until < _db_time(now))

    def requeue_workers(self, worker_ids: Iterable[str]) -> list[int]:
        """Jobs held by workers known to be dead (our own previous run) go back to the queue now."""
        ids = list(worker_ids)
        return self._requeue_where(jobs.c.worker_id.in_(ids)) if ids else []

    def running_workers(self) -> list[str]:
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.worker_id).where(jobs.c.status == JobStatus.RUNNING.value).distinct()
            ).all()
        return [r[0] for r in rows if r[0]]

    def _requeue_where(self, cond: Any) -> list[int]:
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(jobs)
                .where(jobs.c.status == JobStatus.RUNNING.value)
                .where(cond)
                .values(status=JobStatus.QUEUED.value, worker_id=None, lease_until=None, progress=0.0, step=0)
                .returning(jobs.c.id)
            ).all()
        return [r[0] for r in rows]

    # ---- people's commands ----------------------------------------------------------------

    def request_cancel(self, job_id: int) -> Job | None:
        """Flag a queued or running job for cancellation; the worker (or `cancel`) acts on it."""
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .where(jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
                .values(cancel_requested=True)
            )
        return self.get(job_id)

    def retry(self, job_id: int) -> bool:
        """failed / canceled → queued with a fresh attempt count; its files come back from failed/."""
        job = self.get(job_id)
        if job is None or job.status not in (JobStatus.FAILED, JobStatus.CANCELED):
            return False
        values = {
            "attempts": 0, "error": None, "cancel_requested": False, "finished_at": None, "not_before": None,
            "previous_dir": job.final_dir, "final_dir": None, "output": None, "progress": 0.0, "step": 0,
            "worker_id": None,
        }
        try:
            self._transition(job_id, job.status, JobStatus.QUEUED, values=values)
        except LeaseLost:
            return False
        return True

    # ---- reading --------------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return _job(row) if row else None

    def list_jobs(self, limit: int = 20, *, statuses: Iterable[JobStatus] | None = None) -> list[Job]:
        q = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if statuses is not None:
            q = q.where(jobs.c.status.in_([s.value for s in statuses]))
        with self._read() as conn:
            return [_job(r) for r in conn.execute(q).mappings().all()]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in JobStatus}
        with self._read() as conn:
            for status, n in conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all():
                out[status] = n
        return out

    def recent_tries(self, limit: int = 200) -> list[dict[str, Any]]:
        """Attempts recorded by the newest `limit` jobs that ran, oldest first (to refit the memory model)."""
        q = select(jobs.c.tries).where(jobs.c.tries.is_not(None)).where(jobs.c.attempts > 0)
        with self._read() as conn:
            rows = conn.execute(q.order_by(jobs.c.id.desc()).limit(limit)).all()
        return [t for (tries,) in reversed(rows) for t in (tries or [])]

    def clock_offset(self, *, now: datetime | None = None) -> float | None:
        """Seconds the database server's clock runs ahead of this host's (None on SQLite: no server).

        Leases compare times that different hosts wrote, so their clocks must agree to well within
        `lease_seconds`; the server is the one clock every host can compare itself with.
        """
        if self.engine.dialect.name != "postgresql":
            return None
        now = now or utcnow()
        with self._read() as conn:
            server = conn.execute(select(func.timezone("UTC", func.statement_timestamp()))).scalar_one()
        return (server - _db_time(now)).total_seconds()

    def has_runnable(self, *, now: datetime | None = None) -> bool:
        """Whether a queued job is waiting (ignoring backoff when `now` is None)."""
        q = select(jobs.c.id).where(jobs.c.status == JobStatus.QUEUED.value).limit(1)
        if now is not None:
            q = q.where((jobs.c.not_before.is_(None)) | (jobs.c.not_before <= _db_time(now)))
        with self._read() as conn:
            return conn.execute(q).first() is not None

    # ---- pause / resume (`i2v-daemon pause`): every worker checks before claiming -----------------

    def set_paused(self, paused: bool, *, by: str | None = None, now: datetime | None = None) -> None:
        """Stop (or restart) taking new jobs on every worker sharing this database; a running job finishes."""
        value = {"paused": paused}
        row = {"value": value, "updated_at": _db_time(now or utcnow()), "updated_by": by}
        with self.engine.begin() as conn:
            if conn.execute(update(control).where(control.c.key == "paused").values(**row)).rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(control.insert().values(key="paused", **row))
                except IntegrityError:  # another process inserted it a moment ago: ours is the later word
                    conn.execute(update(control).where(control.c.key == "paused").values(**row))

    def pause_state(self) -> dict[str, Any]:
        """`{"paused": bool, "since": datetime | None, "by": str | None}`."""
        with self._read() as conn:
            row = conn.execute(select(control).where(control.c.key == "paused")).mappings().first()
        if row is None or not (row["value"] or {}).get("paused"):
            return {"paused": False, "since": None, "by": None}
        return {"paused": True, "since": _aware(row["updated_at"]), "by": row["updated_by"]}

    def is_paused(self) -> bool:
        return bool(self.pause_state()["paused"])

    # ---- retention: finished jobs older than N days ------------------------------------------

    def finished_before(self, cutoff: datetime, *, limit: int = 500) -> list[Job]:
        """Succeeded, failed and canceled jobs that finished before `cutoff`, oldest first."""
        q = (
            select(jobs)
            .where(jobs.c.status.in_([s.value for s in JobStatus if s.is_terminal]))
            .where(jobs.c.finished_at < _db_time(cutoff))
            .order_by(jobs.c.finished_at, jobs.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [_job(r) for r in conn.execute(q).mappings().all()]

    def forget(self, job_id: int, *, finished_before: datetime) -> bool:
        """Delete a finished job's row (never its folder); False if it was retried or is newer meanwhile."""
        with self.engine.begin() as conn:
            n = conn.execute(
                jobs.delete()
                .where(jobs.c.id == job_id)
                .where(jobs.c.status.in_([s.value for s in JobStatus if s.is_terminal]))
                .where(jobs.c.finished_at < _db_time(finished_before))
            ).rowcount
        return n == 1

    # ---- the one place a status is written --------------------------------------------------

    def _transition(
        self, job_id: int, frm: JobStatus, to: JobStatus, *, worker_id: str | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        if to not in TRANSITIONS[frm]:
            raise ValueError(f"illegal transition {frm.value} → {to.value}")
        stmt = update(jobs).where(jobs.c.id == job_id, jobs.c.status == frm.value)
        if worker_id is not None:
            stmt = stmt.where(jobs.c.worker_id == worker_id)
        with self.engine.begin() as conn:
            n = conn.execute(stmt.values(status=to.value, **(values or {}))).rowcount
        if n != 1:
            raise LeaseLost(f"job {job_id} was not {frm.value}" + (f" under {worker_id}" if worker_id else ""))


def _job(row: Any) -> Job:
    params = row["params"]
    return Job(
        id=row["id"],
        name=row["name"],
        status=JobStatus(row["status"]),
        priority=row["priority"],
        inputs=tuple(row["inputs"] or ()),
        prompt=row["prompt"] or "",
        negative_prompt=row["negative_prompt"] or "",
        params=Params.from_dict(params) if params else None,
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        created_at=_aware(row["created_at"]),  # type: ignore[arg-type]
        started_at=_aware(row["started_at"]),
        finished_at=_aware(row["finished_at"]),
        worker_id=row["worker_id"],
        lease_until=_aware(row["lease_until"]),
        progress=row["progress"] or 0.0,
        step=row["step"] or 0,
        total_steps=row["total_steps"] or 0,
        cancel_requested=bool(row["cancel_requested"]),
        rejection=row["rejection"],
        effective=row["effective"],
        tries=tuple(row["tries"] or ()),
        error=row["error"],
        final_dir=row["final_dir"],
        output=row["output"],
        model=row["model"],
        device=row["device"],
        host=row["host"],
        extra={k: row[k] for k in ("previous_dir", "intake_host") if row[k]},
    )
