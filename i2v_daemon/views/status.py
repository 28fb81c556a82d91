"""What `status` prints: the counts, who is paused, the problems daemons reported, and the newest jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from i2v_daemon.logs import terminal_safe
from i2v_daemon.queue.jobs import JobStatus
from i2v_daemon.views.jobs import iso, job_summary

#: `status` estimates when the first this many queued jobs finish (`show` does it for any job).
QUEUE_ETA_DEPTH = 100


def status_document(store: Any, limit: int) -> dict[str, Any]:
    """`status --json`: exactly the contract's two keys, each job with this release's additions."""
    return {"counts": store.counts(), "jobs": [job_summary(j) for j in store.list_jobs(limit)]}


def phase_text(job: dict[str, Any]) -> str:
    """"denoising 21/50", "loading", "encoding"… for a running job's summary; "worker gone" once its lease ran out."""
    if job.get("lease_expired_seconds") is not None:
        return "worker gone"
    phase = job.get("phase") or "starting"
    if phase == "denoising" and job.get("total_steps"):
        return f"denoising {job.get('step', 0)}/{job['total_steps']}"
    return phase


def gone_text(job: dict[str, Any]) -> str:
    """Why a running job makes no progress: its worker stopped renewing the lease (killed, hung, cut off)."""
    return (f"worker gone, lease expired {_ago(job['lease_expired_seconds'])} ago; it will be taken again "
            "(by the next daemon that looks)")


def _ago(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _short(name: str, most: int = 60) -> str:
    """A name cut to `most` characters for the table (`show` and `--json` give it whole)."""
    return name if len(name) <= most else name[: most - 1] + "…"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def render_status(store: Any, limit: int, *, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    counts = store.counts()
    lines = ["  ".join(f"{k} {v}" for k, v in counts.items())]
    pause, problems = store.control.overview()
    if pause["paused"]:
        since = f"{pause['since']:%Y-%m-%d %H:%M:%S} UTC" if pause["since"] else "?"
        lines.append(f"paused since {since} by {pause['by'] or '?'}: no new job starts (`i2v-daemon resume`)")
    for p in problems:
        fix = f" — {p['fix']}" if p.get("fix") else ""
        lines.append(f"problem ({p.get('by') or '?'}): {p.get('message')}{fix}")
    jobs = store.list_jobs(limit)
    if not jobs:
        return "\n".join(terminal_safe(line) for line in lines)
    estimator = None
    if any(j.status in (JobStatus.RUNNING, JobStatus.QUEUED) for j in jobs):
        from i2v_daemon.views.eta import Estimator

        estimator = Estimator.from_tries(store.recent_tries())
    queue_eta: dict[int, float | None] = {}
    # While paused no queued job starts, so when one would is not known.
    if estimator is not None and not pause["paused"] and any(j.status is JobStatus.QUEUED for j in jobs):
        running = [j for j in store.list_jobs(100, statuses=[JobStatus.RUNNING])]
        queue_eta = estimator.queue_eta(store.queue(QUEUE_ETA_DEPTH), running, now)
    lines.append(
        f"{'ID':>6}  {'STATUS':9}  {'PROGRESS':>8}  {'PHASE':15}  {'ETA':>6}  {'TRIES':>5}  {'SIZE':>13}  "
        f"{'CREATED':19}  {'HOST/DEVICE':20}  NAME / RESULT"
    )
    for j in jobs:
        s = job_summary(j, now=now)
        size = f"{j.width}x{j.height}x{j.num_frames}" if j.width else "-"
        result = j.output or ((j.error or {}).get("message") if j.status is not JobStatus.SUCCEEDED else "") or ""
        if s["lease_expired_seconds"] is not None:
            result = gone_text(s)
        if j.cancel_requested and not j.status.is_terminal:
            result = "cancel requested" + (f"; {result}" if result else "")
        created = (iso(j.created_at) or "")[:19].replace("T", " ")
        # The host and GPU that ran it last; for an input turned down at intake, the host that did it.
        where = "/".join(x for x in (j.host, j.device) if x) or (
            j.extra.get("intake_host") if j.status.is_terminal else None) or "-"
        phase = phase_text(s) if j.status is JobStatus.RUNNING else ("staging" if j.status is JobStatus.STAGING else "")
        eta = (estimator.remaining(j, now) if estimator and s["lease_expired_seconds"] is None else None) if (
            j.status is JobStatus.RUNNING) else queue_eta.get(j.id)
        lines.append(
            f"{j.id:>6}  {s['status']:9}  {j.progress * 100:7.0f}%  {phase or '-':15}  {_eta(eta):>6}  "
            f"{j.attempts:>5}  {size:>13}  {created:19}  {where:20}  {_short(j.name)}{'  ' + result if result else ''}"
        )
    return "\n".join(terminal_safe(line) for line in lines)
