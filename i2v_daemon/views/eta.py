"""How long a job will still take, from what the store already knows: its phase and step, and the
seconds per step that recent tries of the same model took at their size.

Time per step grows with pixels × frames (attention runs through SDPA, the convolutions are
linear), so recent tries are reduced to seconds per (pixel-frame × step) and scaled to the job.
Pure arithmetic over frozen values; `now` is an argument.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from i2v_daemon.queue.jobs import Job, JobStatus

#: Share of a job's time after its last denoising step (VAE decode, encode, publish) when unmeasured.
TAIL_SHARE = 0.08
#: Recent tries kept per model: enough to smooth out a cold start, few enough to follow a new card.
KEEP = 20


@dataclass(frozen=True)
class Estimator:
    """Seconds per pixel-frame-step per model name (None: the whole history, whatever the model)."""

    rates: dict[str | None, float]

    @classmethod
    def from_tries(cls, tries: Iterable[dict[str, Any]]) -> Estimator:
        per: dict[str | None, list[float]] = {}
        for t in tries:
            work = _work(t.get("width"), t.get("height"), t.get("num_frames"), t.get("steps"))
            seconds = t.get("denoise_seconds") or t.get("seconds")
            if t.get("outcome") != "succeeded" or not work or not seconds:
                continue
            rate = float(seconds) / work
            per.setdefault(t.get("model_name") or "default", []).append(rate)
            per.setdefault(None, []).append(rate)
        return cls({k: statistics.median(v[-KEEP:]) for k, v in per.items()})

    def job_seconds(self, job: Job) -> float | None:
        """The whole of a job's generation, from the history (None: nothing comparable ran yet)."""
        width, height, frames = _size(job)
        steps = (job.params_data or {}).get("steps")
        work = _work(width, height, frames, steps)
        name = (job.params_data or {}).get("model") or "default"
        rate = self.rates.get(name) or self.rates.get(None)
        if not work or rate is None:
            return None
        return rate * work * (1 + TAIL_SHARE)

    def remaining(self, job: Job, now: datetime) -> float | None:
        """Seconds until a running job ends (None when nothing says)."""
        if job.status is not JobStatus.RUNNING:
            return None
        if job.phase == "denoising" and job.step > 1 and job.total_steps and job.phase_started_at:
            # phase_started_at is when step 1 was reported: since then, step - 1 steps ran.
            per_step = max(0.0, (now - job.phase_started_at).total_seconds()) / (job.step - 1)
            left = (job.total_steps - job.step) * per_step
            return round(left + TAIL_SHARE * job.total_steps * per_step, 1)
        if job.phase in ("decoding", "encoding", "interpolating", "publishing"):
            return None  # the tail: seconds, and no measure of how far along it is
        whole = self.job_seconds(job)
        if whole is None:
            return None
        elapsed = (now - job.started_at).total_seconds() if job.started_at else 0.0
        return round(max(0.0, whole - elapsed), 1)

    def queue_eta(self, queue: Sequence[Job], running: Sequence[Job], now: datetime) -> dict[int, float | None]:
        """Seconds until each queued job (in queue order) is expected to finish, with the workers now busy."""
        workers = max(1, len(running))
        ahead = 0.0
        for r in running:
            left = self.remaining(r, now)
            if left is None:
                return {q.id: None for q in queue}
            ahead += left
        out: dict[int, float | None] = {}
        unknown = False
        for q in queue:
            own = self.job_seconds(q)
            if own is None or unknown:
                unknown = True
                out[q.id] = None
                continue
            out[q.id] = round(ahead / workers + own, 1)
            ahead += own
        return out


def _size(job: Job) -> tuple[Any, Any, Any]:
    eff = job.effective or {}
    params = job.params_data or {}
    width = eff.get("width") or params.get("width")
    height = eff.get("height") or params.get("height")
    if not width or not height:
        side = params.get("resolution")
        width = height = side  # the aspect is unknown before the model plans it: a square is close enough
    return width, height, eff.get("num_frames") or params.get("num_frames")


def _work(width: Any, height: Any, frames: Any, steps: Any) -> float:
    try:
        return float(width) * float(height) * float(frames) * float(steps)
    except (TypeError, ValueError):
        return 0.0
