"""The job store on real SQLite and real PostgreSQL (`database_url` runs each test on both): claims,
leases, fencing, retries, races."""

from __future__ import annotations

import ast
import itertools
import re
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from i2v_daemon.errors import LeaseLost
from i2v_daemon.queue import store as store_module
from i2v_daemon.queue.jobs import TERMINAL, TRANSITIONS, JobRequest, JobStatus, Params, can_transition
from i2v_daemon.queue.store import Store
from i2v_daemon.views.jobs import job_summary

Q, R, S, F, C = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED
ST = JobStatus.STAGING

#: Written out by hand from INTERFACE.md and jobs.py's comments, so a change to the table shows up here.
#: A cancel of a queued job goes through running (whoever finishes it holds the lease while moving
#: files); a retry goes back through staging (intake alone moves files into work/).
ALLOWED = {(ST, Q), (ST, F), (ST, C), (Q, R), (R, S), (R, F), (R, C), (R, Q), (F, ST), (C, ST)}

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
LEASE = 60.0
PARAMS = Params(preset="standard", resolution=512, num_frames=16, steps=50, guidance_scale=9.0, fps=8)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def request(name: str, *, key: str | None = None, priority: int = 0, rejected: bool = False) -> JobRequest:
    if rejected:
        return JobRequest(
            name=name, inputs=(f"{name}.png",), intake_key=key or name,
            rejection={"type": "invalid_input", "message": f"{name}.png: broken"},
        )
    return JobRequest(
        name=name, inputs=(f"{name}.png", f"{name}.txt"), intake_key=key or name, prompt=f"{name} moves",
        params=PARAMS, priority=priority,
    )


@pytest.fixture()
def db_url(database_url: str) -> str:
    return database_url


@pytest.fixture()
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url, max_attempts=3, describe=job_summary)
    s.create_schema()
    yield s
    s.close()


def running(store: Store, name: str = "cat", worker: str = "w1", now: datetime = T0, lease: float = LEASE) -> int:
    """Enqueue one job and claim it; returns its id."""
    job, _ = store.enqueue(request(name), now=now)
    claimed = store.claim_next(worker, lease_seconds=lease, now=now, job_id=job.id)
    assert claimed is not None
    return claimed.id


# ---- the transition table -------------------------------------------------------------------------


@pytest.mark.parametrize(("frm", "to"), list(itertools.product(JobStatus, JobStatus)), ids=str)
def test_the_transition_table_allows_exactly_the_designed_status_changes(frm: JobStatus, to: JobStatus) -> None:
    assert can_transition(frm, to) is ((frm, to) in ALLOWED)


def test_every_status_has_a_row_in_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(JobStatus)


def test_terminal_states_have_no_way_out_except_failed_and_canceled_back_to_staging() -> None:
    assert {S, F, C} == TERMINAL
    assert all(s.is_terminal for s in TERMINAL) and not Q.is_terminal and not R.is_terminal
    assert not ST.is_terminal
    assert TRANSITIONS[S] == frozenset()
    assert TRANSITIONS[F] == frozenset({ST})
    assert TRANSITIONS[C] == frozenset({ST})


def test_no_status_can_transition_to_itself() -> None:
    assert not any(can_transition(s, s) for s in JobStatus)


# ---- the SQLite file ----------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_sqlite_file_runs_in_wal_mode_with_full_sync_and_a_busy_timeout(store: Store, tmp_path: Path) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    # WAL is a property of the file: a plain sqlite3 connection sees it too.
    raw = sqlite3.connect(tmp_path / "jobs.db")
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


# ---- intake -------------------------------------------------------------------------------------


def test_enqueue_is_idempotent_by_intake_key(store: Store) -> None:
    first, created = store.enqueue(request("cat", key="k1"), now=T0)
    assert created is True
    assert first.status is Q and first.attempts == 0 and first.max_attempts == 3
    assert first.inputs == ("cat.png", "cat.txt") and first.params == PARAMS
    again, created_again = store.enqueue(request("cat", key="k1"), now=at(5))
    assert created_again is False
    assert again.id == first.id and again.created_at == first.created_at
    other, created_other = store.enqueue(request("cat", key="k2"), now=at(6))
    assert created_other is True and other.id != first.id
    assert store.counts()["queued"] == 2


