"""Closing a claimed job, for the worker and the housekeeper alike: ending one that needs no GPU, and
applying the failure policy's verdict (`policy.decide`) to one whose try raised.

Every end goes through the one `Finisher` and is then handed to `on_finish` (metrics, sd_notify).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, assert_never

from i2v_daemon.errors import CardTooSmall, GenerationError, StopDaemon
from i2v_daemon.logs import get_logger
from i2v_daemon.queue.clock import utcnow
from i2v_daemon.queue.jobs import Job, JobStatus
from i2v_daemon.queue.store import LeaseLost, Store
from i2v_daemon.work.finish import Finisher
from i2v_daemon.work.policy import Action, Verdict, decide
from i2v_daemon.work.progress import JobProgress

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings

log = get_logger()

#: A cancel is asked for by `i2v-daemon cancel` or `POST /api/v1/jobs/{id}/cancel`; both only set the flag.
CANCELED = "canceled on request (`i2v-daemon cancel` or the API)"


@dataclass
class Attempt:
    """A claimed job in a worker's hands and how far it got: the failure policy judges a failure by its phase."""

    job: Job
    phase: str = "starting"  # then loading, generating, …, publishing: where a failure would have happened
    progress: JobProgress | None = None  # its liveness, once it generates
    stalled_at: float | None = None  # monotonic time it was declared stalled


