"""Webhooks against real local HTTP servers: one that works, one that fails once, one that hangs."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from i2v_daemon.jobs import Job, JobStatus
from i2v_daemon.webhooks import WebhookSender, job_payload

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def logged(text: str, event: str, **fields: object) -> bool:
    """Whether a log line (JSON or console style) has `event` and each field's value."""
    for line in text.splitlines():
        if event in line and all(re.search(rf'{k}["=: ]+{v}\b', line) for k, v in fields.items()):
            return True
    return False


class Receiver:
    """A local HTTP server whose answers follow `script` (a status per request, or "hang")."""

    def __init__(self, script: list[int | str]) -> None:
        self.script = list(script)
        self.bodies: list[dict] = []
        self.hits = 0
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.hits += 1
                action = receiver.script.pop(0) if receiver.script else 200
                if action == "hang":
                    receiver.release.wait(10)  # past the client's timeout
                    return
                receiver.bodies.append(json.loads(body))
                self.send_response(int(action))
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()


def job(job_id: int = 7, status: JobStatus = JobStatus.SUCCEEDED) -> Job:
    return Job(
        id=job_id, name="cat", status=status, priority=0, inputs=("cat.png", "cat.txt"), prompt="a cat",
        negative_prompt="", params=None, attempts=1, max_attempts=3, created_at=T0,
        started_at=T0 + timedelta(seconds=5), finished_at=T0 + timedelta(seconds=65),
        final_dir="/data/output/cat", output="/data/output/cat/cat.mp4",
        effective={"width": 96, "height": 64, "num_frames": 4}, host="h1", device="cuda:0",
        error={"type": "generation", "message": "boom"} if status is JobStatus.FAILED else None,
    )


def test_the_payload_summarises_the_job_with_its_durations():
    p = job_payload(job())
    assert p["event"] == "job.finished" and p["job_id"] == 7 and p["name"] == "cat" and p["status"] == "succeeded"
    assert p["output"] == "/data/output/cat/cat.mp4" and p["error"] is None
    assert p["durations"] == {"queued_seconds": 5.0, "running_seconds": 60.0, "total_seconds": 65.0}
    assert p["finished_at"] == "2030-01-01T12:01:05Z"
    failed = job_payload(job(status=JobStatus.FAILED))
    assert failed["error"] == {"type": "generation", "message": "boom"}


def test_a_working_receiver_gets_the_summary_once_and_the_worker_is_not_delayed(receivers):
    ok = Receiver([200])
    receivers.append(ok)
    sender = WebhookSender([ok.url], timeout=2, retries=2, backoff=0.1)
    sender.start()
    t0 = time.monotonic()
    sender.submit(job_payload(job()))
    assert time.monotonic() - t0 < 0.05  # submit only queues
    sender.close(timeout=5)
    assert [b["job_id"] for b in ok.bodies] == [7]
    assert (sender.delivered, sender.failed, sender.dropped) == (1, 0, 0)


def test_a_500_is_retried_with_backoff_until_the_200(receivers, capsys):
    flaky = Receiver([500, 200])
    receivers.append(flaky)
    sender = WebhookSender([flaky.url], timeout=2, retries=3, backoff=0.2)
    sender.start()
    t0 = time.monotonic()
    sender.submit(job_payload(job()))
    sender.close(timeout=5)
    assert flaky.hits == 2 and len(flaky.bodies) == 2
    assert time.monotonic() - t0 >= 0.2  # waited the backoff between the tries
    assert sender.delivered == 1 and sender.failed == 0


def test_a_hanging_receiver_times_out_is_retried_then_logged_and_does_not_hold_up_the_others(receivers, capsys):
    hang, ok = Receiver(["hang", "hang"]), Receiver([200])
    receivers.extend([hang, ok])
    sender = WebhookSender([hang.url, ok.url], timeout=0.5, retries=1, backoff=0.1)
    sender.start()
    t0 = time.monotonic()
    sender.submit(job_payload(job()))
    deadline = time.monotonic() + 5
    while not ok.bodies and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ok.bodies and time.monotonic() - t0 < 0.5  # the good receiver did not wait for the bad one
    sender.close(timeout=5)
    elapsed = time.monotonic() - t0
    assert hang.hits == 2 and 1.0 <= elapsed < 4  # two tries of 0.5 s each, bounded
    assert sender.failed == 1 and sender.delivered == 1
    err = capsys.readouterr()
    text = err.out + err.err
    assert "webhook_failed" in text and "timed out" in text.lower() and hang.url in text


def test_a_4xx_is_not_retried_and_a_full_queue_drops_with_a_log_line(receivers, capsys):
    refuses = Receiver([404, 404, 404])
    receivers.append(refuses)
    sender = WebhookSender([refuses.url], timeout=1, retries=3, backoff=0.05, queue_size=1)
    # Not started yet: the first payload fills the queue of one, the second is dropped, loudly.
    sender.submit(job_payload(job(1)))
    sender.submit(job_payload(job(2)))
    assert sender.dropped == 1
    sender.start()
    sender.close(timeout=5)
    assert refuses.hits == 1  # the receiver refuses it: no point asking again
    text = "".join(capsys.readouterr())
    assert "webhook_dropped" in text and logged(text, "webhook_dropped", job_id=2)
    assert "webhook_failed" in text and "HTTP 404" in text


def test_what_cannot_be_sent_before_the_shutdown_deadline_is_logged_as_undelivered(receivers, capsys):
    hang = Receiver(["hang"] * 5)
    receivers.append(hang)
    sender = WebhookSender([hang.url], timeout=0.8, retries=0)
    sender.start()
    sender.submit(job_payload(job(1)))
    sender.submit(job_payload(job(2)))
    time.sleep(0.1)
    sender.close(timeout=0.2)
    text = "".join(capsys.readouterr())
    assert logged(text, "webhook_undelivered", job_id=2)
