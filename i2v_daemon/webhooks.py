"""Webhooks, off by default: a JSON summary POSTed to each configured URL when a job finishes.

Each URL has its own thread and bounded queue, so a slow or dead receiver never delays the
worker nor the other receivers. A delivery is retried with a doubling backoff; every outcome
that is not a delivery (given up, refused, dropped because the queue was full, left undelivered
at shutdown) is logged with the job it was about: nothing is lost silently.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from i2v_daemon import __version__
from i2v_daemon.jobs import Job
from i2v_daemon.logs import get_logger
from i2v_daemon.views import iso

log = get_logger()

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
        "folder": job.final_dir,
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
        "sender": f"i2v-daemon/{__version__}",
    }


class _Target:
    """One receiver: its queue and the thread that delivers to it."""

    def __init__(self, url: str, owner: WebhookSender) -> None:
        self.url = url
        self.owner = owner
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=owner.queue_size)
        self.thread = threading.Thread(target=self._run, name=f"webhook {url}", daemon=True)
        self.busy = threading.Event()

    def _run(self) -> None:
        while True:
            try:
                payload = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.owner.closing.is_set():
                    return
                continue
            self.busy.set()
            try:
                if self.owner.abort.is_set():
                    log.error("webhook_undelivered", url=self.url, job_id=payload.get("job_id"),
                              reason="the daemon stopped before it could be sent")
                else:
                    self.owner.deliver(self.url, payload)
            finally:
                self.busy.clear()
                self.queue.task_done()


class WebhookSender:
    """Delivers payloads to every URL in the background; `submit` never blocks."""

    def __init__(
        self, urls: list[str], *, timeout: float = 10.0, retries: int = 3, backoff: float = 1.0,
        max_backoff: float = 60.0, queue_size: int = 256,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.queue_size = queue_size
        self.closing = threading.Event()  # no more submissions; threads exit once their queue is empty
        self.abort = threading.Event()  # the shutdown deadline passed: stop retrying, log what is left
        self.targets = [_Target(url, self) for url in urls]
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._count_lock = threading.Lock()

    def start(self) -> None:
        for t in self.targets:
            t.thread.start()

    def submit(self, payload: dict[str, Any]) -> None:
        """Queue `payload` for every URL; a full queue drops it for that URL, and says so."""
        for t in self.targets:
            try:
                t.queue.put_nowait(payload)
            except queue.Full:
                self._count("dropped")
                log.error(
                    "webhook_dropped", url=t.url, job_id=payload.get("job_id"), status=payload.get("status"),
                    reason=f"{self.queue_size} notifications already wait for this receiver",
                )

    def deliver(self, url: str, payload: dict[str, Any]) -> bool:
        """POST `payload` to `url`, retrying with backoff; True once a 2xx answer came back."""
        body = json.dumps(payload, ensure_ascii=False).encode()
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                if self.abort.wait(delay):
                    error += "; the daemon stopped before the next try"
                    break
            retry, error = self._post(url, body)
            if not error:
                self._count("delivered")
                log.info("webhook_delivered", url=url, job_id=payload.get("job_id"), tries=attempt + 1)
                return True
            if not retry:
                break
            if attempt < self.retries:
                log.warning("webhook_retrying", url=url, job_id=payload.get("job_id"), attempt=attempt + 1, error=error)
        self._count("failed")
        log.error("webhook_failed", url=url, job_id=payload.get("job_id"), status=payload.get("status"), error=error)
        return False

    def _post(self, url: str, body: bytes) -> tuple[bool, str]:
        """One POST: ("", _) on success, else (worth retrying?, what went wrong)."""
        req = urllib.request.Request(
            url, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"i2v-daemon/{__version__}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # http(s) only: settings checks
                resp.read(65536)
            return False, ""
        except urllib.error.HTTPError as err:
            retry = err.code >= 500 or err.code in RETRY_STATUSES
            return retry, f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            return True, f"{type(reason).__name__}: {reason}"

    def close(self, timeout: float = 10.0) -> None:
        """Let queued notifications go out for up to `timeout` seconds, then log the rest as undelivered."""
        self.closing.set()
        deadline = time.monotonic() + timeout
        for t in self.targets:
            t.thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.thread.is_alive() for t in self.targets):
            self.abort.set()  # the threads log every payload still queued as undelivered, then exit
            for t in self.targets:
                t.thread.join(self.timeout + 1.0)
        for t in self.targets:  # a receiver still hanging: whatever it had queued is named here
            if t.busy.is_set():
                log.error("webhook_undelivered", url=t.url, reason="still being sent when the daemon stopped")
            while True:
                try:
                    payload = t.queue.get_nowait()
                except queue.Empty:
                    break
                log.error("webhook_undelivered", url=t.url, job_id=payload.get("job_id"),
                          reason="the daemon stopped before it could be sent")

    def _count(self, what: str) -> None:
        with self._count_lock:
            setattr(self, what, getattr(self, what) + 1)
