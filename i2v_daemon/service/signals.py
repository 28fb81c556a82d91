"""SIGTERM, SIGINT and SIGHUP become a graceful stop; a second one exits at once.

Signal handlers only set flags, and here not even that: Python's C-level handler writes the
signal's number to a pipe (`signal.set_wakeup_fd`), and a watcher thread reads it and does the
rest (logging, waking the loops, the grace timer). So nothing runs inside a handler that could
take a lock the interrupted code holds (`Event.set()` in a handler can deadlock), and the stop is
noticed at once even while the main thread is deep inside a long GPU call. SIGHUP (a closed
terminal) stops cleanly like SIGTERM: to apply a config change, restart the daemon.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

from i2v_daemon.logs import get_logger

log = get_logger()

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopper:
    def __init__(
        self, grace_seconds: float, *, on_stop: Callable[[int], None], on_grace_over: Callable[[], None],
    ) -> None:
        self.grace_seconds = grace_seconds
        self.on_stop = on_stop
        self.on_grace_over = on_grace_over
        self.since: float | None = None  # monotonic time of the first signal
        self.count = 0
        self._read_fd: int | None = None

    def install(self) -> None:
        """From the main thread: route the signals to the watcher thread through a pipe."""
        r, w = os.pipe()
        os.set_blocking(r, True)
        os.set_blocking(w, False)
        os.set_inheritable(r, False)
        os.set_inheritable(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, _ignore)  # the byte in the pipe is what counts; see the module docstring
        self._read_fd = r
        threading.Thread(target=self._watch, name="signals", daemon=True).start()

    def _watch(self) -> None:
        assert self._read_fd is not None
        while True:
            select.select([self._read_fd], [], [])
            for signum in os.read(self._read_fd, 64):
                self.received(signum)

    def received(self, signum: int) -> None:
        """A signal arrived (called from the watcher thread; also how tests deliver one without a process)."""
        self.count += 1
        name = signal.Signals(signum).name
        if self.count > 1:
            # Everything on disk is written atomically and the lease recovers the job: safe to go now.
            log.warning("second_signal", signal=name, action="exiting now; the running job goes back to the queue")
            os._exit(128 + signum)
        self.since = time.monotonic()
        how = (f"a running job has {self.grace_seconds:g} s to finish, then stops at its next step"
               if self.grace_seconds else "a running job stops at its next step")
        hint = "; press Ctrl-C again to quit at once" if signum == signal.SIGINT and sys.stderr.isatty() else ""
        log.info("stop_requested", signal=name, action=how + hint)
        self.on_stop(signum)
        if self.grace_seconds > 0:
            timer = threading.Timer(self.grace_seconds, self.on_grace_over)
            timer.daemon = True
            timer.start()


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler: nothing (the watcher thread has the byte the C handler wrote)."""
