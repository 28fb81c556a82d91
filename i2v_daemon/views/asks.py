"""What a person may ask of a job (`cancel`, `retry`), decided once for the CLI and the API.

Both only ask: they write the request into the job's row and a daemon acts on it (a worker
finishes a canceled job, intake brings a retried job's files back). Neither ever moves a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from i2v_daemon.queue.jobs import Job, JobStatus

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store


@dataclass(frozen=True)
class Outcome:
    ok: bool
    job: Job | None
    status: int  # as HTTP says it: 200 done, 404 no such job, 409 not allowed now
    message: str  # one sentence for a person
    error: dict[str, str] | None = None  # {"type", "message"} when not ok

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "message": self.message, "error": self.error}


def _no(job: Job | None, status: int, kind: str, message: str) -> Outcome:
    return Outcome(False, job, status, message, {"type": kind, "message": message})


def cancel(store: Store, job_id: int) -> Outcome:
    """Ask for a staging, queued or running job to be canceled; a daemon finishes it within seconds."""
    job = store.get(job_id)
    if job is None:
        return _no(None, 404, "not_found", f"there is no job {job_id}")
    if job.status.is_terminal:
        return _no(job, 409, "conflict", f"job {job_id} is already {job.status.value}; nothing to cancel")
    job = store.request_cancel(job_id) or job
    if job.status.is_terminal:  # it ended in between
        return _no(job, 409, "conflict", f"job {job_id} is already {job.status.value}; nothing to cancel")
    if job.status is JobStatus.RUNNING:
        message = f"job {job_id} is running; cancel requested, it stops at its next step"
    else:
        message = (f"job {job_id} will be canceled as soon as a daemon sees it (within a second or two); "
                   f"its files then go to {job.name} in failed/")
    return Outcome(True, job, 200, message)


def retry(store: Store, job_id: int) -> Outcome:
    """Ask for a failed or canceled job to run again with fresh attempts; its files come back from failed/."""
    job = store.get(job_id)
    if job is None:
        return _no(None, 404, "not_found", f"there is no job {job_id}")
    if job.rejection and not job.inputs:  # a bad row of a batch manifest: its values live in the manifest
        return _no(
            job, 409, "conflict",
            f"job {job_id} is a row of a batch manifest rejected for its values ({job.rejection['message']}); "
            "fix the row and drop the manifest again (rows already made are not made twice)",
        )
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELED) or not store.retry(job_id):
        return _no(
            job, 409, "conflict",
            f"job {job_id} is {job.status.value}; only failed or canceled jobs can be retried",
        )
    job = store.get(job_id) or job
    where = job.extra.get("previous_dir")
    if job.rejection:
        return Outcome(True, job, 200, f"job {job_id} queued again; its files come back from {where} and are read "
                                       "again, as a new drop's are (fixed in place, it runs; still wrong, it fails "
                                       "again saying why)")
    return Outcome(True, job, 200, f"job {job_id} queued again; its files come back from {where}")
