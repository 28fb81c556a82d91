"""sd_notify without a dependency: datagrams to `$NOTIFY_SOCKET`, and a watchdog fed only by progress.

systemd (`Type=notify`) learns from these messages that the daemon is ready, what it is doing
(`STATUS=`), that it is still alive (`WATCHDOG=1`), and that it is stopping. Outside systemd
`$NOTIFY_SOCKET` is unset and every method does nothing. Time is a parameter (`now`, monotonic
seconds) so the watchdog's rules are tested without sleeping.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

from i2v_daemon.logs import get_logger

log = get_logger()


def socket_address(value: str | None) -> str | None:
    """`$NOTIFY_SOCKET` as an AF_UNIX address: a path, or `@name` for an abstract socket."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other transports are not ours to speak


def watchdog_seconds(environ: Mapping[str, str]) -> float:
    """The watchdog interval systemd asks for (`$WATCHDOG_USEC`), 0 when off or meant for another process."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return 0.0
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0.0
    return usec / 1e6 if usec > 0 else 0.0


class Notifier:
    """Speaks sd_notify. Thread-safe; never raises: a lost datagram must not stop the daemon."""

    def __init__(self, address: str | None, *, watchdog: float = 0.0, status_interval: float = 2.0) -> None:
        self.address = address
        self.watchdog = watchdog  # seconds; 0 = no watchdog
        self.status_interval = status_interval
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        self._last_status: str | None = None
        self._last_status_at = float("-inf")
        self._last_progress = time.monotonic()
        self._last_pet = float("-inf")
        self._stopping_sent = False
        self._last_extend_at = float("-inf")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET")
        address = socket_address(raw)
        if raw and address is None:
            log.warning("notify_socket_unsupported", notify_socket=raw)
        return cls(address, watchdog=watchdog_seconds(env) if address else 0.0)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; False when off or the datagram was lost."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.settimeout(1.0)  # a stuck receiver must not stall the worker
                self._sock.sendto(data, self.address)
                return True
            except OSError as err:
                if not self._warned:  # once: a missing socket would otherwise fill the log every second
                    self._warned = True
                    log.warning("notify_failed", socket=self.address.replace("\0", "@"), error=str(err))
                return False

    # ---- the states systemd cares about ------------------------------------------------------

    def ready(self, status: str = "ready") -> None:
        """The model is loaded and the inbox is watched: `systemctl start` returns now."""
        self.alive()
        self.send("READY=1", f"STATUS={status}")
        self._last_status, self._last_status_at = status, time.monotonic()

    def status(self, text: str, *, force: bool = False, now: float | None = None) -> bool:
        """`STATUS=` for `systemctl status`; at most one every `status_interval` unless forced."""
        now = time.monotonic() if now is None else now
        if text == self._last_status or (not force and now - self._last_status_at < self.status_interval):
            return False
        self._last_status, self._last_status_at = text, now
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "stopping") -> None:
        """Once, when a stop is noticed (never from inside the signal handler)."""
        if not self._stopping_sent:
            self._stopping_sent = True
            self.send("STOPPING=1", f"STATUS={status}")
            self._last_status = status

    def extend_timeout(self, seconds: float, *, now: float | None = None, every: float = 5.0) -> bool:
        """Ask for `seconds` more before the stop (or start) timeout; sent at most every `every` s."""
        now = time.monotonic() if now is None else now
        if now - self._last_extend_at < every:
            return False
        self._last_extend_at = now
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    # ---- the watchdog: fed by progress, not by a timer ----------------------------------------

    def alive(self, now: float | None = None) -> None:
        """The main loop iterated or the running job reported a step."""
        self._last_progress = time.monotonic() if now is None else now

    def tick(self, now: float | None = None) -> bool:
        """Called every second: `WATCHDOG=1` if due and progress was seen in the last half interval.

        A hung job or main loop stops the messages, and systemd kills and restarts the daemon
        `WatchdogSec` later; the lease then hands the job back to the queue.
        """
        if not self.watchdog or self.address is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_progress > self.watchdog / 2:
            return False
        if now - self._last_pet < self.watchdog / 4:
            return False
        self._last_pet = now
        return self.send("WATCHDOG=1")

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds since the last sign of progress."""
        return (time.monotonic() if now is None else now) - self._last_progress

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
