"""Server-sent events fed from the database, so progress written by any worker on any host reaches every client.

One `EventHub` per process polls the database every half second and fans each new change out
to every connected client; clients never query on their own except to catch up after a
reconnect (`Last-Event-ID`). Two sources make the feed: the jobs table (`Store.changes`: each
job's current state, which carries its progress) and the log of state changes (`Store.state_log`:
the `status --json` entry at each change of status, written in the transaction that made it), so
a state shorter than a poll is still sent. A reconnecting client first gets the current state of
every job that changed since its last event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi.sse import ServerSentEvent

from i2v_daemon.logs import get_logger
from i2v_daemon.queue.clock import now_us
from i2v_daemon.queue.jobs import MAX_JOB_ID, Job, JobStatus
from i2v_daemon.queue.store import Store
from i2v_daemon.views.jobs import iso, job_summary

POLL_SECONDS = 0.5
#: Rows stamped this long before the newest poll are read again: a write's commit may land after a
#: later-stamped one (its transaction waited for a lock), and hosts' clocks differ a little.
OVERLAP_US = 10_000_000
#: At most two progress events a second per job; a status change always goes out at once.
PROGRESS_GAP_SECONDS = 0.5
SUMMARY_SECONDS = 2.0
PAGE = 500
MAX_CATCH_UP = 10_000
RUNNING = JobStatus.RUNNING.value
TERMINAL = frozenset(s.value for s in JobStatus if s.is_terminal)
QUEUE_SIZE = 2_000


@dataclass(frozen=True)
class State:
    """A job's `status --json` entry at one moment: read from its row now, or from the log of changes."""

    id: int
    updated_us: int
    status: str  # as shown: the contract's five
    entry: dict[str, Any]

    @classmethod
    def of(cls, job: Job) -> State:
        entry = job_summary(job)
        return cls(job.id, job.updated_us, entry["status"], entry)

    @classmethod
    def logged(cls, entry: dict[str, Any]) -> State:
        return cls(int(entry["id"]), int(entry["updated_us"]), str(entry["status"]), entry)


def event_id(state: State) -> str:
    return f"{state.updated_us}-{state.id}"


def parse_event_id(raw: str | None) -> tuple[int, int] | None:
    """`"<updated_us>-<id>"` → (updated_us, id); None for anything else (then the stream starts live)."""
    if not raw:
        return None
    us, _, job_id = raw.strip().partition("-")
    if not (us.isdigit() and job_id.isdigit()) or len(us) > 18 or not 1 <= int(job_id) <= MAX_JOB_ID:
        return None  # not one of ours: 18 digits of microseconds reach the year 33658
    return int(us), int(job_id)


def job_event(state: State) -> ServerSentEvent:
    return ServerSentEvent(event="job", id=event_id(state), raw_data=json.dumps(state.entry, ensure_ascii=False))


def read_states(store: Store, since_us: int, *, limit: int) -> list[State]:
    """Every state since `since_us`, each job's in the order they happened, its current row last.

    The log is read first and the rows after it, so a job's row is never older than a logged state
    read with it. A job's logged states are in `seq` order, which is their commit order (the row's
    lock serialises its writers); `updated_us` is not, as each host stamps it with its own clock.
    """
    logged = [State.logged(e) for e in store.state_log(since_us, limit=limit)]
    rows = [State.of(j) for j in read_changes(store, since_us, limit=limit)]
    out: list[State] = []
    keys: set[tuple[int, int]] = set()
    for state in (*logged, *rows):
        key = (state.id, state.updated_us)
        if key not in keys:
            keys.add(key)
            out.append(state)
    return out


def summary(store: Store) -> dict[str, Any]:
    """Counts and the pause switch: what the page's header shows (the `summary` event's data)."""
    pause = store.pause_state()
    return {
        "counts": store.counts(),
        "paused": pause["paused"],
        "paused_since": iso(pause["since"]),
        "paused_by": pause["by"],
    }


def read_changes(store: Store, since_us: int, *, limit: int) -> list[Job]:
    """Every job changed at or after `since_us`, in `(updated_us, id)` order, paging past `PAGE` rows.

    A page starts at the last one's `updated_us` (inclusive: the rows of that instant are read again
    and skipped). When one instant alone fills a page (one transaction stamped them all), the page
    is widened until it holds that instant whole, or no row would ever get past it.
    """
    out: list[Job] = []
    keys: set[tuple[int, int]] = set()
    size = PAGE
    while len(out) < limit:
        page = store.changes(since_us, limit=size)
        fresh = [j for j in page if (j.id, j.updated_us) not in keys]
        keys.update((j.id, j.updated_us) for j in fresh)
        out.extend(fresh)
        if len(page) < size:
            break
        if page[-1].updated_us == since_us:
            size *= 2
        else:
            since_us, size = page[-1].updated_us, PAGE
    return out[:limit]


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue[ServerSentEvent] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    overflowed: bool = False


