"""Errors that carry a message a person can act on."""

from __future__ import annotations

from typing import Any


class I2VError(Exception):
    """Base class: `str(err)` is a complete, actionable sentence."""

    kind = "error"

    def as_dict(self) -> dict[str, str]:
        return {"type": self.kind, "message": str(self)}


class InputError(I2VError):
    """Something the user dropped is invalid; retrying will not help until they fix it."""

    kind = "invalid_input"


class ConfigError(I2VError):
    """The configuration is invalid; the message names the key."""

    kind = "config"


class GenerationError(I2VError):
    """The model could not produce a video for this request (permanent)."""

    kind = "generation"


class OutOfMemory(GenerationError):
    """Even the lowest rung of the resolution ladder did not fit in GPU memory."""

    kind = "out_of_memory"


class TransientError(I2VError):
    """A failure that may pass (database locked, disk full, encoder killed): retry with backoff."""

    kind = "transient"


class JobCanceled(I2VError):
    """The job was canceled (by `i2v-daemon cancel` or a shutdown) at a step boundary."""

    kind = "canceled"


class EnvironmentProblem(I2VError):
    """The machine, not the job, is in the way (disk full, no permission, database gone, model
    not reachable): the job is kept, the reason shown, and it runs again once the cause is gone."""

    kind = "environment"


class DatabaseGone(EnvironmentProblem):
    """The job database is missing, or was deleted or replaced under a running daemon."""

    kind = "database"


class ModelUnavailable(EnvironmentProblem):
    """A Hub model is not in the cache and cannot be downloaded now (offline, Hub down)."""

    kind = "model_unavailable"


class NotReady(EnvironmentProblem):
    """A start-up dependency is not there yet (a database that refuses connections, a read-only share,
    a GPU the driver does not show yet): the daemon waits for it instead of exiting; `what` names it
    ("the database at db:5432", "output_dir /srv/out"), `cause` says why in one line."""

    kind = "not_ready"

    def __init__(self, what: str, cause: str, fix: str = "") -> None:
        super().__init__(f"waiting for {what}: {cause}")
        self.what = what
        self.cause = cause
        self.fix = fix


class CardTooSmall(I2VError):
    """This worker's card is smaller than the least the job needs: it goes back to the queue for a larger one."""

    kind = "needs_larger_card"


class JobStalled(I2VError):
    """The running job showed no progress for `stall_seconds`."""

    kind = "stalled"


class LeaseLost(Exception):
    """This worker no longer owns the job (lease expired and another took it, or it was canceled)."""


class StopDaemon(Exception):
    """The daemon cannot go on (its database vanished, its default model can never load); exit 78."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", ""))
        self.error = error


def first_line(
    err: BaseException, *, limit: int | None = None, with_type: bool = False, default: str | None = None,
) -> str:
    """The first line of an error's message, for a one-line report of a driver's or a library's error.

    A database error gives its driver's own message (SQLAlchemy's adds the statement and a link).
    `limit` cuts the line; `with_type` puts the error's type first ("OSError: …"); an error with no
    message gives `default`, or else its type's name.
    """
    text = str(getattr(err, "orig", None) or err).strip()
    if not text:
        return default if default is not None else type(err).__name__
    line = text.splitlines()[0]
    if limit is not None:
        line = line[:limit]
    return f"{type(err).__name__}: {line}" if with_type else line