def test_enqueue_returns_the_existing_job_even_after_it_finished(store: Store) -> None:
    job_id = running(store, "cat")
    store.finish(job_id, "w1", S, now=at(1))
    again, created = store.enqueue(request("cat"), now=at(2))
    assert created is False and again.id == job_id and again.status is S


def test_created_at_is_stored_as_the_given_utc_time(store: Store) -> None:
    job, _ = store.enqueue(request("cat"), now=T0)
    assert job.created_at == T0 and job.created_at.tzinfo is not None


# ---- claiming -----------------------------------------------------------------------------------


def test_claim_order_is_rejections_and_cancels_first_then_priority_then_first_in_first_out(store: Store) -> None:
    ids = {}
    for name, kwargs in [
        ("plain", {}), ("urgent1", {"priority": 5}), ("urgent2", {"priority": 5}), ("broken", {"rejected": True}),
        ("unwanted", {}), ("low", {"priority": -3}),
    ]:
        job, _ = store.enqueue(request(name, **kwargs), now=T0)
        ids[job.id] = name
    unwanted = next(i for i, n in ids.items() if n == "unwanted")
    store.request_cancel(unwanted)

    order = []
    while (job := store.claim_next("w1", lease_seconds=LEASE, now=at(1))) is not None:
        order.append(job.name)
    assert order == ["broken", "unwanted", "urgent1", "urgent2", "plain", "low"]


def test_a_claim_increments_attempts_and_takes_a_lease_for_the_worker(store: Store) -> None:
    job, _ = store.enqueue(request("cat"), now=T0)
    claimed = store.claim_next("host/1", lease_seconds=LEASE, now=at(10), host="host", device="cpu")
    assert claimed is not None and claimed.id == job.id
    assert claimed.status is R
    assert claimed.attempts == 1
    assert claimed.worker_id == "host/1"
    assert claimed.lease_until == at(10 + LEASE)
    assert claimed.started_at == at(10)
    assert (claimed.host, claimed.device) == ("host", "cpu")
    assert store.get(job.id) == claimed


def test_a_number_past_any_job_id_names_no_job_on_either_database(store: Store) -> None:
    from i2v_daemon.queue.jobs import MAX_JOB_ID

    # PostgreSQL's INTEGER stops at 2³¹−1; a larger number must not reach the driver at all.
    assert store.get(MAX_JOB_ID) is None and store.get(MAX_JOB_ID + 1) is None and store.get(2**70) is None


def test_an_empty_queue_gives_no_claim(store: Store) -> None:
    assert store.claim_next("w1", lease_seconds=LEASE, now=T0) is None


def test_a_running_job_is_not_claimed_a_second_time(store: Store) -> None:
    running(store, "cat", worker="w1")
    assert store.claim_next("w2", lease_seconds=LEASE, now=at(1)) is None


def test_claim_by_job_id_takes_that_job_even_when_others_come_first(store: Store) -> None:
    low, _ = store.enqueue(request("low", priority=-5), now=T0)
    store.enqueue(request("high", priority=5), now=T0)
    claimed = store.claim_next("cli", lease_seconds=LEASE, now=at(1), job_id=low.id)
    assert claimed is not None and claimed.id == low.id
    assert store.claim_next("cli", lease_seconds=LEASE, now=at(1), job_id=low.id) is None


def test_a_card_claims_only_jobs_whose_need_fits_it_or_is_not_known_yet(store: Store) -> None:
    from dataclasses import replace

    gib = 1024**3
    big = store.enqueue(replace(request("big"), need_bytes=30 * gib, priority=9))[0]
    unknown = store.enqueue(request("unknown", priority=5))[0]
    small = store.enqueue(replace(request("small"), need_bytes=10 * gib))[0]
    rejected = store.enqueue(replace(request("broken", rejected=True), need_bytes=99 * gib))[0]
    assert store.get(big.id).need_bytes == 30 * gib  # type: ignore[union-attr]

    card = 24 * gib
    taken = [store.claim_next("w24", lease_seconds=LEASE, budget_bytes=card) for _ in range(4)]
    # A rejection is ended by anyone; the 30 GiB job is left for a larger card; the rest by priority.
    assert [j.id if j else None for j in taken] == [rejected.id, unknown.id, small.id, None]
    assert store.claim_next("w80", lease_seconds=LEASE, budget_bytes=80 * gib).id == big.id  # type: ignore[union-attr]


