"""Notifications where people are (`notify`): one Apprise URL (ntfy, Discord, mail, …) told of a finished job.

Owed in the outbox like webhooks (written with the job's status, delivered at least once by the
sender, retried with a doubling backoff, shown by `show`). The message says the job's name, status,
error and how long it took; the poster goes along where the service takes attachments (Apprise
drops it for those that do not). apprise is imported only here, and only when a message is sent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from i2v_daemon.delivery.sender import Attempt

#: Status -> Apprise's notify type (the colour or icon the service shows).
_TYPES = {"succeeded": "success", "failed": "failure", "canceled": "warning"}


def message(payload: dict[str, Any]) -> tuple[str, str]:
    """(title, body) for a finished job's webhook payload (`webhook.job_payload`)."""
    status = str(payload.get("status"))
    title = f"i2v-daemon: {payload.get('name')} {status}"
    lines = [f"Job {payload.get('job_id')} ({payload.get('name')}) {status}."]
    error = payload.get("error") or {}
    if error and status != "succeeded":
        lines.append(f"Error: {error.get('message') or error}")
    seconds = (payload.get("durations") or {}).get("total_seconds")
    if seconds is not None:
        lines.append(f"Took {_duration(seconds)} ({_duration((payload.get('durations') or {}).get('running_seconds'))} "
                     "running).")
    if payload.get("output"):
        lines.append(f"Video: {payload['output']}")
    elif payload.get("job_dir") or payload.get("folder"):  # `folder`: an entry owed since before the rename
        lines.append(f"Folder: {payload.get('job_dir') or payload['folder']}")
    return title, "\n".join(lines)


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, round(float(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def send(url: str, payload: dict[str, Any], *, timeout: float) -> Attempt:
    """One notification to one Apprise URL; delivered when Apprise says so, else worth another try."""
    import apprise

    target = apprise.Apprise()
    if not target.add(url):  # settings checked the syntax; a URL may still name a plugin this install lacks
        return Attempt(False, f"Apprise cannot use {shown(url)}; check its form (i2v-daemon doctor)", retry=False)
    title, body = message(payload)
    attach = payload.get("poster")
    files = [attach] if attach and Path(attach).is_file() else None
    result = target.notify(body=body, title=title, notify_type=_TYPES.get(str(payload.get("status")), "info"),
                           attach=files, timeout=timeout, log_level=logging.WARNING)
    if result:
        return Attempt(True)
    why = "; ".join(str(getattr(e, "message", e)) for e in result.logs())[:500] or "Apprise reported a failure"
    return Attempt(False, why, retry=True)


def shown(url: str) -> str:
    """A target as `show` and the logs print it: scheme and host, never the tokens in its path or user part."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that does not parse)"
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}/…" if parts.path not in ("", "/") or parts.query else f"{parts.scheme}://{host}"
