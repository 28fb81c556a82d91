"""Liveness that means progress: a running job's phases and steps feed its lease, the watchdog and `status`.

A job reports its phase (loading, compiling, denoising, decoding, interpolating, encoding,
publishing) and, while denoising, each step. The store is written on every phase change and at
most once a second otherwise, each write renewing the lease and bringing back a cancel request.
A timer (`beat`) renews the lease between writes only while the job is making progress: in
the step-counted phase a step came within `stall_seconds`; in the opaque phases (a model load, an
encode) the worker thread used CPU or read or wrote data since the last beat. A job that does
neither for `stall_seconds` is stalled: its lease is no longer renewed, so it is requeued.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from i2v_daemon.queue.store import Store

#: Phases in which no step is counted: progress is judged by the worker thread's activity.
OPAQUE = frozenset({"starting", "loading", "compiling", "decoding", "interpolating", "encoding", "publishing"})
#: At most one progress write a second (plus every phase change): a step can be a few milliseconds.
WRITE_INTERVAL = 1.0
#: CPU seconds of the worker thread between two beats that count as "it is working".
CPU_ACTIVITY = 0.02


def thread_activity(native_id: int) -> tuple[float, int]:
    """(CPU seconds, bytes read and written) of one thread of this process, from /proc (0s if unreadable).

    The CPU time of finished child processes counts too: a cold `torch.compile` spends minutes in
    compiler subprocesses while the worker thread waits for them.
    """
    times = os.times()
    cpu, io = times.children_user + times.children_system, 0
    try:
        with open(f"/proc/self/task/{native_id}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = 100.0  # USER_HZ; os.sysconf would say, and it is 100 on every Linux we run on
        cpu += (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, IndexError, ValueError):
        pass
    try:
        with open(f"/proc/self/task/{native_id}/io") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in ("rchar", "wchar"):
                    io += int(value)
    except (OSError, ValueError):
        pass
    return cpu, io


@dataclass
class JobProgress:
    """One running job's progress, owned by the worker thread; `beat` is called from a timer thread."""

    store: Store
    job_id: int
    worker_id: str
    lease_seconds: float
    stall_seconds: float
    on_alive: Callable[[], None] = lambda: None  # the systemd watchdog: fed by progress only
    clock: Callable[[], float] = time.monotonic
    activity: Callable[[int], tuple[float, int]] = thread_activity
    native_id: int = field(default_factory=threading.get_native_id)  # the worker thread's id
    phase: str = "starting"
    step: int = 0
    total: int = 0
    cancel: bool = False  # a cancel was requested (seen on the last write)
    stalled: bool = False
    last_progress: float = field(default=0.0)
    step_started: float = field(default=0.0)  # when the current denoising phase began (the ETA's clock)
    step_times: list[float] = field(default_factory=list)
    _last_write: float = float("-inf")
    _last_activity: tuple[float, int] = (0.0, 0)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.last_progress = self.clock()
        self._last_activity = self.activity(self.native_id)

    # ---- from the worker thread --------------------------------------------------------------

    def enter(self, phase: str) -> bool:
        """The job moved on to `phase`: recorded at once. Returns whether a cancel was requested."""
        with self._lock:
            self.phase = phase
            self._progressed()
            if phase == "denoising":
                self.step_started = self.clock()
        return self._write(phase=phase)

    def advance(self, step: int, total: int) -> bool:
        """Denoising step `step` of `total` is done; written at most once a second. Returns cancel."""
        with self._lock:
            switched = self.phase != "denoising"
            if switched:  # the first step: the pipeline encoded the prompt and image before it
                self.phase = "denoising"
                self.step_started = self.clock()
            self.step, self.total = step, total
            self.step_times.append(self.clock())
            self._progressed()
            first = switched or step == 1  # the ETA's clock starts at step 1's report
            due = first or step == total or self.clock() - self._last_write >= WRITE_INTERVAL
        if not due:
            return self.cancel
        return self._write(phase="denoising" if first else None, step=step, total=total)

    def denoise_seconds(self) -> float | None:
        """Seconds all the denoising steps took, from the time between the first and the last (for ETAs)."""
        n = len(self.step_times)
        if n < 2:
            return None
        return round((self.step_times[-1] - self.step_times[0]) * n / (n - 1), 3)

    # ---- from the timer thread ----------------------------------------------------------------

    def beat(self) -> bool:
        """Renew the lease if the job is progressing; returns False once it is stalled (no renewal)."""
        now = self.clock()
        with self._lock:
            if self.phase in OPAQUE:
                cpu, io = self.activity(self.native_id)
                last_cpu, last_io = self._last_activity
                self._last_activity = (cpu, io)
                if cpu - last_cpu >= CPU_ACTIVITY or io != last_io:
                    self._progressed()
            if now - self.last_progress >= self.stall_seconds:
                self.stalled = True
                return False
        self._write()
        return True

    def stalled_for(self) -> float:
        return self.clock() - self.last_progress

    # ---- shared -------------------------------------------------------------------------------

    def _progressed(self) -> None:
        self.last_progress = self.clock()
        self.stalled = False
        self.on_alive()

    def _write(self, *, phase: str | None = None, step: int | None = None, total: int | None = None) -> bool:
        # LeaseLost goes to the caller: the job is no longer ours, so nothing more may be written.
        self.cancel = self.store.heartbeat(
            self.job_id, self.worker_id, lease_seconds=self.lease_seconds, phase=phase, step=step, total_steps=total,
        )
        self._last_write = self.clock()
        return self.cancel
