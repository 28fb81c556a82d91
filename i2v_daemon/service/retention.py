"""Retention, off by default: what to do with jobs that finished more than `retention_days` ago.

`forget` deletes their database rows and never touches a file: output/ and failed/ stay as they
are. `archive` first moves each job's folder into `<data_dir>/archive/output/` or
`archive/failed/` (its manifest and log go with it), then forgets the row. Either is safe to
interrupt: a row is deleted only after its folder has moved, and a row whose folder is already
gone (moved by an interrupted earlier run, or by a person) is simply forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon import files as folders
from i2v_daemon.logs import get_logger
from i2v_daemon.queue.clock import utcnow
from i2v_daemon.queue.jobs import JobStatus

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store
    from i2v_daemon.settings import Settings

log = get_logger()


@dataclass
class RetentionResult:
    cutoff: datetime | None = None  # jobs that finished before this were handled
    forgotten: list[int] = field(default_factory=list)
    archived: list[tuple[int, str]] = field(default_factory=list)  # (job id, the folder's new place)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (job id, why)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat().replace("+00:00", "Z") if self.cutoff else None,
            "forgotten": self.forgotten,
            "archived": [{"job_id": i, "folder": f} for i, f in self.archived],
            "skipped": [{"job_id": i, "reason": r} for i, r in self.skipped],
        }


def archive_root(settings: Settings) -> Path:
    return Path(settings.data_dir) / "archive"


def apply_retention(
    store: Store, settings: Settings, *, now: datetime | None = None, days: float | None = None,
    action: str | None = None, dry_run: bool = False, batch: int = 500,
) -> RetentionResult:
    """Forget (or archive, then forget) every job that finished more than `days` days before `now`."""
    days = settings.retention_days if days is None else days
    action = action or settings.retention_action
    result = RetentionResult()
    if days <= 0:
        return result
    result.cutoff = (now or utcnow()) - timedelta(days=days)
    seen: set[int] = set()
    while True:
        jobs = [j for j in store.finished_before(result.cutoff, limit=batch + len(seen)) if j.id not in seen]
        for job in jobs:
            seen.add(job.id)
            if dry_run:
                result.forgotten.append(job.id)
                if action == "archive" and job.final_dir:
                    result.archived.append((job.id, str(_archive_dest(settings, job.status, Path(job.final_dir)))))
                continue
            if action == "archive" and job.final_dir:
                try:
                    moved = _archive(settings, job.id, job.status, Path(job.final_dir))
                except OSError as err:  # keep the row: it still says where the files are
                    result.skipped.append((job.id, f"could not move {job.final_dir}: {err}"))
                    log.error("retention_archive_failed", job_id=job.id, folder=job.final_dir, error=str(err))
                    continue
            else:
                moved = None
            if store.forget(job.id, finished_before=result.cutoff):
                result.forgotten.append(job.id)
                if moved is not None:
                    result.archived.append((job.id, str(moved)))
                continue
            result.skipped.append((job.id, "retried or changed meanwhile"))
            if moved is not None and not Path(job.final_dir).exists():  # type: ignore[arg-type]
                # `i2v-daemon retry` took it back a moment ago: its files must be where the row says.
                folders.move_tree(moved, Path(job.final_dir))  # type: ignore[arg-type]
        if len(jobs) < batch or dry_run:
            break
    if result.forgotten or result.skipped:
        log.info(
            "retention", action=action, days=days, dry_run=dry_run, cutoff=result.as_dict()["cutoff"],
            forgotten=len(result.forgotten), archived=len(result.archived), skipped=len(result.skipped),
        )
    return result


def _archive_dest(settings: Settings, status: JobStatus, folder: Path) -> Path:
    kind = "output" if status is JobStatus.SUCCEEDED else "failed"
    return folders.free_name(archive_root(settings) / kind, folder.name)


def _archive(settings: Settings, job_id: int, status: JobStatus, folder: Path) -> Path | None:
    """Move a finished job's folder into the archive; None when it is already gone."""
    if not folder.is_dir():
        log.info("retention_folder_gone", job_id=job_id, folder=str(folder))
        return None
    dest = _archive_dest(settings, status, folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    folders.move_tree(folder, dest)
    log.debug("retention_archived", job_id=job_id, folder=str(dest))
    return dest
