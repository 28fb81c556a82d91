"""Prometheus metrics, off by default: served on 127.0.0.1 or written to a textfile for node_exporter.

A registry of our own (never the process-wide default one), filled from the worker's hooks:
a job finished (by outcome, with its duration), a try ended (out-of-memory fallbacks, peak
VRAM), a step done (seconds per step). The queue depth is read from the database at scrape
time, so it counts every worker's jobs, not only this process's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from i2v_daemon import __version__
from i2v_daemon.errors import ConfigError
from i2v_daemon.logs import get_logger
from i2v_daemon.queue.jobs import Job, JobStatus

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store

log = get_logger()

GIB = 2**30
JOB_SECONDS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
STEP_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf"))
VRAM_BUCKETS = (*(g * GIB for g in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 141)), float("inf"))


class _QueueCollector(Collector):
    """`i2v_queue_jobs{status}` and `i2v_paused`, read from the database when scraped."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self.store.counts()
            paused = self.store.is_paused()
        except Exception as err:  # a scrape must not take the daemon down; the gap in the graph shows it
            log.warning("metrics_queue_unreadable", error=f"{type(err).__name__}: {err}")
            return
        queue = GaugeMetricFamily("i2v_queue_jobs", "Jobs in the database by status (all workers)", labels=["status"])
        for status, n in counts.items():
            queue.add_metric([status], n)
        yield queue
        yield GaugeMetricFamily("i2v_paused", "1 while `i2v-daemon pause` holds new jobs back", value=int(paused))


class Metrics:
    """The daemon's metrics and the hooks that feed them; `now` is monotonic seconds."""

    def __init__(self, store: Store | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("i2v_jobs", "Jobs finished by this daemon, by outcome", ["outcome"], registry=r)
        for outcome in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
            self.jobs.labels(outcome.value)  # present at 0 from the start, so rate() works at once
        self.job_seconds = Histogram(
            "i2v_job_duration_seconds", "Seconds from a job's start (its last attempt) to its finish",
            ["outcome"], buckets=JOB_SECONDS_BUCKETS, registry=r,
        )
        self.step_seconds = Histogram(
            "i2v_step_duration_seconds", "Seconds per denoising step", buckets=STEP_SECONDS_BUCKETS, registry=r,
        )
        self.tries = Counter("i2v_tries", "Generation tries, by outcome", ["outcome"], registry=r)
        self.oom = Counter(
            "i2v_oom_fallbacks", "Tries that ran out of GPU memory (the ladder then tried savers or a smaller size)",
            registry=r,
        )
        self.peak_vram = Histogram(
            "i2v_try_peak_vram_bytes", "Peak GPU memory of each try", buckets=VRAM_BUCKETS, registry=r,
        )
        self.peak_vram_max = Gauge("i2v_peak_vram_bytes", "Highest peak GPU memory of any try since start", registry=r)
        Gauge("i2v_daemon_info", "i2v-daemon's version", ["version"], registry=r).labels(__version__).set(1)
        if store is not None:
            r.register(_QueueCollector(store))
        self._lock = threading.Lock()
        self._last_step: tuple[int, int, float] | None = None  # (job id, step, when)
        self._max_peak = 0.0

    # ---- hooks (from the worker's threads) ------------------------------------------------------

    def step(self, job: Job, step: int, total: int, now: float | None = None) -> None:
        """A step finished. Its time is the gap since the previous step of the same try (the first has none)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._last_step
            self._last_step = (job.id, step, now)
        if last is not None and last[0] == job.id and step == last[1] + 1:
            self.step_seconds.observe(max(0.0, now - last[2]))

    def tried(self, entry: dict[str, Any]) -> None:
        """A try ended (one entry of the manifest's `attempts`)."""
        outcome = str(entry.get("outcome") or "unknown")
        self.tries.labels(outcome).inc()
        if outcome == "out_of_memory":
            self.oom.inc()
        peak = entry.get("peak_vram_bytes")
        if isinstance(peak, int | float) and peak > 0:
            self.peak_vram.observe(peak)
            with self._lock:
                if peak > self._max_peak:
                    self._max_peak = float(peak)
                    self.peak_vram_max.set(peak)

    def finished(self, job: Job) -> None:
        self.jobs.labels(job.status.value).inc()
        if job.started_at and job.finished_at:
            seconds = (job.finished_at - job.started_at).total_seconds()
            self.job_seconds.labels(job.status.value).observe(max(0.0, seconds))
        with self._lock:
            if self._last_step and self._last_step[0] == job.id:
                self._last_step = None

    # ---- exposition ---------------------------------------------------------------------------

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def write_textfile(self, path: Path) -> bool:
        """Write the metrics for node_exporter's textfile collector: temp file, then rename."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(path), self.registry)
            return True
        except OSError as err:
            log.warning("metrics_textfile_unwritable", path=str(path), error=str(err))
            return False

    def serve(self, address: str, port: int) -> Any:
        """Serve /metrics over HTTP on `address:port` from a daemon thread; returns the server."""
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as err:
            raise ConfigError(
                f"metrics_port / I2V_METRICS_PORT: cannot listen on {address}:{port} ({err.strerror or err}); "
                "choose a free port or set metrics = \"off\""
            ) from None
        log.info("metrics_serving", url=f"http://{address}:{server.server_port}/metrics")
        return server