def test_queued_jobs_no_live_card_can_take_say_so_once(store: Store) -> None:
    from dataclasses import replace

    gib = 1024**3
    big = store.enqueue(replace(request("big"), need_bytes=30 * gib))[0]
    fits = store.enqueue(replace(request("fits"), need_bytes=10 * gib))[0]
    reason = lambda need: {"type": "needs_larger_card", "message": f"needs {need // gib} GiB"}  # noqa: E731
    assert store.explain_needs(24 * gib, reason) == [big.id]
    assert store.get(big.id).error == {"type": "needs_larger_card", "message": "needs 30 GiB"}  # type: ignore[union-attr]
    assert store.get(fits.id).error is None  # type: ignore[union-attr]
    assert store.explain_needs(24 * gib, reason) == []  # said already: no second write


def test_cards_are_live_while_advertised_not_once_stopped_and_forgotten_after_a_week(store: Store) -> None:
    from i2v_daemon.queue.control import CARD_FORGET_SECONDS, CARD_LIVE_SECONDS

    gib = 1024**3
    store.control.advertise_card("a/1/cuda:0", host="a", device="cuda:0", budget_bytes=24 * gib, now=T0)
    store.control.advertise_card("b/2/cuda:0", host="b", device="cuda:0", budget_bytes=80 * gib, now=T0)
    cards = store.control.cards(now=at(1))
    assert [(c["worker"], c["budget_bytes"], c["live"]) for c in cards] == [
        ("b/2/cuda:0", 80 * gib, True), ("a/1/cuda:0", 24 * gib, True)]  # largest first
    store.control.retire_card("b/2/cuda:0")
    assert [c["live"] for c in store.control.cards(now=at(1))] == [False, True]  # stopped, still known
    assert [c["live"] for c in store.control.cards(now=at(CARD_LIVE_SECONDS + 1))] == [False, False]  # killed: aged
    assert store.control.cards(now=at(CARD_FORGET_SECONDS + 1)) == []
    store.control.advertise_card("c/3/cuda:0", host="c", device="cuda:0", budget_bytes=gib,
                                 now=at(CARD_FORGET_SECONDS + 2))
    assert [c["worker"] for c in store.control.cards(now=at(CARD_FORGET_SECONDS + 3))] == ["c/3/cuda:0"]
    assert "card:" not in str(store.control.problems())  # cards are not problems


def test_a_job_in_backoff_is_not_claimed_until_now_passes_its_not_before(store: Store) -> None:
    job_id = running(store, "cat", now=T0)
    store.requeue(job_id, "w1", error={"type": "transient", "message": "disk full"}, not_before=at(30))
    queued = store.get(job_id)
    assert queued is not None and queued.status is Q and queued.worker_id is None and queued.lease_until is None
    assert queued.error == {"type": "transient", "message": "disk full"}

    assert store.claim_next("w1", lease_seconds=LEASE, now=at(29)) is None
    assert store.has_runnable(now=at(29)) is False
    assert store.has_runnable() is True  # without `now`, backoff is ignored
    again = store.claim_next("w1", lease_seconds=LEASE, now=at(31))
    assert again is not None and again.id == job_id and again.attempts == 2


def test_a_job_in_backoff_does_not_block_a_lower_priority_job(store: Store) -> None:
    urgent = running(store, "urgent", now=T0)
    store.requeue(urgent, "w1", not_before=at(100))
    calm, _ = store.enqueue(request("calm", priority=-1), now=T0)
    claimed = store.claim_next("w1", lease_seconds=LEASE, now=at(1))
    assert claimed is not None and claimed.id == calm.id


def test_a_requeue_after_a_shutdown_refunds_the_attempt(store: Store) -> None:
    job_id = running(store, "cat")
    store.requeue(job_id, "w1", refund_attempt=True)
    job = store.get(job_id)
    assert job is not None and job.status is Q and job.attempts == 0


# ---- heartbeat ----------------------------------------------------------------------------------


def test_a_heartbeat_renews_the_lease_and_records_progress(store: Store) -> None:
    job_id = running(store, "cat", now=T0)
    assert store.heartbeat(job_id, "w1", lease_seconds=LEASE, now=at(30), step=5, total_steps=20) is False
    job = store.get(job_id)
    assert job is not None
    assert job.lease_until == at(30 + LEASE)
    assert (job.step, job.total_steps, job.progress) == (5, 20, 0.25)
    # A heartbeat without a step keeps the recorded progress.
    store.heartbeat(job_id, "w1", lease_seconds=LEASE, now=at(40))
    job = store.get(job_id)
    assert job is not None and job.lease_until == at(40 + LEASE) and job.progress == 0.25


