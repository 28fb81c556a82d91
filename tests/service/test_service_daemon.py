"""The real daemon as systemd runs it: sd_notify datagrams, journal priorities, pause/resume, metrics, webhooks."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from i2v_daemon.queue.store import Store
from tests.conftest import SUBPROCESS_ENV, Env, make_image, write_config
from tests.daemon.test_daemon_process import start_daemon, stop, wait_for

pytestmark = pytest.mark.slow


class NotifyListener:
    """systemd's side of $NOTIFY_SOCKET: records each datagram, and what stderr held when READY=1 came."""

    def __init__(self, path: Path, stderr_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path
        self.stderr_path = stderr_path
        self.messages: list[str] = []
        self.stderr_at_ready: str | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in msg.splitlines() and self.stderr_at_ready is None:
                self.stderr_at_ready = self.stderr_path.read_text()
            self.messages.append(msg)

    def assignments(self) -> list[str]:
        return [line for m in list(self.messages) for line in m.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    n = NotifyListener(tmp_path / "notify.sock", tmp_path / "stderr.log")
    yield n
    n.close()


def test_the_daemon_tells_systemd_ready_status_watchdog_and_stopping_and_logs_with_priorities(
    env: Env, tmp_path: Path, listener: NotifyListener,
):
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as err:
        st = os.fstat(err.fileno())
        full_env = {**os.environ, **SUBPROCESS_ENV}
        full_env.pop("I2V_CONFIG", None)
        full_env.update(
            NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="2000000",
            JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",  # stderr "is" the journal: lines get <N> prefixes
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "i2v_daemon.cli", "run", "--config", str(env.config)],
            stdout=subprocess.DEVNULL, stderr=err, env=full_env,
        )
    try:
        wait_for(lambda: "READY=1" in listener.assignments(), timeout=120, what="READY=1")
        # The ready line was written before READY=1 was sent: the model is loaded, the inbox watched.
        assert listener.stderr_at_ready is not None and '"event": "ready"' in listener.stderr_at_ready
        wait_for(lambda: "WATCHDOG=1" in listener.assignments(), timeout=10, what="WATCHDOG=1")

        # A job long enough (150 tiny steps, a few seconds) that the stop comes while it runs.
        make_image(env.inbox / ".slow.png").rename(env.inbox / "slow.png")
        (env.inbox / "slow.json").write_text(json.dumps({"prompt": "slowly", "steps": 150}))
        deadline = time.monotonic() + 60
        while not any(re.match(r"STATUS=job \d+ \(slow\): step \d+ of 150", a) for a in listener.assignments()):
            assert time.monotonic() < deadline, "no STATUS line naming the job and its step"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    said = listener.assignments()
    assert "STOPPING=1" in said
    # The job was still running when the stop came: systemd was asked to wait for it.
    assert any(a.startswith("EXTEND_TIMEOUT_USEC=") and int(a.split("=")[1]) > 0 for a in said)
    assert (env.output / "slow" / "slow.mp4").exists()  # it finished within the grace period
    assert said.index("READY=1") < said.index("STOPPING=1")

    lines = stderr_path.read_text().splitlines()
    events = [line for line in lines if '"event"' in line]
    assert events and all(re.match(r"<[0-7]>\{", line) for line in events), events[:3]
    parsed = {json.loads(line[3:])["event"]: line[:3] for line in events}
    assert parsed["ready"] == "<6>" and parsed["stopped"] == "<6>"


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/done"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def metric_samples(path: Path) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(path.read_text()) for s in fam.samples
    }


def test_pause_holds_jobs_back_resume_runs_them_and_the_finished_job_reaches_metrics_and_webhooks(
    env: Env, drop, tmp_path: Path,
):
    receiver = Receiver()
    prom = tmp_path / "textfile" / "i2v-daemon.prom"
    write_config(env.config, env.data, env.model_dir, metrics="textfile", metrics_textfile=str(prom),
                 webhooks=[receiver.url], webhook_timeout_seconds=2)
    try:
        # `pause` never creates a database (it only asks): make it as a daemon would, then pause.
        assert env.cli("pause").returncode == 1
        env.cli("migrate", check=True)
        assert "paused" in env.cli("pause", check=True).stdout
        drop("cat", (".txt", "a cat turns its head"))
        once = env.cli("run", "--once", check=True)  # paused: takes the files in, runs nothing, exits
        assert '"event": "paused"' in once.stderr
        assert env.status()["counts"]["queued"] == 1
        assert "paused since" in env.cli("status", check=True).stdout
        prom.unlink()  # `run --once` wrote it on its way out; the daemon writes it again once ready

        proc = start_daemon(env)
        try:
            wait_for(lambda: prom.exists(), timeout=120, what="the metrics textfile (written at ready)")
            time.sleep(1.5)
            assert env.status()["counts"]["queued"] == 1  # the running daemon does not take it either
            assert "resumed" in env.cli("resume", check=True).stdout
            wait_for(lambda: (env.output / "cat" / "cat.mp4").exists(), timeout=60, what="output/cat/cat.mp4")
            wait_for(lambda: receiver.bodies, timeout=10, what="the webhook")
        finally:
            code, err = stop(proc)
        assert code == 0, err[-3000:]
        events = [json.loads(line).get("event") for line in err.splitlines() if line.startswith("{")]
        assert "paused" in events and "resumed" in events
    finally:
        receiver.close()

    body = receiver.bodies[0]
    assert (body["name"], body["status"], body["error"]) == ("cat", "succeeded", None)
    assert body["output"] == str(env.output / "cat" / "cat.mp4") and body["durations"]["running_seconds"] > 0
    got = metric_samples(prom)
    assert got[("i2v_jobs_total", (("outcome", "succeeded"),))] == 1
    assert got[("i2v_tries_total", (("outcome", "succeeded"),))] == 1
    assert got[("i2v_job_duration_seconds_count", (("outcome", "succeeded"),))] == 1
    assert got[("i2v_step_duration_seconds_count", ())] >= 1  # 2 steps: the second is timed
    assert got[("i2v_queue_jobs", (("status", "succeeded"),))] == 1
    assert got[("i2v_paused", ())] == 0
    assert Store(env.db_url).is_paused() is False
