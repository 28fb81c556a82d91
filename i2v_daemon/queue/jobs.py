"""Job statuses, the allowed transitions, and the frozen values callers get from the store."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from i2v_daemon.params import Params


class JobStatus(enum.StrEnum):
    STAGING = "staging"  #: its row exists; intake is moving its files into work/<id>/input/ (no worker may take it)
    QUEUED = "queued"  #: waiting for a worker
    RUNNING = "running"  #: a worker holds the lease and is generating (or finishing) it
    SUCCEEDED = "succeeded"  #: the video, manifest, log and inputs are in output/
    FAILED = "failed"  #: given up; manifest and inputs are in failed/
    CANCELED = "canceled"  #: stopped by a person; manifest and inputs are in failed/

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def shown(self) -> JobStatus:
        """As users see it, one of the contract's five: staging (files on their way into work/) is queued."""
        return JobStatus.QUEUED if self is JobStatus.STAGING else self


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
#: Job ids are the `jobs.id` column's INTEGER: 32-bit signed on PostgreSQL (SQLite's would hold 64),
#: so a larger number names no job on either.
MAX_JOB_ID = 2**31 - 1

#: The only status changes the store will write. Anything else is a bug or a race lost.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # staged: queued; a rejected input or a cancel is finished by intake itself
    JobStatus.STAGING: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELED}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING}),  # a cancel too: whoever finishes it claims it first
    JobStatus.RUNNING: frozenset(
        # queued again: a transient error, an expired lease, or a shutdown that stopped it
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    # `i2v-daemon retry`: back to staging, where intake brings its files from failed/ into work/
    JobStatus.FAILED: frozenset({JobStatus.STAGING}),
    JobStatus.CANCELED: frozenset({JobStatus.STAGING}),
}


def can_transition(current: JobStatus, to: JobStatus) -> bool:
    return to in TRANSITIONS[current]


@dataclass(frozen=True)
class JobRequest:
    """What intake hands to the store: one image, its sidecar, and what they ask for."""

    name: str  # the image's stem; names the output folder
    inputs: tuple[str, ...]  # file names as dropped (image first)
    intake_key: str  # identifies this instance of the files; a second sighting makes no second job
    prompt: str = ""
    negative_prompt: str = ""
    params: Params | None = None  # None when `rejection` is set
    priority: int = 0
    notes: tuple[str, ...] = ()  # things intake wants in job.log (e.g. "no sidecar: default preset")
    rejection: dict[str, str] | None = None  # {"type", "message"}: invalid input, fails without running
    source: str = "inbox"  # "inbox", "inbox/NAME" (a preset's folder), "api"
    idempotency_key: str | None = None  # the API's Idempotency-Key
    need_bytes: int | None = None  # the smallest card budget it runs on, when intake could work it out


@dataclass(frozen=True)
class Job:
    """A row of the jobs table, as callers see it."""

    id: int
    name: str
    status: JobStatus
    priority: int
    inputs: tuple[str, ...]
    prompt: str
    negative_prompt: str
    params_data: dict[str, Any] | None  # the stored parameters; `params` is their checked value
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker_id: str | None = None
    lease_until: datetime | None = None
    progress: float = 0.0
    step: int = 0
    total_steps: int = 0
    cancel_requested: bool = False
    rejection: dict[str, str] | None = None
    effective: dict[str, Any] | None = None
    tries: tuple[dict[str, Any], ...] = ()  # the manifest's `attempts`: one entry per try
    error: dict[str, str] | None = None
    final_dir: str | None = None  # the output/ or failed/ folder once chosen
    output: str | None = None  # the video's path once written
    model: str | None = None
    device: str | None = None
    host: str | None = None
    not_before: datetime | None = None  # backoff: no worker takes it before this
    updated_us: int = 0  # the row's last change, µs since the epoch (the events feed's cursor)
    phase: str | None = None  # what a running job is doing: loading, denoising, encoding, …
    phase_started_at: datetime | None = None
    source: str | None = None  # "inbox", "inbox/NAME", "api"
    notes: tuple[str, ...] = ()  # adjustments made (rounding, conversions, fallbacks), as in the manifest
    need_bytes: int | None = None  # the smallest card budget it runs on; None: not known yet
    extra: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def params(self) -> Params | None:
        """The parameters as a checked value (pydantic is imported only when a caller needs them)."""
        if not self.params_data:
            return None
        from i2v_daemon.params import params_from_dict

        return params_from_dict(self.params_data)

    @property
    def width(self) -> int | None:
        return (self.effective or {}).get("width")

    @property
    def height(self) -> int | None:
        return (self.effective or {}).get("height")

    @property
    def num_frames(self) -> int | None:
        eff = self.effective or {}
        value = eff["num_frames"] if "num_frames" in eff else (self.params_data or {}).get("num_frames")
        return int(value) if value is not None else None


def __getattr__(name: str) -> Any:
    # `from i2v_daemon.queue.jobs import Params` keeps working; the schema itself lives in params.py.
    if name == "Params":
        from i2v_daemon.params import Params

        return Params
    raise AttributeError(name)