def test_a_heartbeat_says_when_a_cancel_was_requested(store: Store) -> None:
    job_id = running(store, "cat")
    store.request_cancel(job_id)
    assert store.heartbeat(job_id, "w1", lease_seconds=LEASE, now=at(1)) is True


def test_a_heartbeat_from_the_wrong_worker_raises_lease_lost_and_changes_nothing(store: Store) -> None:
    job_id = running(store, "cat", now=T0)
    with pytest.raises(LeaseLost):
        store.heartbeat(job_id, "intruder", lease_seconds=LEASE, now=at(30), step=3, total_steps=4)
    job = store.get(job_id)
    assert job is not None and job.lease_until == at(LEASE) and job.step == 0


def test_a_heartbeat_for_a_job_that_is_not_running_raises_lease_lost(store: Store) -> None:
    queued, _ = store.enqueue(request("queued"), now=T0)
    with pytest.raises(LeaseLost):
        store.heartbeat(queued.id, "w1", lease_seconds=LEASE, now=at(1))
    done = running(store, "done")
    store.finish(done, "w1", S, now=at(2))
    with pytest.raises(LeaseLost):
        store.heartbeat(done, "w1", lease_seconds=LEASE, now=at(3))


# ---- finishing ----------------------------------------------------------------------------------


def test_finish_writes_the_terminal_status_only_for_the_worker_holding_the_lease(store: Store) -> None:
    job_id = running(store, "cat", worker="w1")
    with pytest.raises(LeaseLost):
        store.finish(job_id, "w2", F, now=at(5), error={"type": "generation", "message": "nope"})
    job = store.get(job_id)
    assert job is not None and job.status is R and job.error is None and job.finished_at is None

    store.finish(job_id, "w1", S, now=at(6), output="/out/cat/cat.mp4")
    job = store.get(job_id)
    assert job is not None
    assert job.status is S and job.finished_at == at(6) and job.lease_until is None
    assert job.progress == 1.0 and job.output == "/out/cat/cat.mp4" and job.error is None


def test_a_second_finish_of_the_same_job_raises_lease_lost_and_keeps_the_first_outcome(store: Store) -> None:
    job_id = running(store, "cat")
    store.finish(job_id, "w1", F, now=at(1), error={"type": "generation", "message": "first"})
    for status in (S, F, C):
        with pytest.raises(LeaseLost):
            store.finish(job_id, "w1", status, now=at(2), error={"type": "x", "message": "second"})
    job = store.get(job_id)
    assert job is not None and job.status is F and job.error == {"type": "generation", "message": "first"}
    assert job.finished_at == at(1)


def test_finish_refuses_a_status_that_is_not_terminal(store: Store) -> None:
    job_id = running(store, "cat")
    for status in (Q, R):
        with pytest.raises(ValueError, match="terminal"):
            store.finish(job_id, "w1", status)
    job = store.get(job_id)
    assert job is not None and job.status is R


def test_finish_of_a_queued_job_raises_lease_lost(store: Store) -> None:
    job, _ = store.enqueue(request("cat"), now=T0)
    with pytest.raises(LeaseLost):
        store.finish(job.id, "w1", S, now=at(1))
    assert store.get(job.id).status is Q  # type: ignore[union-attr]


# ---- leases -------------------------------------------------------------------------------------


def test_requeue_expired_requeues_only_jobs_whose_lease_has_passed(store: Store) -> None:
    short = running(store, "short", worker="w1", now=T0, lease=10)
    long = running(store, "long", worker="w2", now=T0, lease=100)
    exact = running(store, "exact", worker="w3", now=T0, lease=50)
    waiting, _ = store.enqueue(request("waiting"), now=T0)

    assert store.requeue_expired(now=at(5)) == []
    assert store.requeue_expired(now=at(50)) == [short]  # `exact` expires at 50: not yet passed

    short_job, long_job, exact_job = store.get(short), store.get(long), store.get(exact)
    assert short_job is not None and short_job.status is Q and short_job.worker_id is None
    assert short_job.lease_until is None and short_job.attempts == 1  # the attempt counts
    assert long_job is not None and long_job.status is R and long_job.worker_id == "w2"
    assert exact_job is not None and exact_job.status is R
    assert store.get(waiting.id).status is Q  # type: ignore[union-attr]
    assert sorted(store.requeue_expired(now=at(51))) == [exact]


