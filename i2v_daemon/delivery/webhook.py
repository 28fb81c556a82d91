"""Webhooks, off by default: what a receiver gets for each finished job, and one POST of it.

The POSTs are owed in the outbox (`outbox.py`) and sent by `notifications.Sender`: this module
only knows HTTP. A redirect is never followed (urllib would turn the POST into a bodyless GET and
call it delivered); `Retry-After` on 429/503 is passed on so the sender waits as asked.
"""

from __future__ import annotations

import email.utils
import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from i2v_daemon import __version__
from i2v_daemon.delivery.sender import Attempt
from i2v_daemon.queue.jobs import Job
from i2v_daemon.views.jobs import iso

#: HTTP statuses worth another try; any other 4xx means the receiver refuses this payload.
RETRY_STATUSES = frozenset({408, 425, 429})


def _seconds(a: Any, b: Any) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


def job_payload(job: Job) -> dict[str, Any]:
    """What a receiver gets: who, what became of it, where its files are, how long it took."""
    return {
        "event": "job.finished",
        "job_id": job.id,
        "name": job.name,
        "status": job.status.value,
        "output": job.output,
        "job_dir": job.final_dir,  # as I2V_JOB_DIR; `folder` (the manifest's) is where the job came from
        "error": job.error if job.error and job.status.value != "succeeded" else None,
        "attempts": job.attempts,
        "inputs": list(job.inputs),
        "width": job.width,
        "height": job.height,
        "num_frames": job.num_frames,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "durations": {
            "queued_seconds": _seconds(job.created_at, job.started_at),
            "running_seconds": _seconds(job.started_at, job.finished_at),
            "total_seconds": _seconds(job.created_at, job.finished_at),
        },
        "host": job.host,
        "device": job.device,
        "source": job.source,
        "sender": f"i2v-daemon/{__version__}",
    }


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError, which post() reports


_OPENER = urllib.request.build_opener(_NoRedirects)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header (a number of seconds or an HTTP date), None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def signature_headers(secret: str, msg_id: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
    """Standard Webhooks headers for `body`: its id (the same on every retry, so a receiver can drop a
    repeat), the time of this try (a receiver rejects one older than five minutes: no replays) and the
    HMAC-SHA256 signature of both with the shared secret (`standardwebhooks` verifies them)."""
    from standardwebhooks import Webhook

    when = now or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body),
    }


def post(url: str, payload: dict[str, Any], *, timeout: float, secret: str | None = None,
         msg_id: str | None = None) -> Attempt:
    """One POST of `payload` as JSON; delivered on a 2xx answer only. With `secret`: signed (Standard Webhooks)."""
    body = json.dumps(payload, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "User-Agent": f"i2v-daemon/{__version__}"}
    if secret:
        headers.update(signature_headers(secret, msg_id or f"msg_{payload.get('job_id')}", body))
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:  # http(s) only: settings checks the URLs
            resp.read(65536)
            return Attempt(True)
    except urllib.error.HTTPError as err:
        if 300 <= err.code < 400:
            where = err.headers.get("Location") or "elsewhere"
            return Attempt(False, f"HTTP {err.code}: the receiver moved to {where}; a POST is not redirected — "
                                  "put the new URL in `webhooks`")
        wait = retry_after(err.headers.get("Retry-After")) if err.headers else None
        retry = err.code >= 500 or err.code in RETRY_STATUSES
        return Attempt(False, f"HTTP {err.code} {err.reason}", retry=retry, retry_after=wait)
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        return Attempt(False, f"{type(reason).__name__}: {reason}", retry=True)
