"""Liveness that means progress: phases and steps renew the lease (throttled), a stalled job stops renewing it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from i2v_daemon.errors import LeaseLost
from i2v_daemon.params import Params
from i2v_daemon.queue.clock import utcnow
from i2v_daemon.queue.jobs import JobRequest
from i2v_daemon.queue.store import Store
from i2v_daemon.work.progress import JobProgress

PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Activity:
    """What /proc would say about the worker thread: CPU seconds and bytes read and written."""

    def __init__(self) -> None:
        self.cpu, self.io = 0.0, 0

    def __call__(self, _native_id: int) -> tuple[float, int]:
        return self.cpu, self.io


@pytest.fixture()
def running(store: Store) -> int:
    job, _ = store.enqueue(JobRequest(name="cat", inputs=("cat.png",), intake_key="k", params=PARAMS))
    assert store.claim_next("w1", lease_seconds=60, job_id=job.id) is not None
    return job.id


def progress(store: Store, job_id: int, clock: Clock, activity: Activity, alive: list[float]) -> JobProgress:
    return JobProgress(store, job_id, "w1", lease_seconds=60, stall_seconds=100, on_alive=lambda: alive.append(clock()),
                       clock=clock, activity=activity, native_id=0)


def lease(store: Store, job_id: int):
    job = store.get(job_id)
    assert job is not None
    return job.lease_until, job.phase, job.step, job.updated_us


def test_a_phase_change_is_written_at_once_and_steps_at_most_once_a_second(store: Store, running: int) -> None:
    clock, activity, alive = Clock(), Activity(), []
    p = progress(store, running, clock, activity, alive)
    p.enter("loading")
    assert lease(store, running)[1] == "loading"
    p.advance(1, 50)  # the first step: written (the phase becomes denoising)
    first = lease(store, running)
    assert first[1:3] == ("denoising", 1)
    for step in range(2, 10):  # eight steps within the same second: no write
        clock.t += 0.1
        p.advance(step, 50)
    assert lease(store, running)[2] == 1
    clock.t += 1.0
    p.advance(10, 50)
    assert lease(store, running)[2] == 10
    p.advance(50, 50)  # the last step is always written
    assert lease(store, running)[2] == 50
    assert len(alive) == 1 + 10 + 1  # every phase and step fed the watchdog


def test_a_cancel_request_is_seen_on_the_next_write(store: Store, running: int) -> None:
    clock, activity, alive = Clock(), Activity(), []
    p = progress(store, running, clock, activity, alive)
    assert p.advance(1, 10) is False
    store.request_cancel(running)
    clock.t += 1.5
    assert p.advance(2, 10) is True


def test_an_opaque_phase_renews_the_lease_only_while_the_worker_thread_works(store: Store, running: int) -> None:
    clock, activity, alive = Clock(), Activity(), []
    p = progress(store, running, clock, activity, alive)
    p.enter("loading")  # a 47 GB model load: no steps, but reading
    before = lease(store, running)[3]
    for _ in range(5):  # 50 s of reading weights: progress
        clock.t += 10
        activity.io += 1 << 30
        assert p.beat() is True
    assert lease(store, running)[3] > before and not p.stalled
    clock.t += 50  # nothing read, no CPU: not yet stalled (stall_seconds is 100)
    assert p.beat() is True
    renewed = lease(store, running)
    clock.t += 60
    assert p.beat() is False and p.stalled  # 110 s without activity: the lease is left to run out
    assert lease(store, running) == renewed  # not renewed
    activity.cpu += 1.0  # it woke up: progress again
    clock.t += 1
    assert p.beat() is True and not p.stalled


def test_denoising_counts_steps_not_cpu(store: Store, running: int) -> None:
    clock, activity, alive = Clock(), Activity(), []
    p = progress(store, running, clock, activity, alive)
    p.advance(1, 50)
    clock.t += 101
    activity.cpu += 50  # a spinning CUDA sync is not a step
    assert p.beat() is False and p.stalled


def test_a_lost_lease_stops_the_job(store: Store, running: int) -> None:
    clock, activity, alive = Clock(), Activity(), []
    p = progress(store, running, clock, activity, alive)
    store.requeue_expired(now=utcnow() + timedelta(seconds=120))
    with pytest.raises(LeaseLost):
        p.enter("encoding")


def test_the_denoising_time_comes_from_the_steps_themselves(store: Store, running: int) -> None:
    clock, activity, alive = Clock(), Activity(), []
    p = progress(store, running, clock, activity, alive)
    assert p.denoise_seconds() is None
    for step in range(1, 11):
        p.advance(step, 10)
        clock.t += 0.5
    assert p.denoise_seconds() == pytest.approx(5.0)  # 9 gaps of 0.5 s for 10 steps: 10 steps of 0.5 s
