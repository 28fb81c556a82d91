"""Job statuses, the allowed transitions, and the frozen values callers get from the store."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class JobStatus(enum.StrEnum):
    QUEUED = "queued"  #: waiting for a worker
    RUNNING = "running"  #: a worker holds the lease and is generating (or finishing) it
    SUCCEEDED = "succeeded"  #: the video, manifest, log and inputs are in output/
    FAILED = "failed"  #: given up; manifest and inputs are in failed/
    CANCELED = "canceled"  #: stopped by a person; manifest and inputs are in failed/

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

#: The only status changes the store will write. Anything else is a bug or a race lost.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED}),
    JobStatus.RUNNING: frozenset(
        # queued again: a transient error, an expired lease, or a shutdown that stopped it
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),  # `i2v-daemon retry`
    JobStatus.CANCELED: frozenset({JobStatus.QUEUED}),  # `i2v-daemon retry`
}


def can_transition(current: JobStatus, to: JobStatus) -> bool:
    return to in TRANSITIONS[current]


@dataclass(frozen=True)
class Params:
    """Generation parameters after the preset and the sidecar are merged (what was asked)."""

    preset: str
    resolution: int
    num_frames: int
    steps: int
    guidance_scale: float
    fps: int
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    # Added with the model families (issue 5); None in rows from before, which load unchanged.
    model: str | None = None  # a name from the config's models; None: "default"
    motion: float | None = None  # 0..1, for families with a motion knob
    lora: str | None = None  # a file name in lora_dir
    lora_scale: float | None = None  # None with a lora: 1.0
    # Round 2 (INTERFACE.md §5, §8); None in older rows: no interpolation, the family's scheduler.
    output_fps: int | None = None  # delivered frame rate; None: fps
    interpolation: str | None = None  # "motion" | "blend" | "rife" when output_fps > fps
    scheduler: str | None = None  # None / "default": the family's own; "ddim" | "dpm++"

    def as_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "resolution": self.resolution,
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "fps": self.fps,
            "seed": self.seed,
            "model": self.model,
            "motion": self.motion,
            "lora": self.lora,
            "lora_scale": self.lora_scale,
            "output_fps": self.output_fps,
            "interpolation": self.interpolation,
            "scheduler": self.scheduler,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Params:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


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
    params: Params | None
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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int | None:
        return (self.effective or {}).get("width")

    @property
    def height(self) -> int | None:
        return (self.effective or {}).get("height")

    @property
    def num_frames(self) -> int | None:
        eff = self.effective or {}
        if "num_frames" in eff:
            return eff["num_frames"]
        return self.params.num_frames if self.params else None