class EventHub:
    """One poller for all clients; a slow client that falls `QUEUE_SIZE` events behind is dropped and reconnects."""

    def __init__(
        self, store: Store, *, stopping: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.stopping = stopping
        self.clock = clock  # monotonic seconds, for the progress gap and the summary's refresh
        self.subscribers: set[Subscriber] = set()
        self._seen: dict[tuple[int, int], None] = {}  # (id, updated_us) already sent, within the overlap
        self._last_sent: dict[int, tuple[float, str]] = {}  # job id → (monotonic time, status) of its last event
        self._held: dict[int, State] = {}  # progress that came too soon after the previous event
        self._summary: dict[str, Any] | None = None
        self._summary_at = float("-inf")
        self._task: asyncio.Task[None] | None = None

    # ---- clients ----------------------------------------------------------------------------

    async def stream(self, last_event_id: str | None) -> AsyncIterator[ServerSentEvent]:
        """One client's events: a catch-up after `Last-Event-ID`, the current summary, then live changes."""
        sub = Subscriber()
        self.subscribers.add(sub)  # before the catch-up, so nothing that happens meanwhile is missed
        self._ensure_running()
        try:
            yield ServerSentEvent(retry=2000)
            caught_up: dict[int, int] = {}  # job id → updated_us of the state the catch-up sent
            resume = parse_event_id(last_event_id)
            if resume is not None:
                rows = await anyio.to_thread.run_sync(self._catch_up, resume)
                for job in rows:
                    caught_up[job.id] = job.updated_us
                    yield job_event(State.of(job))
            if self._summary is None:  # the first client: read it now; the poller sends only changes of it
                self._summary = await anyio.to_thread.run_sync(summary, self.store)
            yield ServerSentEvent(event="summary", raw_data=json.dumps(self._summary))
            while not self.stopping() and not sub.overflowed:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), timeout=POLL_SECONDS)
                except TimeoutError:
                    continue
                key = _key(item)
                if key is not None and key[1] <= caught_up.get(key[0], -1):
                    continue  # the catch-up sent this state, or a newer one, already
                yield item
        finally:
            self.subscribers.discard(sub)

    def _catch_up(self, resume: tuple[int, int]) -> list[Job]:
        us, job_id = resume
        rows = read_changes(self.store, max(0, us - OVERLAP_US), limit=MAX_CATCH_UP)
        return [j for j in rows if (j.updated_us, j.id) != (us, job_id)]

    # ---- the poller ---------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="i2v-events")

    async def _run(self) -> None:
        errors = 0
        while self.subscribers:
            try:
                await self.poll_once()
                errors = 0
            except Exception:
                # The database is away (restart, failover): say so once a stretch, keep the clients, try again.
                errors += 1
                if errors in (1, 10) or errors % 120 == 0:
                    get_logger().exception("events_poll_failed", consecutive=errors)
            await asyncio.sleep(POLL_SECONDS if not errors else min(5.0, POLL_SECONDS * errors))
        # Nobody listens: stop reading the database, and forget what a next first client must read afresh.
        self._seen.clear()
        self._held.clear()
        self._last_sent.clear()
        self._summary = None

    async def poll_once(self) -> None:
        """Read what changed, send what is new (holding back progress that comes too fast), refresh the summary."""
        window = now_us() - OVERLAP_US
        states = await anyio.to_thread.run_sync(lambda: read_states(self.store, window, limit=MAX_CATCH_UP))
        now = self.clock()
        sent_any = False
        for state in states:
            key = (state.id, state.updated_us)
            if key in self._seen:
                continue
            self._seen[key] = None
            if self._progress_only(state) and self._too_soon(state.id, now):
                self._held[state.id] = state  # the newest progress wins; it goes out once the gap has passed
                continue
            self._held.pop(state.id, None)
            self._send(state, now)
            sent_any = True
        for job_id, job in list(self._held.items()):
            if not self._too_soon(job_id, now):
                del self._held[job_id]
                self._send(job, now)
                sent_any = True
        for key in [k for k in self._seen if k[1] < window]:
            del self._seen[key]
        # The pause switch is not a job row, so the summary is also read every couple of seconds.
        if sent_any or now - self._summary_at >= SUMMARY_SECONDS:
            self._summary_at = now
            await self._refresh_summary()

    def _progress_only(self, state: State) -> bool:
        """A running job whose last event said running too: only its progress (step, phase) moved."""
        last = self._last_sent.get(state.id)
        return state.status == RUNNING and last is not None and last[1] == RUNNING

    def _too_soon(self, job_id: int, now: float) -> bool:
        last = self._last_sent.get(job_id)
        return last is not None and now - last[0] < PROGRESS_GAP_SECONDS

    def _send(self, state: State, now: float) -> None:
        if state.status in TERMINAL:
            self._last_sent.pop(state.id, None)
        else:
            self._last_sent[state.id] = (now, state.status)
        self._broadcast(job_event(state))

    async def _refresh_summary(self) -> None:
        current = await anyio.to_thread.run_sync(summary, self.store)
        if current != self._summary:
            self._summary = current
            self._broadcast(ServerSentEvent(event="summary", raw_data=json.dumps(current)))

    def _broadcast(self, item: ServerSentEvent) -> None:
        for sub in list(self.subscribers):
            try:
                sub.queue.put_nowait(item)
            except asyncio.QueueFull:
                sub.overflowed = True  # its stream ends; EventSource reconnects with Last-Event-ID and catches up

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _key(item: ServerSentEvent) -> tuple[int, int] | None:
    parsed = parse_event_id(item.id)
    return (parsed[1], parsed[0]) if parsed else None
