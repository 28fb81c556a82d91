"""What `status` prints: the counts, who is paused, the problems daemons reported, and the newest jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from i2v_daemon.logs import terminal_safe
from i2v_daemon.queue.jobs import JobStatus
from i2v_daemon.views.jobs import iso, job_summary

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store

#: `status` estimates when the first this many queued jobs finish (`show` does it for any job).
QUEUE_ETA_DEPTH = 100


def status_document(store: Store, limit: int) -> dict[str, Any]:
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


#: The table's columns before NAME / RESULT: header, width, right-aligned.
COLUMNS = (("ID", 6, True), ("STATUS", 9, False), ("PROGRESS", 8, True), ("PHASE", 15, False), ("ETA", 6, True),
           ("TRIES", 5, True), ("SIZE", 13, True), ("CREATED", 19, False), ("HOST/DEVICE", 20, False))
#: Left out in this order when the terminal is too narrow (`show` has them all).
LEAST_NEEDED = ("HOST/DEVICE", "CREATED", "SIZE", "TRIES", "PROGRESS")
#: Room kept for NAME / RESULT before a column is left out.
NAME_ROOM = 30


def _table(rows: list[tuple[dict[str, str], str]], width: int | None) -> list[str]:
    """The header and one line per job, each fitted to `width` columns (None: all columns, whole lines)."""
    columns = list(COLUMNS)
    for name in LEAST_NEEDED:
        if width is None or sum(w + 2 for _, w, _ in columns) + NAME_ROOM <= width:
            break
        columns = [c for c in columns if c[0] != name]

    def line(cells: dict[str, str], last: str) -> str:
        text = "  ".join(f"{cells[h]:>{w}}" if right else f"{cells[h]:{w}}" for h, w, right in columns)
        text = terminal_safe(f"{text}  {last}")  # escaped first: an escape is as wide as it is written
        return text if width is None or len(text) <= width else text[: max(1, width - 1)] + "…"

    return [line({h: h for h, _, _ in columns}, "NAME / RESULT"), *(line(cells, last) for cells, last in rows)]


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def render_status(store: Store, limit: int, *, now: datetime | None = None, width: int | None = None) -> str:
    """The counts, the pause, the problems and a table of the newest `limit` jobs; `width`: the terminal's columns.

    The table fits `width` (a terminal of 80 columns shows each job on one line): the least needed
    columns are left out first, then the name and result are cut with `…`. Without a width (a pipe,
    a file) every column is there, whole.
    """
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
    waits_for = next((p["message"] for p in problems if p.get("what") == "model"), None)
    rows = []
    for j in jobs:
        s = job_summary(j, now=now)
        result = j.output or ((j.error or {}).get("message") if j.status is not JobStatus.SUCCEEDED else "") or ""
        if j.status in (JobStatus.QUEUED, JobStatus.STAGING) and (result or waits_for):
            result = f"waiting: {result or waits_for}"  # its own wait (a backoff), else the daemons' (the model)
        if s["lease_expired_seconds"] is not None:
            result = gone_text(s)
        if j.cancel_requested and not j.status.is_terminal:
            result = "cancel requested" + (f"; {result}" if result else "")
        # The host and GPU that ran it last; for an input turned down at intake, the host that did it.
        where = "/".join(x for x in (j.host, j.device) if x) or (
            j.extra.get("intake_host") if j.status.is_terminal else None) or "-"
        phase = phase_text(s) if j.status is JobStatus.RUNNING else ("staging" if j.status is JobStatus.STAGING else "")
        eta = (estimator.remaining(j, now) if estimator and s["lease_expired_seconds"] is None else None) if (
            j.status is JobStatus.RUNNING) else queue_eta.get(j.id)
        cells = {
            "ID": str(j.id), "STATUS": s["status"], "PROGRESS": f"{j.progress * 100:7.0f}%", "PHASE": phase or "-",
            "ETA": _eta(eta), "TRIES": str(j.attempts), "SIZE": f"{j.width}x{j.height}x{j.num_frames}" if j.width
            else "-", "CREATED": (iso(j.created_at) or "")[:19].replace("T", " "), "HOST/DEVICE": where,
        }
        rows.append((cells, f"{_short(j.name)}{'  ' + result if result else ''}"))
    lines += _table(rows, width)
    return "\n".join(terminal_safe(line) for line in lines)
