"""sd_notify against a real datagram socket, the watchdog's rules with explicit time, and journal priorities."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from i2v_daemon import logs
from i2v_daemon.service.systemd import Notifier, socket_address, watchdog_seconds


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(2)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock`, each as its text."""
    out = []
    sock.settimeout(0.05)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except (TimeoutError, BlockingIOError):
        return out
    finally:
        sock.settimeout(2)


def test_ready_status_and_stopping_arrive_as_datagrams_on_a_path_socket(listener: socket.socket):
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.getsockname()})
    assert n.enabled
    n.ready("ready; watching /inbox")
    assert listener.recv(4096).decode() == "READY=1\nSTATUS=ready; watching /inbox"
    assert n.status("job 1 (cat): step 1 of 2", force=True)
    assert listener.recv(4096) == b"STATUS=job 1 (cat): step 1 of 2"
    n.stopping()
    n.stopping()  # once only
    assert n.extend_timeout(42, now=100.0)
    assert not n.extend_timeout(42, now=101.0)  # throttled
    assert received(listener) == ["STOPPING=1\nSTATUS=stopping", "EXTEND_TIMEOUT_USEC=42000000"]
    n.close()


def test_an_abstract_socket_is_named_with_a_leading_at():
    name = f"i2v-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert socket_address("@" + name) == "\0" + name
        Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_every_call_is_a_quiet_no_op():
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.send("READY=1") is False
    n.ready()
    n.stopping()
    assert n.tick(now=10.0) is False


def test_a_socket_nobody_listens_on_does_not_raise(tmp_path: Path):
    n = Notifier(str(tmp_path / "gone.sock"))
    assert n.send("READY=1") is False
    assert n.send("WATCHDOG=1") is False


def test_the_watchdog_interval_comes_from_watchdog_usec_and_respects_watchdog_pid():
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) == 0.0  # meant for another process
    assert watchdog_seconds({"WATCHDOG_USEC": "junk"}) == 0.0
    assert watchdog_seconds({}) == 0.0


def test_watchdog_is_sent_only_while_progress_was_seen_in_the_last_half_interval(listener: socket.socket):
    n = Notifier(listener.getsockname(), watchdog=8.0)
    n.alive(now=0.0)
    assert n.tick(now=0.5)  # fresh progress: pet
    assert not n.tick(now=1.0)  # pets at most every interval/4 = 2 s
    assert n.tick(now=2.6)
    assert not n.tick(now=4.1)  # no progress for more than interval/2 = 4 s: silence, so systemd acts
    assert not n.tick(now=7.0)
    n.alive(now=7.5)  # a step was reported
    assert n.tick(now=8.0)
    assert received(listener) == ["WATCHDOG=1"] * 3


def test_status_updates_are_throttled_unless_forced_and_never_repeated(listener: socket.socket):
    n = Notifier(listener.getsockname(), status_interval=2.0)
    assert n.status("step 1", now=10.0)
    assert not n.status("step 2", now=11.0)  # too soon
    assert n.status("step 3", now=12.5)
    assert not n.status("step 3", now=20.0, force=True)  # same text: nothing new to say
    assert n.status("idle", now=20.1, force=True)
    assert received(listener) == ["STATUS=step 1", "STATUS=step 3", "STATUS=idle"]


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_journal_lines_start_with_their_syslog_priority(restore_logging: None):
    out = io.StringIO()
    logs.configure("debug", "json", stream=out, syslog_prefix=True)
    log = logs.get_logger()
    log.debug("d")
    log.info("i", job_id=3)
    log.warning("w")
    log.error("e")
    lines = out.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert json.loads(lines[1][3:])["job_id"] == 3  # the rest of the line is still one JSON object


def test_without_the_journal_lines_have_no_prefix(restore_logging: None):
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    logs.get_logger().warning("w")
    assert out.getvalue().startswith("{")