def test_a_job_reclaimed_after_its_lease_expired_can_no_longer_be_touched_by_its_first_worker(store: Store) -> None:
    job_id = running(store, "cat", worker="A", now=T0, lease=10)
    assert store.requeue_expired(now=at(20)) == [job_id]
    taken = store.claim_next("B", lease_seconds=LEASE, now=at(21))
    assert taken is not None and taken.id == job_id and taken.attempts == 2

    with pytest.raises(LeaseLost):
        store.finish(job_id, "A", S, now=at(22), output="/out/cat/cat.mp4")
    with pytest.raises(LeaseLost):
        store.heartbeat(job_id, "A", lease_seconds=LEASE, now=at(22))
    with pytest.raises(LeaseLost):
        store.update_running(job_id, "A", final_dir="/out/cat")
    with pytest.raises(LeaseLost):
        store.requeue(job_id, "A")
    job = store.get(job_id)
    assert job is not None and job.status is R and job.worker_id == "B" and job.final_dir is None

    store.finish(job_id, "B", S, now=at(30))
    assert store.get(job_id).status is S  # type: ignore[union-attr]


def test_requeue_workers_requeues_only_the_named_workers_jobs(store: Store) -> None:
    dead = running(store, "dead", worker="host/1")
    alive = running(store, "alive", worker="host/2")
    assert sorted(store.running_workers()) == ["host/1", "host/2"]
    assert store.requeue_workers(["host/1"]) == [dead]
    assert store.requeue_workers([]) == []
    assert store.get(alive).status is R  # type: ignore[union-attr]


# ---- people's commands --------------------------------------------------------------------------


def test_retry_is_refused_for_jobs_that_are_not_failed_or_canceled(store: Store) -> None:
    queued, _ = store.enqueue(request("queued"), now=T0)
    run = running(store, "run")
    done = running(store, "done")
    store.finish(done, "w1", S, now=at(1))
    for job_id in (queued.id, run, done, 9999):
        assert store.retry(job_id) is False
    assert [store.get(i).status for i in (queued.id, run, done)] == [Q, R, S]  # type: ignore[union-attr]


@pytest.mark.parametrize("end", [F, C])
def test_retry_requeues_a_failed_or_canceled_job_with_fresh_attempts_and_remembers_its_folder(
    store: Store, end: JobStatus
) -> None:
    job_id = running(store, "cat")
    store.update_running(job_id, "w1", final_dir="/failed/cat")
    store.finish(job_id, "w1", end, now=at(1), error={"type": "generation", "message": "boom"})

    assert store.retry(job_id) is True
    job = store.get(job_id)
    assert job is not None
    # Back to staging, unowned: the retry only asks; an intake brings the files back, then queues it.
    assert job.status is ST and job.attempts == 0 and job.error is None
    assert job.final_dir is None and job.finished_at is None and job.worker_id is None
    assert job.extra["previous_dir"] == "/failed/cat"
    assert store.retry(job_id) is False  # staging now
    assert store.claim_next("w2", lease_seconds=LEASE, now=at(2)) is None  # no worker takes a staging job
    [taken] = store.claim_staging("intake", lease_seconds=LEASE, now=at(2))
    assert taken.id == job_id and store.claim_staging("other", lease_seconds=LEASE, now=at(2)) == []
    assert store.mark_staged([job_id], "intake") == [job_id]
    again = store.claim_next("w2", lease_seconds=LEASE, now=at(2))
    assert again is not None and again.id == job_id and again.attempts == 1


def test_cancel_can_be_requested_only_for_queued_or_running_jobs(store: Store) -> None:
    queued, _ = store.enqueue(request("queued"), now=T0)
    done = running(store, "done")
    store.finish(done, "w1", S, now=at(1))
    assert store.request_cancel(queued.id).cancel_requested is True  # type: ignore[union-attr]
    assert store.request_cancel(done).cancel_requested is False  # type: ignore[union-attr]
    assert store.request_cancel(12345) is None


def test_update_running_rejects_fields_it_does_not_own(store: Store) -> None:
    job_id = running(store, "cat")
    for field in ("status", "attempts", "lease_until", "cancel_requested", "nonsense"):
        with pytest.raises(ValueError, match=field):
            store.update_running(job_id, "w1", **{field: "x"})
    store.update_running(job_id, "w1", effective={"width": 96}, model="tiny", tries=[{"try": 1}])
    job = store.get(job_id)
    assert job is not None and job.status is R and job.effective == {"width": 96} and job.tries == ({"try": 1},)