def call_hook(hook: Callable[..., None] | None, *args: Any) -> None:
    """Metrics and sd_notify: their failure is logged and never touches the job."""
    if hook is not None:
        try:
            hook(*args)
        except Exception:  # not `hook_failed`: that is the user's on_finish command (delivery/hook.py)
            log.exception("metrics_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)))


class Closer:
    def __init__(
        self, settings: Settings, store: Store, finisher: Finisher, *, on_finish: Callable[[Job], None] | None = None,
    ) -> None:
        self.s = settings
        self.store = store
        self.finisher = finisher
        self.on_finish = on_finish  # the job's final row, after its folder moved

    def end_without_gpu(self, attempt: Attempt, *, worker_id: str) -> bool:
        """End the job if it needs no GPU (an interrupted publish, a rejection, a cancel, no attempts left).

        False: the job is to be generated, and nothing was done.
        """
        job = attempt.job
        if job.final_dir:
            attempt.phase = "publishing"
            self.finisher.complete_interrupted(job, worker_id=worker_id)
            self.finished(job)
        elif job.rejection:
            self.end(job, JobStatus.FAILED, job.rejection, worker_id=worker_id)
        elif job.cancel_requested:
            self.end(job, JobStatus.CANCELED, {"type": "canceled", "message": _canceled_before(job)},
                     worker_id=worker_id)
        elif job.attempts > job.max_attempts:
            last = (job.error or {}).get("message", "the worker stopped without a word (crash or kill)")
            msg = f"gave up after {job.max_attempts} attempts (max_attempts); the last one: {last}"
            self.end(job, JobStatus.FAILED, {"type": "gave_up", "message": msg}, worker_id=worker_id)
        else:
            return False
        return True

    # ---- the one failure policy, applied ------------------------------------------------------------

    def judge(self, attempt: Attempt, err: Exception, *, worker_id: str, stopping: bool) -> None:
        """Turn `err`, raised while the job was in `attempt.phase`, into a state change of that job."""
        job, where = attempt.job, attempt.phase
        latest = self._latest(job)
        verdict = decide(
            err, attempts=job.attempts, max_attempts=job.max_attempts, backoff_seconds=self.s.retry_backoff_seconds,
            waits=int((latest.error or {}).get("waits", 0)) if latest else 0, stopping=stopping,
            cancel_requested=bool(latest and latest.cancel_requested), where=where,
        )
        try:
            self._apply(job, verdict, where, err, worker_id)
        except StopDaemon:
            raise
        except LeaseLost as lost:
            log.warning("lease_lost", job_id=job.id, error=str(lost))
        except Exception as again:  # finishing the job failed too (a full disk while writing failed/)
            fallback = decide(again, attempts=job.attempts, max_attempts=job.max_attempts,
                              backoff_seconds=self.s.retry_backoff_seconds, where="publishing")
            if fallback.action not in (Action.WAIT, Action.RETRY):
                fallback = Verdict(Action.WAIT, {"type": "environment", "message": f"{type(again).__name__}: {again}"},
                                   60.0, True)
            log.error("finishing_failed", job_id=job.id, error=f"{type(again).__name__}: {again}",
                      action="the job stays queued and is finished later")
            with contextlib.suppress(LeaseLost):
                self.requeue(job, fallback, worker_id=worker_id)

    def _apply(self, job: Job, verdict: Verdict, where: str, err: Exception, worker_id: str) -> None:
        jlog = self.finisher.log(job)
        match verdict.action:
            case Action.DROP:
                log.warning("lease_lost", job_id=job.id, error=str(err), note="another worker owns it now")
            case Action.CANCEL:
                latest = self._latest(job) or job
                msg = (_canceled_while(latest, where) if latest.tries or where != "starting"
                       else _canceled_before(latest))
                self.end(job, JobStatus.CANCELED, {"type": "canceled", "message": msg}, worker_id=worker_id)
            case Action.REQUEUE:
                jlog.info("requeued", reason=f"stopped by a shutdown while {where}; back in the queue")
                self.store.requeue(job.id, worker_id, refund_attempt=True)
            case Action.FAIL:
                self.end(job, JobStatus.FAILED, verdict.error, worker_id=worker_id)
            case Action.RETRY:
                jlog.warning("will_retry", error=(verdict.error or {}).get("message"), attempt=job.attempts,
                             of=job.max_attempts, in_seconds=round(verdict.delay, 1), phase=where)
                if not isinstance(err, GenerationError):
                    log.debug("retry_cause", job_id=job.id, error=repr(err))
                self.requeue(job, verdict, worker_id=worker_id)
            case Action.WAIT:
                # A card too small is routing, not trouble: the job waits for a larger one.
                say = jlog.warning if isinstance(err, CardTooSmall) else jlog.error
                say("waiting", error=(verdict.error or {}).get("message"), attempt=job.attempts,
                    of=job.max_attempts, in_seconds=round(verdict.delay, 1), phase=where)
                self.requeue(job, verdict, worker_id=worker_id)
            case Action.STOP:
                jlog.error("daemon_stopping", error=(verdict.error or {}).get("message"))
                with contextlib.suppress(LeaseLost):
                    self.store.requeue(job.id, worker_id, error=verdict.error, refund_attempt=True)
                raise StopDaemon(verdict.error or {"message": str(err)})
            case unknown:
                assert_never(unknown)

    def requeue(self, job: Job, verdict: Verdict, *, worker_id: str) -> None:
        """Back to the queue as the verdict says: its error shown, after its delay, the attempt given back or not."""
        self.store.requeue(
            job.id, worker_id, error=verdict.error, not_before=utcnow() + timedelta(seconds=verdict.delay),
            refund_attempt=verdict.refund,
        )

    def _latest(self, job: Job) -> Job | None:
        try:
            return self.store.get(job.id)
        except Exception:
            return None

    # ---- finishing ----------------------------------------------------------------------------

    def end(
        self, job: Job, status: JobStatus, error: dict[str, Any] | None, *, worker_id: str,
        output: str | None = None, notes: list[str] | tuple[str, ...] = (), extra: dict[str, Any] | None = None,
    ) -> Path:
        """Publish the job's folder with its final status (`Finisher.finish`), then hand it to `on_finish`."""
        dest = self.finisher.finish(job, status, error, worker_id=worker_id, output=output, notes=notes, extra=extra)
        self.finished(job)
        return dest

    def finished(self, job: Job) -> None:
        """Hand the job's final row (status, folder, times) to `on_finish` (metrics, sd_notify)."""
        if self.on_finish is None:
            return
        try:
            final = self.store.get(job.id)
        except Exception:  # the job is finished and safe; only its metrics are lost, and said so
            log.exception("metrics_hook_failed", hook="on_finish", job_id=job.id)
            return
        if final is not None:
            call_hook(self.on_finish, final)


def _canceled_before(job: Job) -> str:
    if job.tries or job.step:
        return f"{CANCELED} while queued (it had run before and was put back in the queue)"
    return f"{CANCELED} before it started"


def _canceled_while(job: Job, where: str) -> str:
    return f"{CANCELED} while {where}"
