"""The manifest `job.json`: what was asked, what was done, and why it ended as it did."""

from __future__ import annotations

import functools
import importlib.metadata
from datetime import datetime
from typing import Any

from i2v_daemon import __version__
from i2v_daemon.queue.jobs import Job, JobStatus
from i2v_daemon.views.jobs import iso


@functools.cache
def library_versions() -> dict[str, str | None]:
    """Versions from package metadata, read once per process; needs no torch import (for rejected jobs too)."""
    out: dict[str, str | None] = {"i2v-daemon": __version__}
    for dist in ("torch", "diffusers", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def build(
    job: Job,
    status: JobStatus,
    *,
    finished_at: datetime | None,
    error: dict[str, str] | None,
    output: str | None,
    model: dict[str, Any] | None,
    notes: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest for `job` as it ends with `status` (INTERFACE.md §3, §5, §6); `extra`: poster, postprocess."""
    params = job.params.as_dict() if job.params else None
    requested = None
    if params is not None:
        requested = {k: v for k, v in params.items() if k != "preset" and v is not None}
        requested["preset"] = params["preset"]
    return {
        "job_id": job.id,
        "name": job.name,
        "status": status.value,
        "inputs": list(job.inputs),
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "requested": requested,
        "effective": job.effective,
        "attempts": list(job.tries),
        "attempt_count": job.attempts,
        "model": model,
        "versions": dict(library_versions()),
        "device": job.device,
        "host": job.host,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(finished_at),
        "output": output,
        "error": error,
        "notes": list(notes),
        "folder": job.source or "inbox",  # the inbox folder it came from ("inbox/fast"), or "api"
        "poster": None,
        "postprocess": [],
        **(extra or {}),
    }
