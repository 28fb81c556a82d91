"""Jobs as plain JSON-ready dicts: the one shape `status --json`, `show --json`, the API and its events share."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from i2v_daemon.jobs import Job, JobStatus


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC with a `Z`, or None."""
    return dt.isoformat().replace("+00:00", "Z") if dt else None


def job_summary(job: Job) -> dict[str, Any]:
    """One entry of `status --json` (INTERFACE.md §4)."""
    return {
        "id": job.id,
        "name": job.name,
        "status": job.status.value,
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
        "folder": job.final_dir,
        "host": job.host,
        "device": job.device,
    }


def job_detail(job: Job) -> dict[str, Any]:
    return {
        **job_summary(job),
        "inputs": list(job.inputs),
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "requested": job.params.as_dict() if job.params else None,
        "effective": job.effective,
        "attempts_detail": list(job.tries),
        "max_attempts": job.max_attempts,
        "step": job.step,
        "total_steps": job.total_steps,
        "worker_id": job.worker_id,
        "intake_host": job.extra.get("intake_host"),  # which host took the files from the inbox
        "lease_until": iso(job.lease_until),
        "cancel_requested": job.cancel_requested,
        "model": job.model,
        "error_detail": job.error,
    }


