"""Webhooks from the durable outbox, against real local HTTP servers, on SQLite and PostgreSQL:
owed in the transaction that finishes the job, retried with backoff, `Retry-After` honoured,
redirects never followed, nothing lost across a crash or a restart (through the real daemon)."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from i2v_daemon.delivery.sender import Sender
from i2v_daemon.delivery.webhook import job_payload, post, retry_after
from i2v_daemon.errors import LeaseLost
from i2v_daemon.params import Params
from i2v_daemon.queue.jobs import Job, JobRequest, JobStatus
from i2v_daemon.queue.outbox import CLAIM_SECONDS, OutboxEntry
from i2v_daemon.queue.store import Store
from tests.conftest import write_config

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)


def logged(text: str, event: str, **fields: object) -> bool:
    """Whether a log line (JSON or console style) has `event` and each field's value."""
    for line in text.splitlines():
        if event in line and all(re.search(rf'{k}["=: ]+{v}\b', line) for k, v in fields.items()):
            return True
    return False


class Receiver:
    """A local HTTP server whose answers follow `script`: a status, or (status, headers) per request."""

    def __init__(self, script: list[object], port: int = 0) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.script = list(script)
        self.bodies: list[dict] = []
        self.methods: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                receiver.methods.append(self.command)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if body:
                    receiver.bodies.append(json.loads(body))
                action = receiver.script.pop(0) if receiver.script else 200
                status, headers = action if isinstance(action, tuple) else (action, {})
                self.send_response(int(status))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
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
        negative_prompt="", params_data=None, attempts=1, max_attempts=3, created_at=T0,
        started_at=T0 + timedelta(seconds=5), finished_at=T0 + timedelta(seconds=65),
        final_dir="/data/output/cat", output="/data/output/cat/cat.mp4",
        effective={"width": 96, "height": 64, "num_frames": 4}, host="h1", device="cuda:0",
        error={"type": "generation", "message": "boom"} if status is JobStatus.FAILED else None,
    )


def finished_job(store: Store, urls: list[str], name: str = "cat") -> int:
    """A job finished by worker w1 with one webhook owed per URL; returns its id."""
    queued, _ = store.enqueue(JobRequest(name=name, inputs=(f"{name}.png",), intake_key=name, params=PARAMS), now=T0)
    store.claim_next("w1", lease_seconds=60, now=T0, job_id=queued.id)
    owed = [OutboxEntry("webhook", url, job_payload(job(queued.id))) for url in urls]
    store.finish(queued.id, "w1", JobStatus.SUCCEEDED, notify=owed)  # owed from now on
    return queued.id


def sender(store: Store, *, retries: int = 3, owner: str = "s1") -> Sender:
    return Sender(store.outbox, owner, {"webhook": lambda item: post(item.target, item.payload, timeout=2)},
                  retries=retries, backoff=1.0)


def test_the_payload_summarises_the_job_with_its_durations() -> None:
    p = job_payload(job())
    assert p["event"] == "job.finished" and p["job_id"] == 7 and p["name"] == "cat" and p["status"] == "succeeded"
    assert p["output"] == "/data/output/cat/cat.mp4" and p["error"] is None
    assert p["durations"] == {"queued_seconds": 5.0, "running_seconds": 60.0, "total_seconds": 65.0}
    assert p["finished_at"] == "2030-01-01T12:01:05Z"
    failed = job_payload(job(status=JobStatus.FAILED))
    assert failed["error"] == {"type": "generation", "message": "boom"}


def test_the_notifications_are_owed_in_the_same_transaction_that_finishes_the_job(store: Store) -> None:
    job_id = finished_job(store, ["http://a.example/x", "http://b.example/y"])
    rows = store.outbox.for_job(job_id)
    assert [(r["kind"], r["target"], r["delivered"], r["done_at"]) for r in rows] == [
        ("webhook", "http://a.example/x", False, None), ("webhook", "http://b.example/y", False, None)]
    assert store.outbox.pending() == 2
    # A finish that loses the race writes no notification either.
    queued, _ = store.enqueue(JobRequest(name="dog", inputs=("dog.png",), intake_key="dog", params=PARAMS), now=T0)
    store.claim_next("w1", lease_seconds=60, now=T0, job_id=queued.id)
    with pytest.raises(LeaseLost):
        store.finish(queued.id, "someone-else", JobStatus.SUCCEEDED, notify=[OutboxEntry("webhook", "u", {})])
    assert store.outbox.for_job(queued.id) == []


def test_a_working_receiver_gets_the_summary_once(store: Store, receivers: list[Receiver], capsys) -> None:
    ok = Receiver([200])
    receivers.append(ok)
    job_id = finished_job(store, [ok.url])
    s = sender(store)
    assert s.run_once("webhook") is True
    assert s.run_once("webhook") is False  # nothing else is due
    assert [b["job_id"] for b in ok.bodies] == [job_id] and ok.methods == ["POST"]
    [row] = store.outbox.for_job(job_id)
    assert row["delivered"] is True and row["done_at"] is not None and store.outbox.pending() == 0
    assert logged("".join(capsys.readouterr()), "webhook_delivered", job_id=job_id)