def test_two_jobs_cannot_record_the_same_final_folder(store: Store) -> None:
    first = running(store, "cat", worker="w1")
    second = running(store, "cat-again", worker="w2")
    store.update_running(first, "w1", final_dir="/out/cat")
    with pytest.raises(IntegrityError):
        store.update_running(second, "w2", final_dir="/out/cat")
    store.update_running(second, "w2", final_dir="/out/cat-2")
    assert store.get(second).final_dir == "/out/cat-2"  # type: ignore[union-attr]


# ---- reading ------------------------------------------------------------------------------------


def test_counts_always_has_exactly_the_contracts_five_statuses(store: Store) -> None:
    assert store.counts() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}
    store.enqueue(request("a"), now=T0)
    running(store, "b")
    done = running(store, "c")
    store.finish(done, "w1", C, now=at(1))
    assert store.counts() == {"queued": 1, "running": 1, "succeeded": 0, "failed": 0, "canceled": 1}


def test_list_jobs_is_newest_first_and_honours_the_limit_and_status_filter(store: Store) -> None:
    ids = [store.enqueue(request(f"j{i}"), now=at(i))[0].id for i in range(5)]
    assert [j.id for j in store.list_jobs(3)] == ids[::-1][:3]
    assert [j.id for j in store.list_jobs(100)] == ids[::-1]
    assert store.list_jobs(0) == []
    claimed = store.claim_next("w1", lease_seconds=LEASE, now=at(10))
    assert claimed is not None
    assert [j.id for j in store.list_jobs(10, statuses=[R])] == [claimed.id]


def test_jobs_are_frozen_values(store: Store) -> None:
    job, _ = store.enqueue(request("cat"), now=T0)
    with pytest.raises(AttributeError):
        job.status = R  # type: ignore[misc]


# ---- races --------------------------------------------------------------------------------------


@pytest.mark.parametrize("engines", ["one engine per thread", "one shared engine"])
def test_many_threads_claiming_from_one_database_never_claim_a_job_twice(
    db_url: str, store: Store, engines: str
) -> None:
    n_jobs, n_threads, claims_each = 100, 8, 25
    for i in range(n_jobs):
        store.enqueue(request(f"j{i}", priority=i % 3), now=T0)
    start = threading.Barrier(n_threads)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claimer(worker: str) -> None:
        # Its own engine is like another process; the shared one is like the daemon's threads.
        own = Store(db_url, max_attempts=3) if engines == "one engine per thread" else store
        got: list[int] = []
        try:
            start.wait()
            for _ in range(claims_each):
                job = own.claim_next(worker, lease_seconds=LEASE, now=at(1))
                if job is not None:
                    assert job.worker_id == worker and job.attempts == 1
                    got.append(job.id)
        except BaseException as err:
            errors.append(err)
        finally:
            claimed[worker] = got
            if own is not store:
                own.close()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    everything = [job_id for got in claimed.values() for job_id in got]
    assert len(everything) == len(set(everything)) == n_jobs
    assert store.counts()["running"] == n_jobs
    # Every row says the same worker that believed it won.
    for worker, got in claimed.items():
        for job_id in got:
            assert store.get(job_id).worker_id == worker  # type: ignore[union-attr]


# ---- one writer of a status, and the log of what users see --------------------------------------

#: The SET list of an UPDATE of the jobs table, as the drivers receive it.
UPDATE_JOBS = re.compile(r"^\s*UPDATE\s+jobs\s+SET\s+(?P<set>.*?)\s+WHERE\s", re.IGNORECASE | re.DOTALL)


def every_change_of_status(store: Store) -> tuple[int, int, int]:
    """Each of the store's intents that changes a job's status, at least once; the ids of its three jobs."""
    first = running(store, "first")  # staged, queued, running
    store.finish(first, "w1", F, now=at(1), error={"type": "generation", "message": "boom"})
    assert store.retry(first)  # back to staging
    [taken] = store.claim_staging("intake", lease_seconds=LEASE, now=at(2))
    assert store.mark_staged([taken.id], "intake") == [first]
    claimed = store.claim_next("w1", lease_seconds=LEASE, now=at(3))
    assert claimed is not None and claimed.id == first
    store.requeue(first, "w1", refund_attempt=True)
    store.claim_next("w1", lease_seconds=10, now=at(4))
    assert store.requeue_expired(now=at(60)) == [first]
    second = running(store, "second", worker="dead/1", now=at(61))
    assert store.requeue_workers(["dead/1"]) == [second]
    [(rejected, _)] = store.stage([request("rejected", rejected=True)], owner="intake", lease_seconds=LEASE)
    store.finish(rejected.id, "intake", F, frm=ST, error={"type": "invalid_input", "message": "broken"})
    return first, second, rejected.id


