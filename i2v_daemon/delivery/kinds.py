"""How each kind of outbox entry is delivered: a webhook is one POST, a notification one Apprise message, the
on_finish hook one run."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

from i2v_daemon.delivery.sender import Attempt, Deliver
from i2v_daemon.queue.outbox import OutboxItem

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings


def deliverers(settings: Settings, stop: threading.Event | None = None) -> dict[str, Deliver]:
    """{"webhook": …, "hook": …} for the sender, with this daemon's timeouts; `stop` ends a running hook."""

    def webhook(item: OutboxItem) -> Attempt:
        from i2v_daemon.delivery.webhook import post

        # The outbox row's id is the message's: the same on every retry of it, another for every other one.
        return post(item.target, item.payload, timeout=settings.webhook_timeout_seconds,
                    secret=getattr(settings, "webhook_secret", None), msg_id=f"msg_i2v_{item.job_id}_{item.id}")

    def notify(item: OutboxItem) -> Attempt:
        from i2v_daemon.delivery.notify import send

        return send(item.target, item.payload, timeout=settings.webhook_timeout_seconds)

    def hook(item: OutboxItem) -> Attempt:
        from i2v_daemon.delivery.hook import run_hook

        argv = json.loads(item.target)
        result = run_hook(argv, item.payload.get("env", {}), timeout=settings.on_finish_timeout_seconds, stop=stop)
        # A failing hook changes nothing about the job and is not run again: it is the user's program.
        if result.exit_code == 0 and not result.timed_out:
            return Attempt(True)
        why = result.error or ("timed out" if result.timed_out else f"exit status {result.exit_code}")
        return Attempt(False, why, retry=False)

    return {"webhook": webhook, "notify": notify, "hook": hook}
