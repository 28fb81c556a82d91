"""Finishing a job, whoever finishes it (the worker, intake for a rejection, the housekeeper for a
cancel): manifest, destination, publish, status and notifications — the one owner of work/<id>/.

Order of the steps, each one safe to crash after (a restart completes the rest from the manifest):
  the videos and poster C2PA-signed in place (each into a temp name, then renamed; a crash before
  this step's end leaves a job whose next attempt encodes and signs again) → job.json written into
  work/<id>/ → the destination recorded in the database (a unique column,
  so two daemons never pick the same S-2) → work/<id>/ renamed whole to output/S (or failed/S)
  → the status written, with the job's notifications (webhooks, the on_finish hook) in the same
  transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from i2v_daemon import files as folders
from i2v_daemon.delivery.webhook import job_payload
from i2v_daemon.faults import crashpoint
from i2v_daemon.logs import JobLog
from i2v_daemon.queue.clock import utcnow
from i2v_daemon.queue.jobs import Job, JobStatus
from i2v_daemon.queue.outbox import OutboxEntry
from i2v_daemon.queue.store import Store
from i2v_daemon.work import manifest
from i2v_daemon.work.provenance import Provenance

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings

#: Files in work/<id>/ that are the worker's scratch, never part of a published folder.
SCRATCH = ("frames.npy", "frames.json")
#: How many times a publish picks a new name when something stands where the folder should go.
IN_THE_WAY_TRIES = 5


class Finisher:
    def __init__(self, settings: Settings, store: Store, *, model_info: Callable[[Job], dict[str, Any]] | None = None):
        self.s = settings
        self.store = store
        self.model_info = model_info or (lambda job: {"name": "default", "id": settings.model, "family": None,
                                                      "revision": None})
        self.provenance = Provenance(settings)

    def log(self, job: Job) -> JobLog:
        return JobLog(folders.job_dir(self.s.filled("work_dir"), job.id) / "job.log", job.id, job.name)

    def finish(
        self, job: Job, status: JobStatus, error: dict[str, Any] | None, *, worker_id: str,
        output: str | None = None, notes: list[str] | tuple[str, ...] = (), frm: JobStatus = JobStatus.RUNNING,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write the manifest, publish work/<id>/ into output/ or failed/, then record the status."""
        job = self.store.get(job.id) or job  # the latest tries, effective values and notes
        jdir = folders.job_dir(self.s.filled("work_dir"), job.id)
        jdir.mkdir(parents=True, exist_ok=True)
        # Signed before the scratch goes: a signing failure keeps the frames, so the retry only encodes again.
        signed = self._sign(job, jdir) if status is JobStatus.SUCCEEDED and output else None
        for name in SCRATCH:
            with contextlib.suppress(FileNotFoundError):
                (jdir / name).unlink()
        finished = utcnow()
        all_notes = [*job.notes, *(n for n in notes if n not in job.notes)]
        doc = manifest.build(
            job, status, finished_at=finished, error=error, output=output, model=self.model_info(job),
            notes=all_notes, extra={"poster": "poster.jpg" if (jdir / "poster.jpg").exists() else None,
                                    "provenance": signed, **(extra or {})},
        )
        jlog = self.log(job)
        if status is JobStatus.FAILED:
            jlog.error("failed", error=(error or {}).get("message"))
        elif error:  # a cancel is a person's decision, not an error
            jlog.info(status.value, reason=error.get("message"))
        else:
            jlog.info(status.value, output=output)
        folders.write_json(jdir / "job.json", doc)
        crashpoint("manifest_written")
        root = self.s.filled("output_dir" if status is JobStatus.SUCCEEDED else "failed_dir")
        dest = self._record_destination(job, root, worker_id)
        crashpoint("destination_recorded")
        dest = self._publish(job, jdir, dest, root, worker_id)
        crashpoint("folder_published")
        self._record(job, status, error, dest, output, worker_id, finished, frm)
        crashpoint("job_finished")
        return dest

    def complete_interrupted(self, job: Job, *, worker_id: str) -> Path:
        """A job claimed with its destination already recorded: publish (if need be) and record its status."""
        dest = Path(job.final_dir)  # type: ignore[arg-type]
        jdir = folders.job_dir(self.s.filled("work_dir"), job.id)
        doc_path = jdir / "job.json" if (jdir / "job.json").exists() else dest / "job.json"
        doc = json.loads(doc_path.read_text())
        root = dest.parent
        if jdir.exists() and not os.path.lexists(dest):
            # Not published yet: the recorded name was only the last try's. A name is decided at the
            # publish that succeeds, so a try that failed (output/ unwritable, or not a folder) uses none up.
            dest = self._record_destination(job, root, worker_id)
        dest = self._publish(job, jdir, dest, root, worker_id)
        status = JobStatus(doc["status"])
        JobLog(dest / "job.log", job.id, job.name).info(
            "finish_completed_later", status=status.value,
            why="an earlier try to publish it stopped (a crash, or the disk)",
        )
        self._record(job, status, doc.get("error"), dest, doc.get("output"), worker_id, utcnow(), JobStatus.RUNNING)
        return dest

    # ---- the steps ---------------------------------------------------------------------------------

    def _sign(self, job: Job, jdir: Path) -> dict[str, Any]:
        """C2PA-sign the videos and poster in place (provenance.py); a failure is the environment's (the job waits)."""
        image = jdir / "input" / job.inputs[0] if job.inputs else None
        started = time.monotonic()
        entry = self.provenance.sign_job(jdir, image if image is not None and image.is_file() else None)
        entry["seconds"] = round(time.monotonic() - started, 3)
        self.log(job).info("provenance", **{k: v for k, v in entry.items() if k in ("method", "signed", "seconds")})
        crashpoint("signed")
        return entry

    def _record_destination(self, job: Job, root: Path, worker_id: str, taken: set[str] | None = None) -> Path:
        taken = set() if taken is None else taken
        while True:
            dest = folders.free_name(root, job.name, taken)
            try:
                self.store.update_running(job.id, worker_id, final_dir=str(dest))
                return dest
            except IntegrityError:  # another job chose that name a moment ago
                taken.add(str(dest))

    def _publish(self, job: Job, jdir: Path, dest: Path, root: Path, worker_id: str) -> Path:
        """Rename work/<id>/ onto `dest`; when something stands in the way, choose the next free name."""
        taken: set[str] = set()
        for _ in range(IN_THE_WAY_TRIES):
            try:
                folders.publish(jdir, dest)
                return dest
            except OSError as err:
                if not dest.parent.is_dir():  # output/ itself is not a folder: the machine's problem, not a name's
                    raise OSError(errno.ENOTDIR, f"{dest.parent} is not a folder", str(dest.parent)) from err
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR) or not _in_the_way(dest):
                    raise  # a permission or a full disk: the failure policy keeps the job and waits
                taken.add(str(dest))
                self.log(job).warning("destination_in_the_way", folder=str(dest), action="choosing another name")
                dest = self._record_destination(job, root, worker_id, taken)
        raise OSError(errno.EEXIST, f"{IN_THE_WAY_TRIES} names in {root} were taken by other files", str(dest))

    def _record(
        self, job: Job, status: JobStatus, error: dict[str, Any] | None, dest: Path, output: str | None,
        worker_id: str, finished: Any, frm: JobStatus,
    ) -> None:
        out_path = str(dest / output) if output else None
        final = dataclasses.replace(job, status=status, finished_at=finished, final_dir=str(dest), output=out_path,
                                    error=error)
        self.store.finish(
            job.id, worker_id, status, now=finished, error=error, output=out_path, notify=self.notifications(final),
            frm=frm,
        )

    def notifications(self, job: Job) -> list[OutboxEntry]:
        """What is owed for a finished job: a POST per webhook URL, a message per Apprise URL, the on_finish hook."""
        entries = [OutboxEntry("webhook", url, job_payload(job)) for url in self.s.webhooks]
        targets = self.s.notify_for(job.params.preset if job.params else None) if hasattr(self.s, "notify_for") else []
        if targets:
            poster = Path(job.final_dir or "") / "poster.jpg"
            told = {**job_payload(job), "poster": str(poster) if job.status is JobStatus.SUCCEEDED else None}
            entries += [OutboxEntry("notify", url, told) for url in targets]
        if self.s.on_finish:
            folder = Path(job.final_dir or "")
            env = {
                "I2V_JOB_ID": str(job.id), "I2V_STATUS": job.status.value, "I2V_JOB_DIR": str(folder),
                "I2V_MANIFEST": str(folder / "job.json"), "I2V_VIDEO": job.output or "",
            }
            entries.append(OutboxEntry("hook", json.dumps(list(self.s.on_finish)), {"env": env}))
        return entries


def _in_the_way(dest: Path) -> bool:
    """Something other than an empty folder (a file, a full folder someone made) holds `dest`."""
    try:
        return not dest.is_dir() or any(dest.iterdir())
    except OSError:
        return True