def test_every_status_write_goes_through_the_one_guarded_writer(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An UPDATE that sets `jobs.status` anywhere but in `_set_status` (which checks TRANSITIONS) fails this."""
    within = threading.local()
    writer = Store._set_status

    def watched(*args: Any, **kwargs: Any) -> Any:
        within.yes = True
        try:
            return writer(*args, **kwargs)
        finally:
            within.yes = False

    monkeypatch.setattr(Store, "_set_status", watched)
    writes: list[tuple[bool, str]] = []

    def seen(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        found = UPDATE_JOBS.match(statement)
        if found and re.search(r"\bstatus\s*=", found["set"]):
            writes.append((getattr(within, "yes", False), statement))

    event.listen(store.engine, "before_cursor_execute", seen)
    every_change_of_status(store)
    assert len(writes) >= 10  # the watch sees every status write (so the test can fail) ...
    assert [sql for by_writer, sql in writes if not by_writer] == []  # ... and each was the writer's


def test_no_function_of_the_store_but_the_writer_names_the_status_column_in_a_write() -> None:
    """The static twin of the test above, for code paths it does not run."""
    tree = ast.parse(Path(store_module.__file__).read_text())
    naming: set[str] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                as_keyword = isinstance(node, ast.keyword) and node.arg == "status"
                as_key = isinstance(node, ast.Dict) and any(
                    isinstance(k, ast.Constant) and k.value == "status" for k in node.keys
                )
                if as_keyword or as_key:
                    naming.add(fn.name)
    # _row: a new row's first status (an INSERT, not a change); _log_states: the events log's own column.
    assert naming == {"_set_status", "_row", "_log_states"}


def test_a_status_change_the_table_forbids_is_refused_and_nothing_is_written(store: Store) -> None:
    job_id = running(store, "cat")
    store.finish(job_id, "w1", S, now=at(1))
    with pytest.raises(ValueError, match="illegal transition succeeded → failed"):
        store.finish(job_id, "w1", F, frm=S, now=at(2))
    job = store.get(job_id)
    assert job is not None and job.status is S and job.finished_at == at(1)


def test_the_events_log_has_each_change_users_see_and_not_staging_or_a_claim_only_to_end_a_job(store: Store) -> None:
    first, second, rejected = every_change_of_status(store)
    canceled, _ = store.enqueue(request("canceled"), now=at(70))
    store.request_cancel(canceled.id)
    ending = store.claim_next("w1", lease_seconds=LEASE, now=at(71))  # claimed only to be ended: not logged
    assert ending is not None and ending.id == canceled.id
    store.finish(canceled.id, "w1", C, now=at(72))
    log = store.state_log(0)
    assert log[-1] == job_summary(store.get(canceled.id))  # type: ignore[arg-type]  # the entry as describe made it
    logged = [(e["id"], e["status"]) for e in log]
    assert logged == [
        (first, "queued"), (first, "running"), (first, "failed"),
        (first, "queued"),  # the retry's files are back (its staging is not logged)
        (first, "running"), (first, "queued"),  # requeued
        (first, "running"), (first, "queued"),  # its lease ran out
        (second, "queued"), (second, "running"), (second, "queued"),  # its worker was dead
        (rejected, "failed"),
        (canceled.id, "queued"), (canceled.id, "canceled"),
    ]


def test_a_store_opened_without_a_describer_keeps_no_events_log(db_url: str, store: Store) -> None:
    """A command's store (cancel, retry) changes states the daemon's own log records as they move on."""
    plain = Store(db_url)
    try:
        job, _ = plain.enqueue(request("quiet"), now=T0)
        assert plain.claim_next("w1", lease_seconds=LEASE, now=at(1)) is not None
        assert plain.state_log(0) == []
        store.finish(job.id, "w1", S, now=at(2))
        assert [(e["id"], e["status"]) for e in plain.state_log(0)] == [(job.id, "succeeded")]
    finally:
        plain.close()
