"""The job database's tables (what Alembic's revisions build) and how a row becomes a frozen `Job`.

No transactions here: `store.py` owns every one. Importing this module costs SQLAlchemy's core
only (no ORM, no Alembic), so `status` stays quick.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from i2v_daemon.queue.clock import aware
from i2v_daemon.queue.jobs import Job, JobStatus

#: The schema revision this release reads and writes (`migrate.head()` says the same; a test checks).
HEAD = "0006"

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
    Column("not_before", DateTime),  # backoff after a transient or environment error
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
    # revision 0004
    Column("updated_us", BigInteger, index=True),  # last change, µs since the epoch: the events feed's cursor
    Column("phase", String(32)),  # staging, loading, compiling, denoising, decoding, encoding, publishing, …
    Column("phase_started_at", DateTime),
    Column("source", String(255)),  # "inbox", "inbox/fast" (a preset's folder), "api"
    Column("idempotency_key", String(255)),  # the API's Idempotency-Key header, unique where set
    Column("notes", JSON(none_as_null=True)),  # adjustments made (rounding, conversions), as in the manifest
    # The smallest card budget (bytes) the job can run on: its leanest placement at its smallest size
    # (revision 0006). NULL: not known yet (the first worker with a card to plan for works it out).
    Column("need_bytes", BigInteger),
    Index("ix_jobs_idempotency_key", "idempotency_key", unique=True),
)

#: Switches every worker sharing this database obeys (revision 0003), and the problems each
#: daemon reports (`problem:<host>/<pid>:<what>`), so `status` on any host shows them.
control = Table(
    "control",
    metadata,
    Column("key", String(64), primary_key=True),  # "paused", "problem:…"
    Column("value", JSON(none_as_null=True)),
    Column("updated_at", DateTime),
    Column("updated_by", String(255)),  # user@host that flipped it, for `status`
)

#: Each change of a job's shown status, with its `status --json` entry as it was then (revision
#: 0005), so the events stream never misses a state shorter than its poll.
job_events = Table(
    "job_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("at_us", BigInteger, nullable=False, index=True),
    Column("entry", JSON(none_as_null=True), nullable=False),
)

#: Notifications owed for finished jobs (revision 0004): written in the transaction that finishes
#: the job, delivered by a background sender of any daemon, so none is lost across a crash.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # "webhook" | "hook"
    Column("target", Text, nullable=False),  # the URL, or the hook's argv as JSON
    Column("payload", JSON(none_as_null=True), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("next_at", DateTime, nullable=False, index=True),  # not before this (backoff, Retry-After)
    Column("attempts", Integer, nullable=False, default=0),
    Column("done_at", DateTime),  # delivered, or given up (then `last_error` says why)
    Column("delivered", Boolean, nullable=False, default=False),
    Column("last_error", Text),
    Column("claimed_by", String(255)),
    Column("claim_until", DateTime),
)


def job_from_row(row: Any) -> Job:
    params = row["params"]
    extra = {k: row[k] for k in ("previous_dir", "intake_host", "idempotency_key") if row.get(k)}
    return Job(
        id=row["id"],
        name=row["name"],
        status=JobStatus(row["status"]),
        priority=row["priority"],
        inputs=tuple(row["inputs"] or ()),
        prompt=row["prompt"] or "",
        negative_prompt=row["negative_prompt"] or "",
        params_data=dict(params) if params else None,
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        created_at=aware(row["created_at"]),  # type: ignore[arg-type]
        started_at=aware(row["started_at"]),
        finished_at=aware(row["finished_at"]),
        worker_id=row["worker_id"],
        lease_until=aware(row["lease_until"]),
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
        not_before=aware(row["not_before"]),
        updated_us=row.get("updated_us") or 0,
        phase=row.get("phase"),
        phase_started_at=aware(row.get("phase_started_at")),
        source=row.get("source"),
        notes=tuple(row.get("notes") or ()),
        need_bytes=row.get("need_bytes"),
        extra=extra,
    )
