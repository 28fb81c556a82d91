"""Jobs as plain JSON-ready dicts: the one shape `status --json`, `show --json`, the API and its events share."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from i2v_daemon.queue.jobs import Job, JobStatus

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC with a `Z`, or None."""
    return dt.isoformat().replace("+00:00", "Z") if dt else None


def shown_status(job: Job) -> str:
    """The contract's five statuses: a staging job (files on their way into work/) is queued to a user."""
    return job.status.shown.value


def lease_expired_seconds(job: Job, now: datetime | None = None) -> float | None:
    """Seconds since a running job's lease ran out (its worker died or hung: it will be taken again), else None."""
    if job.status is not JobStatus.RUNNING or job.lease_until is None:
        return None
    late = ((now or datetime.now(UTC)) - job.lease_until).total_seconds()
    return round(late, 1) if late > 0 else None


def job_summary(job: Job, *, now: datetime | None = None) -> dict[str, Any]:
    """One entry of `status --json` (INTERFACE.md §4), with this release's additions after the contract's keys."""
    return {
        "id": job.id,
        "name": job.name,
        "status": shown_status(job),
        "progress": round(job.progress, 4),
        "attempts": job.attempts,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "width": job.width,
        "height": job.height,
        "num_frames": job.num_frames,
        "output": job.output,
        "error": (job.error or {}).get("message") if job.status is not JobStatus.SUCCEEDED else None,
        "priority": job.priority,
        "job_dir": job.final_dir,  # its folder in output/ or failed/ (the manifest's `folder` is where it came from)
        "host": job.host,
        "device": job.device,
        "phase": job.phase if job.status in (JobStatus.RUNNING, JobStatus.STAGING) else None,
        "step": job.step,
        "total_steps": job.total_steps,
        "source": job.source,
        "cancel_requested": job.cancel_requested,
        "updated_us": job.updated_us,
        "lease_expired_seconds": lease_expired_seconds(job, now),
        "need_bytes": job.need_bytes,  # the smallest card budget it runs on (None: not worked out yet)
    }


def job_detail(job: Job, *, now: datetime | None = None) -> dict[str, Any]:
    return {
        **job_summary(job, now=now),
        "inputs": list(job.inputs),
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "requested": job.params.as_dict() if job.params else None,
        "effective": job.effective,
        "attempts_detail": list(job.tries),
        "max_attempts": job.max_attempts,
        "worker_id": job.worker_id,
        "intake_host": job.extra.get("intake_host"),  # which host took the files from the inbox
        "lease_until": iso(job.lease_until),
        "not_before": iso(job.not_before),
        "phase_started_at": iso(job.phase_started_at),
        "model": job.model,
        "error_detail": job.error,
        "notes": list(job.notes),
    }


def describe(store: Store, job: Job, *, now: datetime | None = None, estimator: Any = None) -> dict[str, Any]:
    """`show --json` and the API's job: the detail plus `position` (1 = next, queued only) and `eta_seconds`."""
    from i2v_daemon.views.eta import Estimator

    now = now or datetime.now(UTC)
    estimator = estimator or Estimator.from_tries(store.recent_tries())
    out = job_detail(job, now=now)
    out["notifications"] = notifications(store, job.id)
    out["position"] = None
    out["eta_seconds"] = None
    out["elapsed_seconds"] = round((now - job.started_at).total_seconds(), 1) if (
        job.started_at and job.status is JobStatus.RUNNING) else None
    if job.status is JobStatus.RUNNING and out["lease_expired_seconds"] is None:  # a gone worker finishes nothing
        out["eta_seconds"] = estimator.remaining(job, now)
    elif job.status in (JobStatus.QUEUED, JobStatus.STAGING):
        queue = store.queue()
        ids = [q.id for q in queue]
        if job.id not in ids:  # taken (or canceled) since `job` was read: describe it as it is now
            fresher = store.get(job.id)
            if fresher is not None and fresher.status is not job.status:
                return describe(store, fresher, now=now, estimator=estimator)
        if job.id in ids:
            out["position"] = ids.index(job.id) + 1
            if not store.is_paused():  # while paused no queued job starts: when this one will is not known
                running = store.list_jobs(100, statuses=[JobStatus.RUNNING])
                out["eta_seconds"] = estimator.queue_eta(queue[: out["position"]], running, now).get(job.id)
    return out




def notifications(store: Store, job_id: int) -> list[dict[str, Any]]:
    """What the outbox owes or owed for a job (webhooks, notify, the hook), targets shown without their secrets."""
    from i2v_daemon.queue.clock import aware

    outbox = getattr(store, "outbox", None)
    if outbox is None:
        return []
    out = []
    for row in outbox.for_job(job_id):
        if row["done_at"] is None:
            state = "pending" if not row["attempts"] else "retrying"
        else:
            state = "delivered" if row["delivered"] else "gave up"
        out.append({
            "kind": row["kind"], "target": _target(row["kind"], row["target"]), "state": state,
            "tries": row["attempts"], "last_error": row["last_error"], "next_at": iso(aware(row["next_at"])) if
            row["done_at"] is None else None, "done_at": iso(aware(row["done_at"])),
        })
    return out


def _target(kind: str, target: str) -> str:
    if kind == "hook":
        import json

        try:
            return str(json.loads(target)[0])
        except (ValueError, IndexError, TypeError):
            return "?"
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(target)
    except ValueError:
        return "?"
    more = "/…" if parts.path not in ("", "/") or parts.query else ""
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{more}"
