"""The worker, only the runner: claim one job, generate it, write its video and poster, hand it to finish.

`run_once()` is one unit of work. Every exception in a job's life goes to the one failure policy
(`policy.decide`) and becomes a state change of that job; none escapes as a loop failure except
"stop" (the daemon itself cannot go on). The job's phases and steps are its liveness (`progress.py`).
A job that needs no GPU (a rejection, a cancel, one out of attempts, an interrupted publish) is ended by
the `Closer`, as the `Housekeeper` ends it while the GPU is busy.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from i2v_daemon.errors import ConfigError, DatabaseGone, JobCanceled, JobStalled, LeaseLost, StopDaemon
from i2v_daemon.faults import crashpoint, hangpoint
from i2v_daemon.files import job_dir
from i2v_daemon.logs import JobLog, get_logger
from i2v_daemon.queue.jobs import Job, JobStatus
from i2v_daemon.queue.store import Store
from i2v_daemon.work import postprocess
from i2v_daemon.work.cards import Cards
from i2v_daemon.work.closer import Attempt, Closer, call_hook
from i2v_daemon.work.policy import decide
from i2v_daemon.work.progress import JobProgress

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings

log = get_logger()


def model_name(job: Job) -> str:
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
        self, settings: Settings, store: Store, closer: Closer, *, worker_id: str | None = None, models: Any = None,
        device: str | None = None, on_alive: Callable[[], None] = lambda: None,
        on_progress: Callable[[Job, int, int], None] | None = None, on_phase: Callable[[Job, str], None] | None = None,
        on_try: Callable[[Job, dict[str, Any]], None] | None = None,
    ) -> None:
        self.s = settings
        self.store = store
        self.closer = closer  # ends jobs (the Finisher, then on_finish) and applies the failure policy
        self.worker_id = worker_id or make_worker_id()
        self.host = socket.gethostname()
        self.device = device or settings.device
        self.models = models
        self.on_alive = on_alive  # the systemd watchdog: fed by progress only
        self.on_progress = on_progress  # metrics and sd_notify: a step of denoising
        self.on_phase = on_phase
        self.on_try = on_try  # one try of the OOM ladder ended
        self.stopping = False  # set by a shutdown: a canceled step means "requeue", not "canceled"
        self.stop_now = False  # set when the grace period is over: stop at the next step
        self.attempt: Attempt | None = None  # the job in hand (read by the daemon's timer threads too)
        self.paused = False  # `i2v-daemon pause` is in force: run_once claims nothing
        # This worker's card: what it advertises, and the need of the jobs it claims (work/cards.py).
        self.cards = Cards(settings, store, models if hasattr(models, "card_budget") else None,
                           worker_id=self.worker_id, host=self.host, device=self.device)

    def rename(self, device: str) -> None:
        """`auto` (or `cuda`) resolved to a real device before the first claim: the id and the card follow it."""
        self.device = self.cards.device = device
        self.worker_id = self.cards.worker_id = make_worker_id(device)

    @property
    def current(self) -> int | None:
        """The id of the job in hand, None when idle."""
        attempt = self.attempt
        return attempt.job.id if attempt is not None else None

    @property
    def stalled_at(self) -> float | None:
        """Monotonic time the job in hand was declared stalled, None while it progresses (or when idle)."""
        attempt = self.attempt
        return attempt.stalled_at if attempt is not None else None

    # ---- one unit of work ---------------------------------------------------------------------

    def run_once(self, now: datetime | None = None) -> bool:
        """Claim and process one job; True if one was processed (more may be waiting)."""
        if self._check_paused():
            return False
        self.cards.advertise()
        job = self.store.claim_next(
            self.worker_id, lease_seconds=self.s.lease_seconds, now=now, host=self.host, device=self.device,
            budget_bytes=self.cards.budget_bytes,
        )
        if job is None:
            self.cards.explain_waiting()
            return False
        self.attempt = Attempt(job)
        try:
            self.process(self.attempt)
        finally:
            self.attempt = None
        return True

    def _check_paused(self) -> bool:
        paused = self.store.is_paused()
        if paused != self.paused:
            self.paused = paused
            log.info("paused" if paused else "resumed", worker=self.worker_id)
        return paused

    def process(self, attempt: Attempt) -> None:
        """Run or end one claimed job; every way it can go wrong ends in a state change of that job."""
        try:
            self._process(attempt)
        except StopDaemon:
            raise
        except BaseException as err:
            if not isinstance(err, Exception):  # KeyboardInterrupt and the like: not the job's
                raise
            self.closer.judge(attempt, err, worker_id=self.worker_id, stopping=self.stopping)

    def _process(self, attempt: Attempt) -> None:
        if self.closer.end_without_gpu(attempt, worker_id=self.worker_id):
            return
        job = attempt.job
        self.cards.check_claimed(job, job_dir(self.s.filled("work_dir"), job.id) / "input" / job.inputs[0])
        jlog = JobLog(job_dir(self.s.filled("work_dir"), job.id) / "job.log", job.id, job.name)
        jlog.info("started", attempt=job.attempts, of=job.max_attempts, worker=self.worker_id, device=self.device)
        self._run(attempt, jlog)

    # ---- generating ---------------------------------------------------------------------------

    def _run(self, attempt: Attempt, jlog: JobLog) -> None:
        if self.models is None:
            raise ConfigError("model: this worker cannot generate videos")
        job = attempt.job
        progress = attempt.progress = JobProgress(
            self.store, job.id, self.worker_id, lease_seconds=self.s.lease_seconds,
            stall_seconds=self.s.stall_seconds, on_alive=self.on_alive,
        )

        def enter(phase: str) -> None:
            attempt.phase = phase
            cancel = progress.enter(phase)
            hangpoint(phase)
            if cancel or self.stop_now:
                raise JobCanceled(f"stopped while {phase}")
            call_hook(self.on_phase, job, phase)

        enter("loading")
        model = self.models.get(model_name(job), weights=job.params.weights if job.params else None)
        enter("generating")
        frames, effective, notes = self._generate(job, model, progress, jlog)
        if self.models is not None:
            self.models.touch()
        output, effective, post = postprocess.write_videos(
            frames, job, effective, job_dir(self.s.filled("work_dir"), job.id), enter=enter, settings=self.s,
            device=self.device, jlog=jlog, notes=notes, on_alive=progress.enter,
        )
        del frames
        self.store.update_running(job.id, self.worker_id, effective=effective, notes=notes)
        crashpoint("video_written")
        enter("publishing")
        self.closer.end(
            job, JobStatus.SUCCEEDED, None, worker_id=self.worker_id, output=output, notes=notes,
            extra={"postprocess": post},
        )

    def _generate(
        self, job: Job, model: Any, progress: JobProgress, jlog: JobLog,
    ) -> tuple[Any, dict[str, Any], list[str]]:
        """The frames of this job: from an earlier attempt that got as far as generating them, or generated now."""
        saved = postprocess.saved_frames(job_dir(self.s.filled("work_dir"), job.id), job)
        if saved is not None:
            jlog.info("frames_reused", reason="an earlier attempt generated them; only the encoding is done again")
            return saved, dict(job.effective or {}), list(job.notes)
        from i2v_daemon.intake.images import load_rgb
        from i2v_daemon.work.generate import generate  # torch lives behind this import

        assert job.params is not None
        jdir = job_dir(self.s.filled("work_dir"), job.id)
        image, image_notes = load_rgb(jdir / "input" / job.inputs[0], max_pixels=self.s.max_image_pixels)
        self.store.update_running(job.id, self.worker_id, model=model.info.model_id)
        tries = list(job.tries)

        def on_try(entry: dict[str, Any]) -> None:
            entry = {**entry, "try": len(tries) + 1, "model_name": model_name(job)}
            entry.setdefault("steps", job.params.steps if job.params else None)
            entry.setdefault("denoise_seconds", progress.denoise_seconds())
            progress.step_times.clear()
            tries.append(entry)
            self.store.update_running(job.id, self.worker_id, tries=tries)
            jlog.info("try_finished", **{k: v for k, v in entry.items() if v is not None})
            call_hook(self.on_try, job, entry)

        def on_step(step: int, total: int) -> None:
            cancel = progress.advance(step, total)
            call_hook(self.on_progress, job, step, total)
            if cancel or self.stop_now:
                raise JobCanceled(f"stopped at step {step} of {total}")

        def on_phase(phase: str) -> None:  # compiling, denoising, decoding: from inside generate()
            if progress.enter(phase) or self.stop_now:
                raise JobCanceled(f"stopped while {phase}")
            call_hook(self.on_phase, job, phase)

        outcome = generate(
            model, image, job.prompt, job.negative_prompt, job.params,
            ladder=self.s.resolution_ladder, on_step=on_step, on_try=on_try, on_phase=on_phase,
            memory=self.models.memory if self.models else None, lora_dir=self.s.lora_dir,
        )
        # Intake already noted what it saw of the image; the same note twice says nothing more.
        notes = list(dict.fromkeys([*job.notes, *image_notes, *outcome.notes]))
        for note in outcome.notes:
            jlog.info("note", message=note)
        self.store.update_running(job.id, self.worker_id, effective=outcome.effective, notes=notes)
        postprocess.save_frames(outcome.frames, jdir, outcome.effective)
        return outcome.frames, outcome.effective, notes

    # ---- liveness, from the daemon's timer --------------------------------------------------------

    def beat(self) -> None:
        """Renew the running job's lease while it progresses; a stalled job is put back in the queue."""
        self.cards.advertise()  # a long job keeps this card live
        attempt = self.attempt
        if attempt is None or attempt.progress is None or attempt.stalled_at is not None:
            return
        progress, job_id = attempt.progress, attempt.job.id
        try:
            if progress.beat():
                return
        except (LeaseLost, DatabaseGone):  # the job's own next write meets it too, and stops the daemon
            return
        attempt.stalled_at = time.monotonic()
        stalled = JobStalled(f"no progress for {progress.stalled_for():.0f} s while {progress.phase} (stall_seconds = "
                             f"{self.s.stall_seconds:g}); stopped and put back in the queue")
        # The stuck call never returns to be judged in process(): the stall is judged here, by the same policy,
        # whose verdict for it is always a retry (nothing but the queue may take the job from that call).
        verdict = decide(stalled, attempts=attempt.job.attempts, max_attempts=attempt.job.max_attempts,
                         backoff_seconds=self.s.retry_backoff_seconds, where=progress.phase)
        log.error("job_stalled", job_id=job_id, phase=progress.phase, worker=self.worker_id, error=str(stalled))
        with contextlib.suppress(LeaseLost):
            self.closer.requeue(attempt.job, verdict, worker_id=self.worker_id)

