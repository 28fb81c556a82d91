"""One failure policy: every exception in a job's life is judged here, once.

    fail     the input or the request can never succeed as asked: fail now, saying what to change
    retry    it may pass (an encoder killed, an unknown library error): try again after a backoff,
             counted against `max_attempts`; past it the job fails, quoting the last error
    wait     the machine is in the way (disk full, no permission, database gone, model not
             reachable, a card too small for it): keep the job, show why on it, try again later
             without using an attempt, so it recovers by itself once the cause is fixed
    cancel / requeue / drop
             a person canceled it; a shutdown stopped it (back to the queue, attempt refunded);
             another worker owns it now (touch nothing)
    stop     the daemon itself cannot go on (its database vanished, its default model can never
             load): put the job back and exit with the configuration status
A job's failure is never a loop failure: the worker turns every verdict into a state change.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

from i2v_daemon.errors import (
    CardTooSmall,
    ConfigError,
    DatabaseGone,
    EnvironmentProblem,
    GenerationError,
    I2VError,
    InputError,
    JobCanceled,
    JobStalled,
    LeaseLost,
    TransientError,
    first_line,
)

#: errno values that mean "the machine, not the job": kept and waited out without using attempts.
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.ENOTDIR, errno.EMFILE,
    errno.ENFILE, errno.ESTALE, errno.ENOMEM,
})
#: Longest wait between two looks at an environment problem.
MAX_WAIT_SECONDS = 600.0


class Action(Enum):
    """What is done with the job; the module's docstring says when each applies."""

    FAIL = "fail"  #: end it as failed now, saying what to change
    RETRY = "retry"  #: back to the queue after a backoff; the attempt counts
    WAIT = "wait"  #: back to the queue, the problem shown on it; the attempt is given back
    CANCEL = "cancel"  #: end it as canceled
    REQUEUE = "requeue"  #: back to the queue at once, the attempt given back (a shutdown)
    DROP = "drop"  #: touch nothing: another worker owns it now
    STOP = "stop"  #: put it back and stop the daemon


@dataclass(frozen=True)
class Verdict:
    action: Action
    error: dict[str, Any] | None = None
    delay: float = 0.0  # seconds before the job may run again (retry, wait)
    refund: bool = False  # the attempt is given back (wait, requeue)


def decide(
    err: BaseException, *, attempts: int, max_attempts: int, backoff_seconds: float, waits: int = 0,
    stopping: bool = False, cancel_requested: bool = False, where: str = "",
) -> Verdict:
    """The verdict for `err`, raised while the job (on its `attempts`-th try) was `where`."""
    if isinstance(err, LeaseLost):
        return Verdict(Action.DROP)
    if isinstance(err, JobCanceled):
        if cancel_requested or not stopping:
            return Verdict(Action.CANCEL)
        return Verdict(Action.REQUEUE, refund=True)
    if isinstance(err, DatabaseGone | ConfigError):
        return Verdict(Action.STOP, error={"type": getattr(err, "kind", "config"), "message": str(err)}, refund=True)
    if isinstance(err, CardTooSmall):
        # Not the job's fault and not this worker's to run: back at once, the attempt given back; the claim's
        # filter (`need_bytes`) keeps this card from taking it again, a larger one takes it.
        return Verdict(Action.WAIT, err.as_dict(), 0.0, True)
    if isinstance(err, JobStalled):
        # The call the job is stuck in still holds its folder: only the queue may take the job back (a
        # finish would move the folder from under it), even on its last attempt; the attempt counts, and
        # the next claim past max_attempts ends it. One backoff, not doubled: it was the machine that hung.
        return Verdict(Action.RETRY, err.as_dict(), backoff_seconds)
    environment = _environment(err)
    if environment is not None:
        # retry_backoff_seconds (30 s by default) doubling; at least a second, at most ten minutes
        delay = min(MAX_WAIT_SECONDS, max(1.0, backoff_seconds) * 2**waits)
        message = f"{environment}; the job waits and runs again in {delay:.0f} s without using an attempt"
        kind = err.kind if isinstance(err, EnvironmentProblem) else "environment"  # e.g. model_unavailable
        return Verdict(Action.WAIT, {"type": kind, "message": message, "waits": waits + 1}, delay, True)
    permanent = _permanent(err, where)
    if permanent is not None:
        return Verdict(Action.FAIL, permanent)
    message = f"{type(err).__name__}: {err}"[:1000] if not isinstance(err, I2VError) else str(err)
    if attempts >= max_attempts:
        msg = f"gave up after {attempts} attempts (max_attempts); the last one: {message}"
        return Verdict(Action.FAIL, {"type": "gave_up", "message": msg})
    delay = backoff_seconds * 2 ** max(0, attempts - 1)
    kind = err.kind if isinstance(err, I2VError) else "transient"
    return Verdict(Action.RETRY, {"type": kind, "message": message}, delay)


def _environment(err: BaseException) -> str | None:
    """What in the machine is in the way, or None when `err` is not such a problem."""
    if isinstance(err, EnvironmentProblem):
        return str(err)
    os_err = _os_error(err)
    if os_err is not None and os_err.errno in ENVIRONMENT_ERRNOS:
        # A rename names both ends; the destination is usually the folder that refuses.
        ends = [str(f) for f in (os_err.filename, os_err.filename2) if f]
        where = f" ({' → '.join(ends)})" if ends else ""
        fix = {
            errno.ENOSPC: "free disk space", errno.EDQUOT: "raise the disk quota or free space",
            errno.EACCES: "make the folder writable by the daemon's user", errno.EPERM:
            "give the daemon's user permission", errno.EROFS: "mount the folder read-write",
        }.get(os_err.errno or 0, "fix the disk or folder")
        return f"{os.strerror(os_err.errno or 0)}{where}: {fix}"
    try:
        from sqlalchemy.exc import DBAPIError, OperationalError
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        return None
    if isinstance(err, OperationalError | DBAPIError):
        return f"the job database is not answering ({first_line(err)})"
    return None


def _permanent(err: BaseException, where: str) -> dict[str, Any] | None:
    """The error of a request that can never succeed as asked, or None."""
    if isinstance(err, InputError | GenerationError):
        return err.as_dict()
    os_err = _os_error(err)
    if os_err is not None and os_err.errno == errno.ENAMETOOLONG:
        return {"type": "invalid_input", "message": (
            f"a file name is too long for the filesystem ({os_err.filename}); rename the image to a shorter name "
            "and drop it again"
        )}
    if isinstance(err, ValueError | TypeError) and where == "generating":
        # The pipeline checked the request and refused it: the same request fails the same way again.
        first = first_line(err, limit=500)
        return {"type": "generation", "message": (
            f"the model's pipeline refused this request: {first}. Ask for another size or frame count "
            "(see README, Model families), or report it if the request was ordinary"
        )}
    return None


def _os_error(err: BaseException) -> OSError | None:
    """`err` itself, or what it wraps (a TransientError from the encoder quoting a full disk)."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
        seen += 1
    return None


__all__ = ["Action", "TransientError", "Verdict", "decide"]
