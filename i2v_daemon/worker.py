"""The worker: claim one job, run it, write its folder, finish it. `run_once()` is one unit of work.

Order of the finishing steps, each one safe to crash after:
  video written (temp, fsync, rename) → job.json written into work/<id>/ → the destination
  recorded in the database → work/<id>/ renamed to output/S (or failed/S) → status written.
A job claimed with its destination already recorded was interrupted while finishing; it is
finished from its manifest rather than run again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError, OperationalError

from i2v_daemon import folders, manifest
from i2v_daemon.errors import ConfigError, GenerationError, InputError, JobCanceled, TransientError
from i2v_daemon.faults import crashpoint
from i2v_daemon.jobs import Job, JobStatus
from i2v_daemon.logs import JobLog, get_logger
from i2v_daemon.models.holder import ModelHolder
from i2v_daemon.settings import Settings
from i2v_daemon.store import LeaseLost, Store, utcnow

log = get_logger()


def _model_name(job: Job) -> str:
    """The config's name of the model this job asked for (a sidecar's `model`), "default" if none."""
    return (job.params.model if job.params else None) or "default"


def make_worker_id(device: str = "") -> str:
    """host/pid: lets a restarted daemon tell its own dead predecessor's jobs from a live sibling's."""
    return f"{socket.gethostname()}/{os.getpid()}" + (f"/{device}" if device else "")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_local_workers(worker_ids: list[str], host: str | None = None) -> list[str]:
    """Worker ids of processes on this host that no longer exist (our own earlier runs)."""
    host = host or socket.gethostname()
    dead = []
    for wid in worker_ids:
        parts = wid.split("/")
        if len(parts) >= 2 and parts[0] == host and parts[1].isdigit() and not pid_alive(int(parts[1])):
            dead.append(wid)
    return dead


class Worker:
    def __init__(
        self, settings: Settings, store: Store, *, worker_id: str | None = None,
        models: ModelHolder | None = None, device: str | None = None,
    ) -> None:
        self.s = settings
        self.store = store
        self.worker_id = worker_id or make_worker_id()
        self.host = socket.gethostname()
        self.device = device or settings.device
        self.models = models
        self.stopping = False  # set by a shutdown: a canceled step means "requeue", not "canceled"
        self.stop_now = False  # set when the grace period is over: stop at the next step
        self.current: int | None = None
        self.on_progress: Callable[[Job, int, int], None] | None = None
        self.on_try: Callable[[Job, dict[str, Any]], None] | None = None  # one try of the OOM ladder ended
        self.on_finish: Callable[[Job], None] | None = None  # the job's final row, after its folder moved
        self.paused = False  # `i2v-daemon pause` is in force: run_once claims nothing

    def job_dir(self, job_id: int) -> Path:
        return self.s.work_dir / str(job_id)  # type: ignore[operator]

    # ---- one unit of work ---------------------------------------------------------------------

    def run_once(self, now: datetime | None = None) -> bool:
        """Claim and process one job; True if one was processed (more may be waiting)."""
        if self._check_paused():
            return False
        job = self.store.claim_next(
            self.worker_id, lease_seconds=self.s.lease_seconds, now=now, host=self.host, device=self.device
        )
        if job is None:
            return False
        self.current = job.id
        try:
            self.process(job)
        except LeaseLost as err:
            # Another worker owns it now (our lease expired while we were stuck); leave it alone.
            log.warning("lease_lost", job_id=job.id, error=str(err))
        finally:
            self.current = None
        return True

    def _check_paused(self) -> bool:
        paused = self.store.is_paused()
        if paused != self.paused:
            self.paused = paused
            log.info("paused" if paused else "resumed", worker=self.worker_id)
        return paused

    def heartbeat(self) -> None:
        """Renew the current job's lease (called from a timer while encoders or ffmpeg run)."""
        job_id = self.current
        if job_id is not None:
            with contextlib.suppress(LeaseLost):
                self.store.heartbeat(job_id, self.worker_id, lease_seconds=self.s.lease_seconds)

    def process(self, job: Job) -> None:
        jlog = JobLog(self.job_dir(job.id) / "job.log", job.id, job.name)
        if job.final_dir:
            self._complete_interrupted_finish(job, jlog)
            return
        previous = Path(job.extra["previous_dir"]) if job.extra.get("previous_dir") else None
        missing = folders.stage_inputs(job.inputs, self.s.inbox_dir, self.job_dir(job.id), previous)  # type: ignore[arg-type]
        if missing:
            err = InputError(
                f"{', '.join(missing)}: left the inbox before the job could take it; drop the files again"
            )
            self.end(job, JobStatus.FAILED, err.as_dict(), jlog)
        elif job.rejection:
            self.end(job, JobStatus.FAILED, job.rejection, jlog)
        elif job.cancel_requested:
            msg = "canceled with `i2v-daemon cancel` before it started"
            self.end(job, JobStatus.CANCELED, {"type": "canceled", "message": msg}, jlog)
        elif job.attempts > job.max_attempts:
            last = (job.error or {}).get("message", "the worker stopped without a word (crash or kill)")
            msg = f"gave up after {job.max_attempts} attempts (max_attempts); the last one: {last}"
            self.end(job, JobStatus.FAILED, {"type": "gave_up", "message": msg}, jlog)
        else:
            self._run(job, jlog)

    # ---- generating ---------------------------------------------------------------------------

    def _run(self, job: Job, jlog: JobLog) -> None:
        jlog.info("started", attempt=job.attempts, of=job.max_attempts, worker=self.worker_id, device=self.device)
        try:
            output, notes = self._generate_and_write(job, jlog)
        except JobCanceled:
            if self.stopping and not self.store.get(job.id).cancel_requested:  # type: ignore[union-attr]
                jlog.warning("stopped by shutdown at a step boundary; back in the queue")
                self.store.requeue(job.id, self.worker_id, refund_attempt=True)
            else:
                msg = "canceled with `i2v-daemon cancel` while running"
                self.end(job, JobStatus.CANCELED, {"type": "canceled", "message": msg}, jlog)
        except (InputError, GenerationError) as err:
            self.end(job, JobStatus.FAILED, err.as_dict(), jlog)
        except ConfigError:
            # The model cannot be loaded: not this job's fault. Put it back and let the caller stop.
            self.store.requeue(job.id, self.worker_id, refund_attempt=True)
            raise
        except LeaseLost:
            raise
        except (TransientError, OperationalError, OSError) as err:
            self._retry_or_fail(job, err, jlog)
        except Exception as err:  # a bug or a library error we do not know: retry, bounded by max_attempts
            jlog.error("unexpected_error", error=f"{type(err).__name__}: {err}", trace=traceback.format_exc(limit=8))
            self._retry_or_fail(job, err, jlog)
        else:
            self.end(job, JobStatus.SUCCEEDED, None, jlog, output=output, notes=notes)

    def _generate_and_write(self, job: Job, jlog: JobLog) -> tuple[str, list[str]]:
        from i2v_daemon.generate import generate  # torch lives behind this import
        from i2v_daemon.images import load_rgb
        from i2v_daemon.video import probe_mp4, write_mp4

        assert job.params is not None
        jdir = self.job_dir(job.id)
        image, image_notes = load_rgb(jdir / "input" / job.inputs[0], max_pixels=self.s.max_image_pixels)
        model = self._model(job)
        self.store.update_running(job.id, self.worker_id, model=model.info.model_id)
        tries = list(job.tries)

        def on_try(entry: dict[str, Any]) -> None:
            tries.append({**entry, "try": len(tries) + 1})
            self.store.update_running(job.id, self.worker_id, tries=tries)
            jlog.info("try_finished", **{k: v for k, v in tries[-1].items() if v is not None})
            self._hook(self.on_try, job, tries[-1])

        def on_step(step: int, total: int) -> None:
            cancel = self.store.heartbeat(
                job.id, self.worker_id, lease_seconds=self.s.lease_seconds, step=step, total_steps=total
            )
            self._hook(self.on_progress, job, step, total)
            if cancel or self.stop_now:
                raise JobCanceled(f"stopped at step {step} of {total}")

        outcome = generate(
            model, image, job.prompt, job.negative_prompt, job.params,
            ladder=self.s.resolution_ladder, on_step=on_step, on_try=on_try,
            memory=self.models.memory if self.models else None, lora_dir=self.s.lora_dir,
        )
        if self.models:
            self.models.touch()
        notes = list(image_notes) + outcome.notes
        for note in notes:
            jlog.info("note", message=note)
        video = f"{job.name}.mp4"
        eff = outcome.effective
        try:
            write_mp4(outcome.frames, jdir / video, eff["fps"])
        except OSError as err:
            raise TransientError(f"could not write the video: {err}") from err
        probe = probe_mp4(jdir / video)
        made = (probe["width"], probe["height"], probe["num_frames"])
        if made != (eff["width"], eff["height"], eff["num_frames"]):
            raise TransientError(f"the encoded video does not match what was generated: {probe}")
        self.store.update_running(job.id, self.worker_id, effective=eff)
        crashpoint("video_written")
        jlog.info("video_written", file=video, **{k: eff[k] for k in ("width", "height", "num_frames", "fps", "seed")})
        return video, notes

    def _model(self, job: Job) -> Any:
        if self.models is None:
            raise ConfigError("model: this command cannot generate videos")
        return self.models.get(_model_name(job))

    def _retry_or_fail(self, job: Job, err: BaseException, jlog: JobLog) -> None:
        message = f"{type(err).__name__}: {err}"
        if job.attempts >= job.max_attempts:
            msg = f"gave up after {job.attempts} attempts (max_attempts); the last one: {message}"
            self.end(job, JobStatus.FAILED, {"type": "gave_up", "message": msg}, jlog)
            return
        delay = self.s.retry_backoff_seconds * 2 ** (job.attempts - 1)
        jlog.warning("will_retry", error=message, attempt=job.attempts, of=job.max_attempts, in_seconds=delay)
        self.store.requeue(
            job.id, self.worker_id, error={"type": "transient", "message": message},
            not_before=utcnow() + timedelta(seconds=delay),
        )

    # ---- finishing ----------------------------------------------------------------------------

    def end(
        self, job: Job, status: JobStatus, error: dict[str, str] | None, jlog: JobLog, *,
        output: str | None = None, notes: list[str] | tuple[str, ...] = (),
    ) -> Path:
        """Write the manifest, move the job folder to output/ or failed/, then record the status."""
        job = self.store.get(job.id) or job  # the latest tries and effective values
        jdir = self.job_dir(job.id)
        jdir.mkdir(parents=True, exist_ok=True)
        finished = utcnow()
        default = {"id": self.s.model, "family": None, "revision": None}
        model = self.models.info(_model_name(job)) if self.models else default
        doc = manifest.build(job, status, finished_at=finished, error=error, output=output, model=model, notes=notes)
        if error:
            jlog.error(status.value, error=error["message"])
        else:
            jlog.info(status.value, output=output)
        folders.write_json(jdir / "job.json", doc)
        crashpoint("manifest_written")
        root = self.s.output_dir if status is JobStatus.SUCCEEDED else self.s.failed_dir
        dest = self._record_destination(job, root)  # type: ignore[arg-type]
        crashpoint("destination_recorded")
        folders.publish(jdir, dest)
        crashpoint("folder_published")
        self.store.finish(
            job.id, self.worker_id, status, now=finished, error=error,
            output=str(dest / output) if output else None,
        )
        self._finished(job.id)
        return dest

    def _record_destination(self, job: Job, root: Path) -> Path:
        taken: set[str] = set()
        while True:
            dest = folders.free_name(root, job.name, taken)
            try:
                self.store.update_running(job.id, self.worker_id, final_dir=str(dest))
                return dest
            except IntegrityError:  # another job chose that name a moment ago
                taken.add(str(dest))

    def _complete_interrupted_finish(self, job: Job, jlog: JobLog) -> None:
        dest = Path(job.final_dir)  # type: ignore[arg-type]
        jdir = self.job_dir(job.id)
        doc_path = jdir / "job.json" if (jdir / "job.json").exists() else dest / "job.json"
        doc = json.loads(doc_path.read_text())
        folders.publish(jdir, dest)
        status = JobStatus(doc["status"])
        output = doc.get("output")
        JobLog(dest / "job.log", job.id, job.name).info("finish_completed_after_restart", status=status.value)
        self.store.finish(
            job.id, self.worker_id, status, error=doc.get("error"), output=str(dest / output) if output else None,
        )
        self._finished(job.id)

    def _finished(self, job_id: int) -> None:
        """Hand the job's final row (status, folder, times) to `on_finish`."""
        if self.on_finish is None:
            return
        try:
            final = self.store.get(job_id)
        except Exception:  # the job is finished and safe; only its notification is lost, and said so
            log.exception("hook_failed", hook="on_finish", job_id=job_id)
            return
        if final is not None:
            self._hook(self.on_finish, final)

    def _hook(self, hook: Callable[..., None] | None, *args: Any) -> None:
        """Metrics, webhooks, sd_notify: their failure is logged and never touches the job."""
        if hook is not None:
            try:
                hook(*args)
            except Exception:
                log.exception("hook_failed", hook=getattr(hook, "__qualname__", repr(hook)))

    def cancel_queued(self, job_id: int) -> Path | None:
        """Cancel a queued job right away (from the CLI): claim it, then finish it as canceled."""
        job = self.store.claim_next(self.worker_id, lease_seconds=self.s.lease_seconds, job_id=job_id, host=self.host)
        if job is None:
            return None
        jlog = JobLog(self.job_dir(job.id) / "job.log", job.id, job.name)
        previous = Path(job.extra["previous_dir"]) if job.extra.get("previous_dir") else None
        folders.stage_inputs(job.inputs, self.s.inbox_dir, self.job_dir(job.id), previous)  # type: ignore[arg-type]
        msg = "canceled with `i2v-daemon cancel` before it started"
        return self.end(job, JobStatus.CANCELED, {"type": "canceled", "message": msg}, jlog)