def test_a_500_is_retried_after_a_doubling_backoff_until_the_200(store: Store, receivers: list[Receiver]) -> None:
    flaky = Receiver([500, 500, 200])
    receivers.append(flaky)
    job_id = finished_job(store, [flaky.url])
    s = sender(store)
    now = datetime.now(UTC)
    assert s.run_once("webhook", now=now)  # 500: due again in 1 s
    assert not s.run_once("webhook", now=now + timedelta(seconds=0.5))
    assert s.run_once("webhook", now=now + timedelta(seconds=1.1))  # 500: due again in 2 s more
    assert not s.run_once("webhook", now=now + timedelta(seconds=2.5))
    assert s.run_once("webhook", now=now + timedelta(seconds=3.2))  # 200
    assert len(flaky.bodies) == 3
    [row] = store.outbox.for_job(job_id)
    assert row["delivered"] is True and row["attempts"] == 3


def test_retry_after_is_honoured_over_the_backoff(store: Store, receivers: list[Receiver]) -> None:
    busy = Receiver([(503, {"Retry-After": "120"}), 200])
    receivers.append(busy)
    job_id = finished_job(store, [busy.url])
    s = sender(store)
    now = datetime.now(UTC)
    assert s.run_once("webhook", now=now)
    assert not s.run_once("webhook", now=now + timedelta(seconds=60))  # the 1 s backoff is not enough
    assert s.run_once("webhook", now=now + timedelta(seconds=121))
    assert store.outbox.for_job(job_id)[0]["delivered"] is True
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=datetime(2015, 10, 21, 7, 27, tzinfo=UTC).timestamp()) == 60


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_not_counted_as_delivered(
    store: Store, receivers: list[Receiver], capsys, status: int,
) -> None:
    target = Receiver([200])
    moved = Receiver([(status, {"Location": target.url})])
    receivers.extend([target, moved])
    job_id = finished_job(store, [moved.url])
    assert sender(store).run_once("webhook")
    assert target.methods == []  # neither a GET without a body nor a second POST went there
    [row] = store.outbox.for_job(job_id)
    assert row["delivered"] is False and row["done_at"] is not None  # given up: a retry would be redirected too
    assert "not redirected" in row["last_error"] and target.url in row["last_error"]
    assert logged("".join(capsys.readouterr()), "webhook_failed", job_id=job_id)


def test_a_4xx_is_not_retried(store: Store, receivers: list[Receiver]) -> None:
    refuses = Receiver([404, 404])
    receivers.append(refuses)
    job_id = finished_job(store, [refuses.url])
    assert sender(store).run_once("webhook")
    assert len(refuses.bodies) == 1
    [row] = store.outbox.for_job(job_id)
    assert row["delivered"] is False and "HTTP 404" in row["last_error"]


def test_a_sender_that_died_mid_delivery_leaves_it_to_another_after_its_claim_runs_out(
    store: Store, receivers: list[Receiver],
) -> None:
    ok = Receiver([200])
    receivers.append(ok)
    job_id = finished_job(store, [ok.url])
    now = datetime.now(UTC)
    assert len(store.outbox.claim("dead-sender", kinds=["webhook"], now=now)) == 1  # ... and then it was killed
    other = sender(store, owner="s2")
    assert not other.run_once("webhook", now=now + timedelta(seconds=1))  # still claimed
    assert other.run_once("webhook", now=now + timedelta(seconds=CLAIM_SECONDS + 1))
    assert [b["job_id"] for b in ok.bodies] == [job_id]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_webhook_owed_by_a_daemon_that_crashed_is_delivered_once_by_the_next_run(env, drop, receivers) -> None:
    ok = Receiver([200, 200])
    receivers.append(ok)
    write_config(env.config, env.data, env.model_dir, webhooks=[ok.url])
    drop("cat", (".txt", "a cat"))
    crashed = env.cli("run", "--once", env={"I2V_TEST_CRASH_AT": "job_finished"})
    assert crashed.returncode == 99  # killed right after the job's status (and its webhook) were committed
    assert (env.output / "cat" / "cat.mp4").exists() and ok.bodies == []
    env.cli("run", "--once", check=True)  # nothing new in the inbox: it only delivers what is owed
    assert [(b["job_id"], b["status"]) for b in ok.bodies] == [(1, "succeeded")]
    env.cli("run", "--once", check=True)
    assert len(ok.bodies) == 1  # delivered once, not again


@pytest.mark.slow
def test_a_webhook_the_receiver_could_not_take_stays_owed_and_goes_out_when_it_is_back(env, drop, receivers) -> None:
    port = _free_port()  # nothing listens there yet: the receiver is down
    url = f"http://127.0.0.1:{port}/hook"
    write_config(env.config, env.data, env.model_dir, webhooks=[url], webhook_timeout_seconds=1)
    drop("cat", (".txt", "a cat"))
    first = env.cli("run", "--once", check=True)
    assert (env.output / "cat" / "cat.mp4").exists()
    assert logged(first.stderr, "webhook_retrying", job_id=1)
    store = Store(env.db_url)
    try:
        [owed] = store.outbox.for_job(1)
        assert owed["done_at"] is None and "Connection refused" in owed["last_error"]
    finally:
        store.close()
    up = Receiver([200], port=port)
    receivers.append(up)
    env.cli("run", "--once", check=True)
    assert [b["job_id"] for b in up.bodies] == [1]
