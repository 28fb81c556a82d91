"""Delivering the outbox: background threads that POST webhooks and run the on_finish hook.

Every outcome that is not a delivery is logged with the job it was about (`webhook_retrying`,
`webhook_failed`, `hook_failed`, …); what is still owed at shutdown stays in the database and is
delivered by the next daemon to start. Delivery is at least once: a daemon killed in the middle
of a POST sends it again once its claim on the row runs out.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from i2v_daemon.logs import get_logger
from i2v_daemon.queue.clock import utcnow
from i2v_daemon.queue.outbox import Outbox, OutboxItem

log = get_logger()


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt came to."""

    delivered: bool
    error: str = ""
    retry: bool = False  # worth another try
    retry_after: float | None = None  # seconds the receiver asked us to wait


Deliver = Callable[[OutboxItem], Attempt]


class Sender:
    """Background threads that deliver the outbox: one for webhooks, one for hooks.

    `deliver` maps a kind to the function that tries one item; `retries` and `backoff` bound the
    webhook tries (a hook runs once: it is the user's program, not a network call).
    """

    def __init__(
        self, outbox_: Outbox, owner: str, deliver: dict[str, Deliver], *, retries: int = 3,
        backoff: float = 1.0, max_backoff: float = 300.0, idle_seconds: float = 1.0,
        stopping: threading.Event | None = None,
    ) -> None:
        self.outbox = outbox_
        self.owner = owner
        self.deliver = deliver
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.idle_seconds = idle_seconds
        self.wake = threading.Event()
        self.stopping = stopping or threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(kind,), name=f"outbox-{kind}", daemon=True) for kind in deliver
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the items in hand; what is left stays owed in the database (and is said so)."""
        self.stopping.set()
        self.wake.set()
        for t in self._threads:
            if t.is_alive():  # `run --once` delivers in its own thread and never starts these
                t.join(timeout)
        try:
            left = self.outbox.pending()
        except Exception:  # the database may be what stopped us
            return
        if left:
            log.info("outbox_pending_at_stop", notifications=left, note="the next daemon to start delivers them")

    def drain(self, timeout: float | None = None) -> None:
        """Deliver, in this thread, what is due now (`run --once` before it exits); `timeout` bounds the whole."""
        deadline = time.monotonic() + timeout if timeout is not None else float("inf")
        for kind in self.deliver:
            while time.monotonic() < deadline and self.run_once(kind):
                pass

    def run_once(self, kind: str, now: datetime | None = None) -> bool:
        """Deliver one due item of `kind`; True if there was one (more may be waiting)."""
        items = self.outbox.claim(self.owner, kinds=[kind], now=now)
        if not items:
            return False
        item = items[0]
        try:
            result = self.deliver[kind](item)
        except Exception as err:  # a delivery function must not kill the sender
            result = Attempt(False, f"{type(err).__name__}: {err}", retry=True)
        self._record(item, result, now or utcnow())
        return True

    def _record(self, item: OutboxItem, result: Attempt, now: datetime) -> None:
        fields = {"kind": item.kind, "target": _shown(item), "job_id": item.job_id, "tries": item.attempts + 1}
        if result.delivered:
            self.outbox.done(item.id, self.owner, delivered=True, now=now)
            log.info(f"{item.kind}_delivered", **fields)
            return
        if result.retry and item.attempts < self.retries:
            wait = min(self.max_backoff, self.backoff * 2 ** item.attempts)
            if result.retry_after is not None:
                wait = min(3600.0, max(wait, result.retry_after))  # the receiver said when; within an hour
            self.outbox.later(item.id, self.owner, at=now + timedelta(seconds=wait), error=result.error)
            log.warning(f"{item.kind}_retrying", **fields, error=result.error, in_seconds=round(wait, 1))
            return
        self.outbox.done(item.id, self.owner, delivered=False, error=result.error, now=now)
        log.error(f"{item.kind}_failed", **fields, error=result.error)

    def _loop(self, kind: str) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.run_once(kind)
            except Exception:  # the database is failing; the rows stay owed, try again shortly
                log.exception("outbox_error", kind=kind)
                busy = False
                self.stopping.wait(5.0)
            if not busy:
                self.wake.wait(self.idle_seconds)
                self.wake.clear()


def _shown(item: OutboxItem) -> str:
    if item.kind == "hook":
        try:
            return " ".join(json.loads(item.target))[:200]
        except ValueError:
            return item.target[:200]
    return item.target
