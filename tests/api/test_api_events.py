"""The events hub over a real store (SQLite and PostgreSQL): each state once, progress held to two a second.

The hub is driven one poll at a time (`poll_once`) with time as a parameter, so the gap between two
progress events is checked without sleeping; the job rows are written by the store's own
transactions, as a worker writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from i2v_daemon.api.events import PAGE, EventHub, Subscriber, parse_event_id, read_changes
from i2v_daemon.params import Params
from i2v_daemon.queue.jobs import JobRequest, JobStatus
from i2v_daemon.queue.store import Store

PARAMS = Params(preset="standard", resolution=512, num_frames=16, steps=50, guidance_scale=9.0, fps=8)


def request(name: str) -> JobRequest:
    return JobRequest(name=name, inputs=(f"{name}.png",), intake_key=name, prompt=f"{name} moves", params=PARAMS)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drain(sub: Subscriber) -> list[tuple[str, Any]]:
    out = []
    while not sub.queue.empty():
        item = sub.queue.get_nowait()
        out.append((item.event, json.loads(item.raw_data) if item.raw_data else None))
    return out


def jobs_in(events: list[tuple[str, Any]]) -> list[tuple[str, float]]:
    return [(d["status"], d["progress"]) for kind, d in events if kind == "job"]


def test_each_state_goes_out_once_and_progress_at_most_every_half_second(store: Store):
    async def scenario() -> None:
        clock = Clock()
        hub = EventHub(store, clock=clock)
        sub = Subscriber()
        hub.subscribers.add(sub)

        job, _ = store.enqueue(request("elk"))
        await hub.poll_once()
        first = drain(sub)
        assert jobs_in(first) == [("queued", 0.0)]
        assert any(kind == "summary" and d["counts"]["queued"] == 1 for kind, d in first)
        await hub.poll_once()
        assert jobs_in(drain(sub)) == []  # read again within the overlap window: not sent again

        assert store.claim_next("w1", lease_seconds=60) is not None
        await hub.poll_once()
        assert jobs_in(drain(sub)) == [("running", 0.0)]  # a status change goes out at once
        store.heartbeat(job.id, "w1", lease_seconds=60, step=1, total_steps=10)
        await hub.poll_once()
        store.heartbeat(job.id, "w1", lease_seconds=60, step=2, total_steps=10)
        await hub.poll_once()
        assert jobs_in(drain(sub)) == []  # progress within half a second of the last event: held
        clock.now += 0.5
        await hub.poll_once()
        assert jobs_in(drain(sub)) == [("running", 0.2)]  # the newest of what was held

        store.heartbeat(job.id, "w1", lease_seconds=60, step=3, total_steps=10)
        await hub.poll_once()
        store.finish(job.id, "w1", JobStatus.SUCCEEDED)
        await hub.poll_once()
        assert jobs_in(drain(sub)) == [("succeeded", 1.0)]  # the held step 3 is superseded, never sent
        clock.now += 5
        await hub.poll_once()
        assert jobs_in(drain(sub)) == []

    asyncio.run(scenario())


def test_a_job_that_is_queued_runs_and_finishes_between_two_polls_still_sends_each_state_in_order(store: Store):
    async def scenario() -> None:
        hub = EventHub(store, clock=Clock())
        sub = Subscriber()
        hub.subscribers.add(sub)
        await hub.poll_once()
        drain(sub)
        quick, _ = store.enqueue(request("quick"))
        assert store.claim_next("w1", lease_seconds=60) is not None
        store.heartbeat(quick.id, "w1", lease_seconds=60, step=1, total_steps=2)
        store.finish(quick.id, "w1", JobStatus.SUCCEEDED)
        await hub.poll_once()
        assert jobs_in(drain(sub)) == [("queued", 0.0), ("running", 0.0), ("succeeded", 1.0)]
        await hub.poll_once()
        assert jobs_in(drain(sub)) == []  # each once

        # Canceled while queued, then retried and queued again before the next poll: each change of status.
        store.request_cancel(quick.id)  # a succeeded job: nothing to cancel, nothing sent
        again, _ = store.enqueue(request("again"))
        job = store.claim_next("w1", lease_seconds=60)
        assert job is not None and job.id == again.id
        store.finish(again.id, "w1", JobStatus.FAILED, error={"type": "invalid_input", "message": "no"})
        assert store.retry(again.id)
        [staged] = store.claim_staging("intake", lease_seconds=60)
        store.mark_staged([staged.id], "intake")
        await hub.poll_once()
        assert [s for s, _ in jobs_in(drain(sub))] == ["queued", "running", "failed", "queued"]

    asyncio.run(scenario())


def test_hosts_whose_clocks_differ_still_end_each_job_on_its_last_state(store: Store, monkeypatch):
    import i2v_daemon.queue.store as store_module

    real = store_module.now_us

    def on_host_ahead_by(seconds: float) -> None:
        monkeypatch.setattr(store_module, "now_us", lambda: real() + int(seconds * 1e6))

    async def scenario() -> None:
        clock = Clock()
        hub = EventHub(store, clock=clock)
        sub = Subscriber()
        hub.subscribers.add(sub)
        await hub.poll_once()
        drain(sub)
        on_host_ahead_by(2)  # the intake's host: its clock runs 2 s ahead of the worker's
        quick, _ = store.enqueue(request("quick"))
        on_host_ahead_by(0)
        assert store.claim_next("w1", lease_seconds=60) is not None
        store.finish(quick.id, "w1", JobStatus.SUCCEEDED)
        await hub.poll_once()
        assert [s for s, _ in jobs_in(drain(sub))] == ["queued", "running", "succeeded"]

        slow, _ = store.enqueue(request("slow"))
        await hub.poll_once()
        drain(sub)
        on_host_ahead_by(1)  # the API's host asks for the cancel, its clock 1 s ahead
        store.request_cancel(slow.id)
        on_host_ahead_by(0)
        clock.now += 0.5
        await hub.poll_once()
        assert [(s, d) for s, d in jobs_in(drain(sub))] == [("queued", 0.0)]  # cancel requested, still queued
        assert store.claim_next("hk", lease_seconds=60, housekeeping=True) is not None  # a worker ends it
        store.finish(slow.id, "hk", JobStatus.CANCELED, error={"type": "canceled", "message": "canceled"})
        clock.now += 0.5
        await hub.poll_once()
        assert [s for s, _ in jobs_in(drain(sub))] == ["canceled"]  # never "running": it never ran

    asyncio.run(scenario())


def test_old_states_are_forgotten_from_the_log(store: Store):
    store.enqueue(request("old"))
    assert len(store.state_log(0)) == 1
    assert store.forget_events(older_than_seconds=3600) == 0
    assert store.forget_events(older_than_seconds=0) == 1 and store.state_log(0) == []


def test_a_reconnecting_client_gets_the_current_state_of_what_changed_since_its_last_event(store: Store):
    async def scenario() -> None:
        hub = EventHub(store)
        elk, _ = store.enqueue(request("elk"))
        last = f"{elk.updated_us}-{elk.id}"
        store.enqueue(request("owl"))
        store.claim_next("w1", lease_seconds=60, job_id=elk.id)
        got = []
        async with contextlib.aclosing(hub.stream(last)) as events:
            async for item in events:
                got.append(item)
                if item.event == "summary":
                    break
        await hub.close()
        assert hub.subscribers == set()  # a client that goes leaves nothing behind
        jobs = [json.loads(i.raw_data) for i in got if i.event == "job"]
        assert sorted((j["name"], j["status"]) for j in jobs) == [("elk", "running"), ("owl", "queued")]
        assert [parse_event_id(i.id) for i in got if i.event == "job"] == sorted(
            parse_event_id(i.id) for i in got if i.event == "job")  # in the order they changed
        assert got[0].retry == 2000  # EventSource waits two seconds before it reconnects

    asyncio.run(scenario())


def test_changes_are_read_past_a_page_even_when_one_instant_fills_it(store: Store):
    owner = "test/1/intake"
    staged = store.stage([request(f"cat{i}") for i in range(PAGE * 2 + 50)], owner=owner, lease_seconds=60)
    store.mark_staged([job.id for job, _ in staged], owner)  # one transaction: very likely one instant for all
    rows = read_changes(store, 0, limit=10_000)
    assert len(rows) == PAGE * 2 + 50 and len({j.id for j in rows}) == len(rows)
    assert [(j.updated_us, j.id) for j in rows] == sorted((j.updated_us, j.id) for j in rows)
    assert all(j.status is JobStatus.QUEUED for j in rows)


def test_a_last_event_id_that_is_not_ours_starts_the_stream_live_instead_of_failing_it() -> None:
    assert parse_event_id("1796160568061234-42") == (1796160568061234, 42)
    for foreign in ("99999999999999999999999-1", f"1796160568061234-{2**63}", "1-0", "abc", "12", "-", ""):
        assert parse_event_id(foreign) is None, foreign
