"""The job table and every transaction on it, named for what it means.

SQLAlchemy connections never leave this module; callers get frozen `Job` values. Every status
change goes through `_set_status`, the one function that writes `jobs.status`: it refuses what
`jobs.TRANSITIONS` does not allow and guards the UPDATE with the expected current status (and the
caller's own conditions: a worker's lease, an intake's ownership, the claim's pick), so a lost race
shows up as a row count of 0 rather than a double write. Every write stamps `updated_us`,
the cursor of the events feed. The outbox and the control switches live in `outbox.py` and
`control.py`; their tables are written here when a job finishes, in the same transaction.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, case, create_engine, event, func, insert, or_, select, update
from sqlalchemy.engine import Connection, RowMapping, make_url
from sqlalchemy.exc import IntegrityError

from i2v_daemon.errors import DatabaseGone, LeaseLost, first_line
from i2v_daemon.queue.clock import db_time, now_us, utcnow
from i2v_daemon.queue.control import Control
from i2v_daemon.queue.jobs import MAX_JOB_ID, TRANSITIONS, Job, JobRequest, JobStatus
from i2v_daemon.queue.outbox import Outbox, OutboxEntry
from i2v_daemon.queue.schema import HEAD, job_events, job_from_row, jobs, metadata

__all__ = ["HEAD", "Describe", "Store", "jobs", "metadata"]

_Q, _R, _S = JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.STAGING.value
_TERMINAL = [s.value for s in JobStatus if s.is_terminal]


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL (None for another database or an in-memory one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return os.path.abspath(parsed.database)


def make_engine(url: str, *, create: bool = True, busy_seconds: float = 30.0) -> Engine:
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
    path = sqlite_path(url)
    if path is not None and create:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    made = {"file": path is not None and os.path.exists(path)}

    def connect() -> sqlite3.Connection:
        # Once the file exists it is opened read-write only, never created again: a jobs.db deleted
        # under a running daemon must be an error, not a silent new empty database.
        if path is None:
            return sqlite3.connect(parsed.database or ":memory:", timeout=busy_seconds, check_same_thread=False)
        if made["file"] or not create:
            from urllib.parse import quote

            uri = "file:" + quote(path) + "?mode=rw"
            return sqlite3.connect(uri, uri=True, timeout=busy_seconds, check_same_thread=False)
        conn = sqlite3.connect(path, timeout=busy_seconds, check_same_thread=False)
        made["file"] = True
        return conn

    engine = create_engine(parsed, creator=connect)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below): pysqlite's implicit BEGIN is DEFERRED, and a deferred
        # transaction that later writes can fail with "database is locked" despite busy_timeout.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(busy_seconds * 1000)}")
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
    if cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return  # WAL is a property of the file: set once, by the first connection that found it unset
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _row(job: JobRequest, status: JobStatus, now: datetime, host: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "name": job.name, "status": status.value, "priority": job.priority, "intake_key": job.intake_key,
        "inputs": list(job.inputs), "prompt": job.prompt, "negative_prompt": job.negative_prompt,
        "params": job.params.as_dict() if job.params else None, "rejection": job.rejection, "attempts": 0,
        "created_at": db_time(now), "progress": 0.0, "step": 0, "total_steps": 0, "cancel_requested": False,
        "tries": [], "intake_host": host, "source": job.source, "idempotency_key": job.idempotency_key,
        "notes": list(job.notes), "need_bytes": job.need_bytes,
        "updated_us": now_us(), **extra,
    }


#: How long a command waits for a database another process holds locked (a daemon waits 30 s).
CLI_BUSY_SECONDS = 10.0


def open_existing(url: str) -> Store:
    """The job database for a command that reads or asks: never created, never migrated.

    Raises DatabaseGone when there is none, ConfigError when its schema is not this release's.
    """
    store = Store(url, create=False, busy_seconds=CLI_BUSY_SECONDS)
    try:
        revision = store.revision()
    except Exception as err:
        store.close()
        raise DatabaseGone(f"cannot open the job database: {first_line(err)}") from err
    if revision != HEAD:
        store.close()
        from i2v_daemon.errors import ConfigError

        older = revision is None or revision < HEAD
        raise ConfigError(
            f"the job database is at schema revision {revision or 'of the first release'}, "
            + (f"older than this i2v-daemon's {HEAD}: start the daemon (or run `i2v-daemon migrate`) to upgrade it"
               if older else f"newer than this i2v-daemon's {HEAD}: upgrade i2v-daemon on this host")
        )
    return store


#: How the events log records a job's state: its `status --json` entry. That shape is presentation
#: (views/), so whoever opens the store for a daemon or the API hands it in; queue/ never imports it.
Describe = Callable[[Job], dict[str, Any]]


class Store:
    def __init__(
        self, url: str, *, max_attempts: int = 3, create: bool = True, busy_seconds: float = 30.0,
        describe: Describe | None = None,
    ) -> None:
        """Open the job database; `create=False` (read-only commands) never makes a file that is not there.

        `describe`: each change of status is logged in `job_events` as `describe(job)`, for the API's
        events stream. Without it no log is kept: a command's store (cancel, retry) needs none.
        """
        self.url = url
        self.path = sqlite_path(url)
        if not create and self.path is not None and not os.path.exists(self.path):
            raise DatabaseGone(
                f"there is no job database at {self.path}; start the daemon once (`i2v-daemon run`), "
                "or check data_dir / database_url"
            )
        self.engine = make_engine(url, create=create, busy_seconds=busy_seconds)
        self.max_attempts = max_attempts
        self.describe = describe
        self.control = Control(self.engine)
        self.outbox = Outbox(self.engine)
        self._identity = self._file_identity()

    def create_schema(self) -> Any:
        """Create or upgrade the schema to this release's revision (Alembic); idempotent, safe to race."""
        from i2v_daemon.queue import migrate  # Alembic only where the schema may change

        upgrade = migrate.upgrade(self.engine)
        self._identity = self._file_identity()
        return upgrade

    def close(self) -> None:
        self.engine.dispose()

    def _file_identity(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def check(self) -> None:
        """Raise DatabaseGone when the SQLite file was deleted or replaced since it was opened.

        SQLite keeps working in an unlinked file, so without this a daemon would go on recording
        jobs that nobody can ever see.
        """
        if self.path is None or self._identity is None:
            return
        now = self._file_identity()
        if now is None:
            raise DatabaseGone(f"the job database {self.path} was deleted while the daemon ran")
        if now != self._identity:
            raise DatabaseGone(f"the job database {self.path} was replaced by another file while the daemon ran")

    def revision(self) -> str | None:
        """The schema revision recorded in the database (None: empty, or from before migrations)."""
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError, ProgrammingError

        try:
            with self._read() as conn:
                found = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, ProgrammingError) as err:  # no such table: empty, or the first release's
            if "alembic_version" not in str(err):
                raise
            return None
        return str(found) if found is not None else None

    def _read(self) -> Any:
        return self.engine.connect().execution_options(readonly=True)

    # ---- intake: a row first, in a state no worker takes; then the files; then queued ---------------

    def stage(
        self, requests: Sequence[JobRequest], *, owner: str, lease_seconds: float, host: str | None = None,
        now: datetime | None = None,
    ) -> list[tuple[Job, bool]]:
        """Insert staging rows owned by `owner` in one transaction; a file instance seen before returns its job."""
        now = now or utcnow()
        lease = db_time(now + timedelta(seconds=lease_seconds))
        out: list[tuple[Job, bool]] = []
        keys = [r.intake_key for r in requests]
        existing = {j.extra.get("intake_key"): j for j in self._by_keys(keys)}
        fresh = [r for r in requests if r.intake_key not in existing]
        ids: dict[str, int] = {}
        if fresh:
            rows = [
                _row(r, JobStatus.STAGING, now, host, max_attempts=self.max_attempts, worker_id=owner,
                     lease_until=lease, phase="staging", phase_started_at=db_time(now))
                for r in fresh
            ]
            try:
                with self.engine.begin() as conn:
                    inserted = conn.execute(insert(jobs).returning(jobs.c.id, sort_by_parameter_order=True), rows)
                    for r, new_id in zip(fresh, inserted.scalars(), strict=True):
                        ids[r.intake_key] = new_id
            except IntegrityError:
                # Another host took one of these files a moment ago: insert one by one, keep theirs.
                ids = {}
                for r, row in zip(fresh, rows, strict=True):
                    try:
                        with self.engine.begin() as conn:
                            key = conn.execute(insert(jobs).values(**row)).inserted_primary_key
                            ids[r.intake_key] = int(key[0]) if key else 0
                    except IntegrityError:
                        dup = self.find_by_key(r.intake_key) or self.find_by_idempotency_key(r.idempotency_key)
                        if dup is None:
                            raise
                        existing[r.intake_key] = dup
        by_id = {j.id: j for j in self._by_ids(list(ids.values()))}
        for r in requests:
            if r.intake_key in ids:
                out.append((by_id[ids[r.intake_key]], True))
            else:
                out.append((existing[r.intake_key], False))
        return out

    def mark_staged(self, job_ids: Iterable[int], owner: str) -> list[int]:
        """staging → queued for the jobs whose files are in work/<id>/input/ (and durable)."""
        ids = list(job_ids)
        if not ids:
            return []
        with self.engine.begin() as conn:
            # Logged as queued: its files are in place (a staging row is not yet a job to watch).
            rows = self._set_status(
                conn, JobStatus.STAGING, JobStatus.QUEUED, jobs.c.id.in_(ids), jobs.c.worker_id == owner,
                values={"worker_id": None, "lease_until": None, "phase": None, "phase_started_at": None},
            )
        return [r["id"] for r in rows]

    def unstage(self, job_id: int, owner: str) -> bool:
        """Forget a staging row whose files could not be moved at all: it never became a job."""
        with self.engine.begin() as conn:
            n = conn.execute(
                jobs.delete().where(jobs.c.id == job_id, jobs.c.status == _S, jobs.c.worker_id == owner)
            ).rowcount
        return n == 1

    def claim_staging(
        self, owner: str, *, lease_seconds: float, now: datetime | None = None, limit: int = 100,
    ) -> list[Job]:
        """Staging rows nobody holds (a retry asked for, an intake that died mid-way): take them over."""
        now = now or utcnow()
        free = (jobs.c.worker_id.is_(None)) | (jobs.c.lease_until < db_time(now))
        pick = select(jobs.c.id).where(jobs.c.status == _S, free).order_by(jobs.c.id).limit(limit)
        with self.engine.begin() as conn:
            ids = conn.execute(
                update(jobs).where(jobs.c.id.in_(pick.scalar_subquery()), jobs.c.status == _S, free)
                .values(worker_id=owner, lease_until=db_time(now + timedelta(seconds=lease_seconds)),
                        updated_us=now_us())
                .returning(jobs.c.id)
            ).scalars().all()
        return self._by_ids(list(ids))

    def enqueue(
        self, req: JobRequest, *, now: datetime | None = None, host: str | None = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job whose files are already in place (tests, tools); intake stages instead."""
        owner = f"enqueue/{os.getpid()}"
        job, created = self.stage([req], owner=owner, lease_seconds=60, host=host, now=now)[0]
        if created:
            self.mark_staged([job.id], owner)
            job = self.get(job.id) or job
        return job, created

    def find_by_key(self, intake_key: str) -> Job | None:
        found = self._by_keys([intake_key])
        return found[0] if found else None

    def find_by_idempotency_key(self, key: str | None) -> Job | None:
        if not key:
            return None
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.idempotency_key == key)).mappings().first()
        return job_from_row(row) if row else None

    def _by_keys(self, keys: list[str]) -> list[Job]:
        out: list[Job] = []
        with self._read() as conn:
            for i in range(0, len(keys), 500):
                rows = conn.execute(select(jobs).where(jobs.c.intake_key.in_(keys[i:i + 500]))).mappings().all()
                out += [_with_key(r) for r in rows]
        return out

    def _by_ids(self, ids: list[int]) -> list[Job]:
        if not ids:
            return []
        with self._read() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.id.in_(ids)).order_by(jobs.c.id)).mappings().all()
        return [job_from_row(r) for r in rows]

    # ---- the worker's side ----------------------------------------------------------------

    def claim_next(
        self, worker_id: str, *, lease_seconds: float, now: datetime | None = None, host: str | None = None,
        device: str | None = None, job_id: int | None = None, housekeeping: bool = False,
        budget_bytes: int | None = None,
    ) -> Job | None:
        """Take the next queued job: rejections, cancels and exhausted jobs first, then priority, then FIFO.

        `housekeeping`: only jobs that need no GPU (a rejection, a cancel, one out of attempts, one
        whose finish was interrupted), so they end at once even while the GPU worker is busy.
        `budget_bytes`: the claiming worker's card; a job known to need more is left to a larger card.
        Attempts are counted only for jobs that will generate.
        """
        now = now or utcnow()
        no_gpu = (
            jobs.c.rejection.is_not(None) | jobs.c.cancel_requested | jobs.c.final_dir.is_not(None)
            | (jobs.c.attempts >= jobs.c.max_attempts)
        )
        asked = jobs.c.rejection.is_not(None) | jobs.c.cancel_requested  # ended at once, whatever the backoff
        pick = select(jobs.c.id).where(jobs.c.status == _Q)
        if job_id is not None:  # a named job is taken even while in backoff
            pick = pick.where(jobs.c.id == job_id)
        else:
            pick = pick.where((jobs.c.not_before.is_(None)) | (jobs.c.not_before <= db_time(now)) | asked)
        if housekeeping:
            pick = pick.where(no_gpu)
        elif budget_bytes is not None:
            pick = pick.where(no_gpu | jobs.c.need_bytes.is_(None) | (jobs.c.need_bytes <= budget_bytes))
        pick = pick.order_by(no_gpu.desc(), jobs.c.priority.desc(), jobs.c.id).limit(1).with_for_update(
            skip_locked=True
        )
        counts = jobs.c.rejection.is_(None) & ~jobs.c.cancel_requested & jobs.c.final_dir.is_(None)
        values = {
            "worker_id": worker_id, "lease_until": db_time(now + timedelta(seconds=lease_seconds)),
            "attempts": jobs.c.attempts + case((counts, 1), else_=0), "started_at": db_time(now),
            "progress": 0.0, "step": 0, "phase": "starting",
            # Where it last ran: a job that ends without the GPU keeps the host and device of its run.
            "host": case((no_gpu, jobs.c.host), else_=host), "device": case((no_gpu, jobs.c.device), else_=device),
            "phase_started_at": db_time(now),
        }
        with self.engine.begin() as conn:
            # One statement: the pick (FOR UPDATE SKIP LOCKED on PostgreSQL; BEGIN IMMEDIATE holds the
            # SQLite file) and the guarded write. Only a job that will generate is seen starting; a
            # cancel, a rejection or a late publish is claimed just to be ended, and its end is logged.
            rows = self._set_status(
                conn, JobStatus.QUEUED, JobStatus.RUNNING, jobs.c.id == pick.scalar_subquery(), values=values,
                logged=lambda r: r["rejection"] is None and not r["cancel_requested"] and r["final_dir"] is None,
            )
        return job_from_row(rows[0]) if rows else None

    def heartbeat(
        self, job_id: int, worker_id: str, *, lease_seconds: float, now: datetime | None = None,
        step: int | None = None, total_steps: int | None = None, phase: str | None = None,
    ) -> bool:
        """Renew the lease and record progress; returns whether a cancel was requested.

        Raises LeaseLost when the job is no longer ours: the caller must stop touching it; and
        DatabaseGone when the SQLite file was deleted or replaced, so a long job stops at its next
        progress write instead of finishing into a file nobody can see.
        """
        self.check()
        now = now or utcnow()
        lease = db_time(now + timedelta(seconds=lease_seconds))
        values: dict[str, Any] = {"lease_until": lease, "updated_us": now_us()}
        if step is not None and total_steps:
            values.update(step=step, total_steps=total_steps, progress=min(1.0, step / total_steps))
        if phase is not None:
            values.update(phase=phase, phase_started_at=db_time(now))
        with self.engine.begin() as conn:
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.worker_id == worker_id)
                .where(jobs.c.status.in_([_R, _S]))
                .values(**values)
                .returning(jobs.c.cancel_requested)
            ).first()
        if row is None:
            raise LeaseLost(f"job {job_id} is no longer owned by {worker_id}")
        return bool(row[0])

    def update_running(self, job_id: int, worker_id: str, **fields: Any) -> None:
        """Record facts about a job this worker holds (effective params, tries, chosen folder); fenced."""
        allowed = {"effective", "tries", "final_dir", "output", "model", "previous_dir", "prompt", "error", "notes",
                   "need_bytes",  # worked out by the first worker with a card to plan for
                   "params", "rejection", "negative_prompt", "priority"}  # the last four: inputs read again
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"update_running cannot set {sorted(bad)}")
        with self.engine.begin() as conn:
            n = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.worker_id == worker_id)
                .where(jobs.c.status.in_([_R, _S]))
                .values(**fields, updated_us=now_us())
            ).rowcount
        if n != 1:
            raise LeaseLost(f"job {job_id} is no longer owned by {worker_id}")

    def finish(
        self, job_id: int, worker_id: str, status: JobStatus, *, now: datetime | None = None,
        error: dict[str, str] | None = None, notify: Sequence[OutboxEntry] = (), frm: JobStatus = JobStatus.RUNNING,
        **fields: Any,
    ) -> None:
        """running (or staging) → succeeded / failed / canceled, only under this worker's lease.

        The notifications owed for it (`notify`: webhooks, the on_finish hook) are written in the
        same transaction, so a crash either keeps the job unfinished or its notifications owed.
        """
        if not status.is_terminal:
            raise ValueError(f"finish() takes a terminal status, not {status}")
        now = now or utcnow()
        values = {"error": error, "finished_at": db_time(now), "lease_until": None, "phase": None, **fields}
        if status is JobStatus.SUCCEEDED:
            values["progress"] = 1.0
        self._transition(
            job_id, frm, status, worker_id=worker_id, values=values,
            also=lambda conn: self.outbox.add(conn, job_id, notify, now=now),
        )

    def requeue(
        self, job_id: int, worker_id: str, *, error: dict[str, Any] | None = None,
        not_before: datetime | None = None, refund_attempt: bool = False,
    ) -> None:
        """running → queued: a transient or environment error (with backoff), or a shutdown that stopped it."""
        values: dict[str, Any] = {
            "error": error, "worker_id": None, "lease_until": None, "not_before": db_time(not_before),
            "progress": 0.0, "step": 0, "phase": None, "phase_started_at": None,
        }
        if refund_attempt:  # not the job's fault: a shutdown, a full disk, a database that went away
            values["attempts"] = case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0)
        self._transition(job_id, JobStatus.RUNNING, JobStatus.QUEUED, worker_id=worker_id, values=values)

    def explain_needs(self, most_bytes: int, reason: Callable[[int], dict[str, str]]) -> list[int]:
        """Queued jobs that need more than `most_bytes` (the largest live card) get `reason(need)` as their error.

        Returns the ids whose error changed; a job already saying so, or showing another error (an environment
        wait's, which counts its waits), is left alone.
        """
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.need_bytes, jobs.c.error)
                .where(jobs.c.status == _Q, jobs.c.need_bytes > most_bytes)
            ).all()
        changed = []
        for job_id, need, error in rows:
            wanted = reason(int(need))
            if error == wanted or (error and error.get("type") != wanted.get("type")):
                continue  # said already, or another reason (a wait's own count) is on it
            with self.engine.begin() as conn:
                n = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == _Q)
                                 .values(error=wanted, updated_us=now_us())).rowcount
            if n:
                changed.append(job_id)
        return changed

    # ---- housekeeping ---------------------------------------------------------------------

    def requeue_expired(self, *, now: datetime | None = None) -> list[int]:
        """Running jobs whose lease ran out (their worker died, hung or stalled) go back to the queue.

        Staging rows whose intake died are released for another intake to finish staging.
        """
        now = now or utcnow()
        return self._release_where(jobs.c.lease_until < db_time(now), "its worker stopped renewing its lease")

    def requeue_workers(self, worker_ids: Iterable[str]) -> list[int]:
        """Jobs held by workers known to be dead (our own previous run) go back to the queue now."""
        ids = list(worker_ids)
        return self._release_where(jobs.c.worker_id.in_(ids), "its worker had stopped") if ids else []

    def forget_events(self, *, older_than_seconds: float) -> int:
        """Delete the events log's rows older than that; returns how many."""
        cutoff = now_us() - int(older_than_seconds * 1_000_000)
        with self.engine.begin() as conn:
            return int(conn.execute(job_events.delete().where(job_events.c.at_us < cutoff)).rowcount or 0)

    def state_log(self, since_us: int, *, limit: int = 10_000) -> list[dict[str, Any]]:
        """The `status --json` entries of the state changes stamped at or after `since_us`, in `seq` order.

        `seq` orders one job's changes as they were committed; `at_us` is each writer's own clock.
        """
        q = (select(job_events.c.entry).where(job_events.c.at_us >= since_us)
             .order_by(job_events.c.seq).limit(limit))
        with self._read() as conn:
            return [dict(e) for (e,) in conn.execute(q).all()]

    def running_workers(self) -> list[str]:
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.worker_id).where(jobs.c.status.in_([_R, _S])).distinct()
            ).all()
        return [r[0] for r in rows if r[0]]

    def _release_where(self, cond: Any, why: str) -> list[int]:
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs).where(jobs.c.status == _S, jobs.c.worker_id.is_not(None), cond)
                .values(worker_id=None, lease_until=None, updated_us=now_us())
            )
            rows = conn.execute(
                select(jobs.c.id, jobs.c.worker_id, jobs.c.phase).where(jobs.c.status == _R, cond)
            ).all()
            for job_id, worker, phase in rows:
                # The reason stays visible on the queued job until it runs again.
                message = f"{why} ({worker}, in {phase or 'an unknown phase'}); it runs again"
                self._set_status(
                    conn, JobStatus.RUNNING, JobStatus.QUEUED, jobs.c.id == job_id, jobs.c.worker_id == worker,
                    values={"worker_id": None, "lease_until": None, "progress": 0.0, "step": 0, "phase": None,
                            "phase_started_at": None, "error": {"type": "lease_expired", "message": message}},
                )
        return [r[0] for r in rows]

    # ---- people's commands: they ask; workers and intake act ------------------------------------

    def request_cancel(self, job_id: int) -> Job | None:
        """Flag a staging, queued or running job for cancellation; a worker finishes it."""
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status.in_([_S, _Q, _R]))
                .values(cancel_requested=True, not_before=None, updated_us=now_us())
            )
        return self.get(job_id)

    def retry(self, job_id: int) -> bool:
        """failed / canceled → staging with a fresh attempt count; intake brings its files back from failed/."""
        job = self.get(job_id)
        if job is None or job.status not in (JobStatus.FAILED, JobStatus.CANCELED):
            return False
        values: dict[str, Any] = {
            "attempts": 0, "error": None, "cancel_requested": False, "finished_at": None, "not_before": None,
            "previous_dir": job.final_dir, "final_dir": None, "output": None, "progress": 0.0, "step": 0,
            "worker_id": None, "lease_until": None, "tries": [], "effective": None, "phase": "staging",
        }
        try:
            self._transition(job_id, job.status, JobStatus.STAGING, values=values)
        except LeaseLost:
            return False
        return True

    # ---- reading --------------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        if not 1 <= job_id <= MAX_JOB_ID:  # no such job (and the driver could not even bind the number)
            return None
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return job_from_row(row) if row else None

    def list_jobs(self, limit: int = 20, *, statuses: Iterable[JobStatus] | None = None) -> list[Job]:
        q = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if statuses is not None:
            q = q.where(jobs.c.status.in_([s.value for s in statuses]))
        with self._read() as conn:
            return [job_from_row(r) for r in conn.execute(q).mappings().all()]

    def counts(self) -> dict[str, int]:
        """Jobs by status, exactly the contract's five: a staging job (files on their way) counts as queued."""
        out = {s.value: 0 for s in JobStatus if s is not JobStatus.STAGING}
        with self._read() as conn:
            for status, n in conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all():
                key = _Q if status == _S else status
                out[key] = out.get(key, 0) + n
        return out

    def changes(self, since_us: int | None = None, *, limit: int = 500) -> list[Job]:
        """Jobs changed at or after `since_us` (µs since the epoch), oldest change first: the events feed."""
        q = select(jobs).order_by(jobs.c.updated_us, jobs.c.id).limit(limit)
        if since_us is not None:
            q = q.where(jobs.c.updated_us >= since_us)
        with self._read() as conn:
            return [job_from_row(r) for r in conn.execute(q).mappings().all()]

    def queue(self, limit: int = 1000) -> list[Job]:
        """Queued jobs in the order workers take them (the page's queue, positions, ETAs)."""
        first = jobs.c.rejection.is_not(None) | jobs.c.cancel_requested
        q = (select(jobs).where(jobs.c.status == _Q).order_by(first.desc(), jobs.c.priority.desc(), jobs.c.id)
             .limit(limit))
        with self._read() as conn:
            return [job_from_row(r) for r in conn.execute(q).mappings().all()]

    def recent_tries(self, limit: int = 200) -> list[dict[str, Any]]:
        """Attempts recorded by the newest `limit` jobs that ran, oldest first (the memory model, ETAs)."""
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
        return float((server - db_time(now)).total_seconds())

    def has_runnable(self, *, now: datetime | None = None) -> bool:
        """Whether a queued (or staging) job is waiting (ignoring backoff when `now` is None)."""
        q = select(jobs.c.id).where(jobs.c.status.in_([_Q, _S])).limit(1)
        if now is not None:
            q = q.where(or_(jobs.c.not_before.is_(None), jobs.c.not_before <= db_time(now)))
        with self._read() as conn:
            return conn.execute(q).first() is not None

    # ---- pause / resume and reported problems: rows every worker sees --------------------------------

    def set_paused(self, paused: bool, *, by: str | None = None, now: datetime | None = None) -> None:
        self.control.set_paused(paused, by=by, now=now)

    def pause_state(self) -> dict[str, Any]:
        return self.control.pause_state()

    def is_paused(self) -> bool:
        return bool(self.pause_state()["paused"])

    # ---- retention: finished jobs older than N days ------------------------------------------

    def finished_before(self, cutoff: datetime, *, limit: int = 500) -> list[Job]:
        """Succeeded, failed and canceled jobs that finished before `cutoff`, oldest first."""
        q = (
            select(jobs).where(jobs.c.status.in_(_TERMINAL)).where(jobs.c.finished_at < db_time(cutoff))
            .order_by(jobs.c.finished_at, jobs.c.id).limit(limit)
        )
        with self._read() as conn:
            return [job_from_row(r) for r in conn.execute(q).mappings().all()]

    def forget(self, job_id: int, *, finished_before: datetime) -> bool:
        """Delete a finished job's row (never its folder); False if it was retried or is newer meanwhile."""
        with self.engine.begin() as conn:
            n = conn.execute(
                jobs.delete().where(jobs.c.id == job_id).where(jobs.c.status.in_(_TERMINAL))
                .where(jobs.c.finished_at < db_time(finished_before))
            ).rowcount
        return n == 1

    # ---- the one place a status is written --------------------------------------------------

    def _transition(
        self, job_id: int, frm: JobStatus, to: JobStatus, *, worker_id: str | None = None,
        values: dict[str, Any] | None = None, also: Any = None,
    ) -> None:
        """One job from `frm` to `to` (under `worker_id`'s lease if given), with `also` in the same transaction.

        Raises LeaseLost when the job was not `frm` (under that worker) any more.
        """
        held = [jobs.c.worker_id == worker_id] if worker_id is not None else []
        with self.engine.begin() as conn:
            rows = self._set_status(conn, frm, to, jobs.c.id == job_id, *held, values=values)
            if len(rows) != 1:
                raise LeaseLost(f"job {job_id} was not {frm.value}" + (f" under {worker_id}" if worker_id else ""))
            if also is not None:
                also(conn)

    def _set_status(
        self, conn: Connection, frm: JobStatus, to: JobStatus, *where: ColumnElement[bool],
        values: Mapping[str, Any] | None = None, logged: Callable[[RowMapping], bool] | None = None,
    ) -> Sequence[RowMapping]:
        """The only writer of `jobs.status`: the rows now in `frm` that match `where` go to `to`; returns them.

        Refuses what `jobs.TRANSITIONS` does not allow. The expected status is in the UPDATE itself, so
        a row another writer moved meanwhile is simply not among the rows returned. Each change is
        logged in `job_events` in the caller's transaction, except a move into staging (a retry: its
        "queued" is logged once intake has its files back) and rows `logged` says are not worth showing.
        """
        if to not in TRANSITIONS[frm]:
            raise ValueError(f"illegal transition {frm.value} → {to.value}")
        rows = conn.execute(
            update(jobs).where(jobs.c.status == frm.value, *where)
            .values(status=to.value, updated_us=now_us(), **(values or {}))
            .returning(*jobs.c)
        ).mappings().all()
        if to is not JobStatus.STAGING:
            self._log_states(conn, [r for r in rows if logged is None or logged(r)])
        return rows

    def _log_states(self, conn: Connection, rows: Sequence[RowMapping]) -> None:
        """Record each row's state in `job_events` as `describe` shows it, in the caller's transaction."""
        if not rows or self.describe is None:
            return
        states = [job_from_row(r) for r in rows]
        conn.execute(insert(job_events), [
            {"job_id": job.id, "status": job.status.shown.value, "at_us": job.updated_us, "entry": self.describe(job)}
            for job in states
        ])


def _with_key(row: Any) -> Job:
    job = job_from_row(row)
    job.extra["intake_key"] = row["intake_key"]
    return job

