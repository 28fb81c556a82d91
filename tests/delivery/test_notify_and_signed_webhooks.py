"""Notifications through Apprise (an ntfy target pointed at a local receiver on 127.0.0.1) and Standard Webhooks
signatures: owed in the outbox with the job, retried with backoff, shown by `show`; a signed webhook verifies
with `standardwebhooks`, a tampered or replayed one does not."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote_plus

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from i2v_daemon.delivery.kinds import deliverers
from i2v_daemon.delivery.notify import message, shown
from i2v_daemon.delivery.sender import Sender
from i2v_daemon.delivery.webhook import post, signature_headers
from i2v_daemon.params import Params
from i2v_daemon.queue.jobs import JobRequest, JobStatus
from i2v_daemon.queue.outbox import OutboxEntry
from i2v_daemon.queue.store import Store
from i2v_daemon.views.jobs import describe

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    """A local HTTP server that records each request and answers from `script` (200 once it runs out)."""

    script: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append(Request(self.command, self.path, dict(self.headers.items()), body))
                status = recorder.script.pop(0) if recorder.script else 200
                payload = b'{"id": "x"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_POST = do_PUT = do_GET = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def recorder() -> Iterator[Recorder]:
    made = Recorder()
    yield made
    made.close()


def _finished_job(store: Store, tmp_path: Path, notify: list[OutboxEntry]) -> int:
    """A job run to success, with `notify` owed in the transaction that finished it."""
    job, _ = store.enqueue(JobRequest(name="cat", inputs=("cat.png",), intake_key="k1", prompt="a cat",
                                      params=PARAMS))
    claimed = store.claim_next("w1", lease_seconds=60, job_id=job.id)
    assert claimed is not None and claimed.id == job.id
    store.finish(job.id, "w1", JobStatus.SUCCEEDED, output=str(tmp_path / "cat" / "cat.mp4"), notify=notify)
    return job.id


def _payload(tmp_path: Path, status: str = "succeeded", poster: Path | None = None) -> dict[str, Any]:
    return {"event": "job.finished", "job_id": 1, "name": "cat", "status": status,
            "output": str(tmp_path / "cat.mp4") if status == "succeeded" else None,
            "error": {"type": "invalid_input", "message": "cat.json: unknown key 'step'"} if status == "failed"
            else None, "durations": {"total_seconds": 75.2, "running_seconds": 61.0},
            "poster": str(poster) if poster else None}


def test_an_ntfy_target_on_the_loopback_receives_the_jobs_name_status_duration_and_poster(
    recorder: Recorder, tmp_path: Path,
) -> None:
    from i2v_daemon.delivery.notify import send

    poster = tmp_path / "poster.jpg"
    poster.write_bytes(b"\xff\xd8\xff\xe0 a tiny jpeg")
    result = send(f"ntfy://127.0.0.1:{recorder.port}/videos", _payload(tmp_path, poster=poster), timeout=10)
    assert result.delivered, result.error
    [req] = recorder.requests
    assert req.path.startswith("/videos")
    seen = json.dumps(req.headers) + unquote_plus(req.path) + req.body.decode("latin-1")
    assert "cat succeeded" in seen and "1 min 15 s" in seen
    assert b"a tiny jpeg" in req.body  # ntfy takes the poster as an attachment


def test_a_failed_jobs_message_carries_its_error() -> None:
    title, body = message(_payload(Path("/x"), status="failed"))
    assert title == "i2v-daemon: cat failed" and "unknown key 'step'" in body


def test_a_notification_is_retried_with_backoff_and_shown_by_show(recorder: Recorder, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    url = f"ntfy://127.0.0.1:{recorder.port}/videos"
    job_id = _finished_job(store, tmp_path, [OutboxEntry("notify", url, _payload(tmp_path))])
    recorder.script = [500]
    settings = SimpleNamespace(webhook_timeout_seconds=10, on_finish_timeout_seconds=10, webhook_secret=None)
    sender = Sender(store.outbox, "test", deliverers(settings), retries=3, backoff=30.0)
    t0 = datetime.now(UTC)
    assert sender.run_once("notify", now=t0)
    [row] = describe(store, store.get(job_id))["notifications"]  # type: ignore[arg-type]
    assert (row["kind"], row["state"], row["tries"]) == ("notify", "retrying", 1)
    assert row["target"] == f"ntfy://127.0.0.1:{recorder.port}/…" and row["last_error"]
    assert not sender.run_once("notify", now=t0 + timedelta(seconds=10))  # not due before its backoff
    assert sender.run_once("notify", now=t0 + timedelta(seconds=31))
    [row] = describe(store, store.get(job_id))["notifications"]  # type: ignore[arg-type]
    assert (row["state"], row["tries"]) == ("delivered", 2)
    assert len(recorder.requests) == 2
    store.close()


def test_targets_are_shown_without_their_tokens() -> None:
    assert shown("discord://1234/secret-token") == "discord://1234/…"
    assert "secret" not in shown("ntfys://user:secret@ntfy.example.org/topic")


def test_a_signed_webhook_verifies_and_a_tampered_or_replayed_one_does_not(recorder: Recorder) -> None:
    payload = {"event": "job.finished", "job_id": 3, "name": "cat", "status": "succeeded"}
    url = f"http://127.0.0.1:{recorder.port}/hook"
    assert post(url, payload, timeout=5, secret=SECRET, msg_id="msg_i2v_3_9").delivered
    [req] = recorder.requests
    headers = {k.lower(): v for k, v in req.headers.items()}
    assert headers["webhook-id"] == "msg_i2v_3_9"
    assert Webhook(SECRET).verify(req.body, headers) == payload
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(req.body.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(req.body, headers)  # another secret: a forgery
    old = signature_headers(SECRET, "msg_i2v_3_9", req.body, now=datetime.now(UTC) - timedelta(minutes=10))
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(req.body, old)


def test_without_a_secret_a_webhook_carries_no_signature(recorder: Recorder) -> None:
    assert post(f"http://127.0.0.1:{recorder.port}/hook", {"job_id": 1}, timeout=5).delivered
    assert "webhook-signature" not in {k.lower() for k in recorder.requests[0].headers}


def test_the_outbox_signs_each_try_afresh_with_the_same_message_id(recorder: Recorder, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    url = f"http://127.0.0.1:{recorder.port}/hook"
    _finished_job(store, tmp_path, [OutboxEntry("webhook", url, {"job_id": 1, "status": "succeeded"})])
    recorder.script = [503]
    settings = SimpleNamespace(webhook_timeout_seconds=10, on_finish_timeout_seconds=10, webhook_secret=SECRET)
    sender = Sender(store.outbox, "test", deliverers(settings), retries=3, backoff=0.0)
    assert sender.run_once("webhook") and sender.run_once("webhook")
    first, second = ({k.lower(): v for k, v in r.headers.items()} for r in recorder.requests)
    assert first["webhook-id"] == second["webhook-id"]  # a receiver drops the repeat by its id
    for req in recorder.requests:
        Webhook(SECRET).verify(req.body, req.headers)
    store.close()


@pytest.mark.slow
def test_the_daemon_tells_the_configured_and_the_presets_targets_of_a_finished_job(
    env: Any, recorder: Recorder, tmp_path: Path,
) -> None:
    from tests.conftest import age, make_image, write_config

    config_url = f"ntfy://127.0.0.1:{recorder.port}/everything"
    preset_url = f"ntfy://127.0.0.1:{recorder.port}/tiny-only"
    write_config(env.config, env.data, env.model_dir, notify=[config_url], webhook_secret=SECRET)
    with open(env.config, "a") as fh:
        fh.write(f"notify = {json.dumps([preset_url])}\n")  # under [presets.tiny], the config's last table
    image = make_image(env.inbox / ".cat.png").rename(env.inbox / "cat.png")
    side = env.inbox / "cat.json"
    side.write_text(json.dumps({"prompt": "a cat", "seed": 1}))
    age(image, side)
    env.cli("run", "--once", check=True)
    paths = sorted(unquote_plus(r.path).split("?")[0] for r in recorder.requests)
    assert paths == ["/everything", "/tiny-only"]
    assert all(b"\xff\xd8" in r.body[:4] for r in recorder.requests)  # the poster went along
    [job] = env.status()["jobs"]
    shown_job = json.loads(env.cli("show", str(job["id"]), "--json", check=True).stdout)
    assert sorted((n["kind"], n["state"]) for n in shown_job["notifications"]) == [("notify", "delivered")] * 2
    text = env.cli("show", str(job["id"]), check=True).stdout
    assert f"notify ntfy://127.0.0.1:{recorder.port}/…: delivered" in text
