"""A stalled job, without a daemon: the beat judges it by the one failure policy and puts it back in the queue."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from i2v_daemon.params import Params
from i2v_daemon.queue.clock import utcnow
from i2v_daemon.queue.jobs import JobRequest, JobStatus
from i2v_daemon.queue.store import Store
from i2v_daemon.settings import load_settings
from i2v_daemon.work.closer import Attempt, Closer
from i2v_daemon.work.finish import Finisher
from i2v_daemon.work.progress import JobProgress
from i2v_daemon.work.worker import Worker

PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_stalled_job_is_put_back_in_the_queue_counted_with_the_reason_after_one_backoff(
    store: Store, tmp_path: Path,
) -> None:
    settings = load_settings(None, data_dir=str(tmp_path / "data"), stall_seconds=100, retry_backoff_seconds=30)
    worker = Worker(settings, store, Closer(settings, store, Finisher(settings, store)), worker_id="w1")
    queued, _ = store.enqueue(JobRequest(name="cat", inputs=("cat.png",), intake_key="k", params=PARAMS))
    job = store.claim_next("w1", lease_seconds=60, job_id=queued.id)
    assert job is not None and job.attempts == 1
    clock = Clock()
    progress = JobProgress(store, job.id, "w1", lease_seconds=60, stall_seconds=100, clock=clock,
                           activity=lambda _native_id: (0.0, 0), native_id=0)
    worker.attempt = Attempt(job, phase="loading", progress=progress)
    progress.enter("loading")
    worker.beat()
    assert worker.stalled_at is None  # progress within stall_seconds: only the lease is renewed
    clock.t += 101  # nothing read, no CPU
    before = utcnow()
    worker.beat()
    assert worker.stalled_at is not None
    requeued = store.get(job.id)
    assert requeued is not None and requeued.status is JobStatus.QUEUED and requeued.attempts == 1  # counted
    assert requeued.error is not None and requeued.error["type"] == "stalled"
    assert requeued.error["message"].startswith("no progress for 101 s while loading (stall_seconds = 100)")
    assert requeued.not_before is not None
    assert before + timedelta(seconds=29) < requeued.not_before < utcnow() + timedelta(seconds=31)
    worker.beat()  # said once: a stall is not judged again while the stuck call has not returned
    assert store.get(job.id) == requeued
