"""What the daemon owes systemd and its operators besides videos: sd_notify, metrics, retention.

`daemon.py` builds one `Service`, hands its `on_*` methods to the worker and the closer when it
builds them, and calls it at the few moments that matter: started, ready, each main-loop turn, each
scheduler tick, stopping.
Every hook is cheap and never raises into the worker: a metrics file must not fail a job.
Webhooks and the on_finish hook are owed in the database's outbox (see notifications.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from i2v_daemon.logs import get_logger
from i2v_daemon.queue.jobs import Job
from i2v_daemon.service.systemd import Notifier

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store
    from i2v_daemon.settings import Settings

log = get_logger()

#: how often the textfile for node_exporter is rewritten (also after every finished job)
TEXTFILE_SECONDS = 15
#: on a terminal, at most one progress line this often while a job denoises
PROGRESS_LINE_SECONDS = 2.0
#: during a shutdown, keep extending systemd's stop timeout while the job reported a step this recently
STOP_PROGRESS_WINDOW = 60.0


class Service:
    def __init__(
        self, settings: Settings, store: Store, *, notifier: Notifier | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        self.s = settings
        self.store = store
        self.stop_requested = stop_requested  # a shutdown is under way (the daemon's Stopper says)
        self.notifier = notifier or Notifier.from_env()
        self.metrics = None
        if settings.metrics != "off":
            from i2v_daemon.service.metrics import Metrics  # prometheus_client only when asked for

            self.metrics = Metrics(store)
        self._http: Any = None
        # A person watching `run` in a terminal sees the running job move; the journal gets phases only.
        self.progress_lines = sys.stderr.isatty()
        self._last_line = float("-inf")
        self._step_clock: dict[int, tuple[float, int]] = {}
        self._started = False
        self._paused = False
        self._stop_since: float | None = None  # monotonic time the stop was first seen

    # ---- life cycle -------------------------------------------------------------------------------

    def start(self, *, serve_http: bool = True) -> None:
        """Open the metrics port (a port in use is a configuration error)."""
        if self._started:
            return
        self._started = True
        if self.metrics is not None and self.s.metrics == "http" and serve_http:
            self._http = self.metrics.serve(self.s.metrics_address, self.s.metrics_port)

    def schedule(self, scheduler: Any) -> None:
        """Add the periodic duties to the daemon's APScheduler."""
        if self.metrics is not None and self.s.metrics == "textfile":
            scheduler.add_job(self.write_textfile, "interval", seconds=TEXTFILE_SECONDS, id="metrics-textfile")
        if self.s.retention_days > 0:
            first = datetime.now(UTC) + timedelta(seconds=60)  # not in the middle of start-up
            scheduler.add_job(self.retention, "interval", hours=24, next_run_time=first, id="retention")

    def loading(self) -> None:
        self.notifier.alive()  # a start-up load is progress: the watchdog is not yet armed for it anyway
        self.notifier.status(f"loading the model {self.s.model}", force=True)

    def alive(self) -> None:
        """The running job made progress (a phase, a step, or work in an opaque phase): feed the watchdog."""
        self.notifier.alive()

    def status(self, text: str) -> None:
        self.notifier.status(text, force=True)

    def ready(self) -> None:
        """The model is loaded and the inbox watched."""
        self.notifier.ready(f"ready; watching {self.s.inbox_dir}")
        self.write_textfile()

    def loop(self, *, paused: bool = False) -> None:
        """One turn of the main loop: the daemon is alive."""
        self.notifier.alive()
        if paused != self._paused:
            self._paused = paused
            text = "paused: takes no new jobs (`i2v-daemon resume`)" if paused else f"watching {self.s.inbox_dir}"
            self.notifier.status(text, force=True)

    def tick(self, *, stop_requested: float | None, running: int | None, now: float) -> None:
        """Every second, from the scheduler: feed the watchdog, and during a stop keep systemd waiting."""
        self.notifier.tick(now)
        if stop_requested is not None:
            self._stop_since = stop_requested
            self._during_stop(running, now)

    def _during_stop(self, running: int | None, now: float) -> None:
        """STOPPING=1 once; while the job makes progress, ask systemd to wait for it."""
        since = self._stop_since if self._stop_since is not None else now
        self._stop_since = since
        self.notifier.stopping("stopping; the running job finishes first" if running else "stopping")
        if running is not None and self.notifier.stalled_for(now) < STOP_PROGRESS_WINDOW:
            left = max(0.0, self.s.shutdown_grace_seconds - (now - since))
            # The grace left, plus room for the step that ends the job once the grace is over.
            self.notifier.extend_timeout(left + STOP_PROGRESS_WINDOW, now=now)

    def stopping(self) -> None:
        self.notifier.stopping()

    def close(self) -> None:
        """Final metrics, then quiet."""
        self.write_textfile()
        if self._http is not None:
            self._http.shutdown()
            self._http = None
        self.notifier.close()

    # ---- hooks from the workers -------------------------------------------------------------------

    def on_progress(self, job: Job, step: int, total: int) -> None:
        self.notifier.alive()
        self.notifier.status(f"job {job.id} ({job.name}): step {step} of {total}", force=step == 1)
        self._show_progress(job, step, total)
        if self.metrics is not None:
            self.metrics.step(job, step, total)
        if self.stop_requested():  # a stop came: tell systemd now, not at the tick
            self._during_stop(job.id, time.monotonic())

    def on_phase(self, job: Job, phase: str) -> None:
        self.notifier.status(f"job {job.id} ({job.name}): {phase}", force=True)
        if self.progress_lines:
            log.info("phase", job_id=job.id, job=job.name, phase=phase)

    def _show_progress(self, job: Job, step: int, total: int) -> None:
        """On a terminal, a line every few seconds of denoising: step i of N and the time left at this pace."""
        if not self.progress_lines:
            return
        now = time.monotonic()
        started = self._step_clock.setdefault(job.id, (now, step))
        if step != total and now - self._last_line < PROGRESS_LINE_SECONDS:
            return
        self._last_line = now
        t0, first = started
        left = (now - t0) / (step - first) * (total - step) if step > first else None
        log.info("progress", job_id=job.id, job=job.name, step=f"{step}/{total}",
                 eta=f"{left:.0f} s" if left is not None else "-")
        if step == total:
            self._step_clock.pop(job.id, None)

    def on_try(self, job: Job, entry: dict[str, Any]) -> None:
        self.notifier.alive()
        if self.metrics is not None:
            self.metrics.tried(entry)

    def on_finish(self, job: Job) -> None:
        self.notifier.status(f"idle; job {job.id} ({job.name}) {job.status.value}", force=True)
        if self.metrics is not None:
            self.metrics.finished(job)
            self.write_textfile()

    # ---- periodic ---------------------------------------------------------------------------------

    def write_textfile(self) -> None:
        if self.metrics is not None and self.s.metrics == "textfile":
            self.metrics.write_textfile(self.s.filled("metrics_textfile"))

    def retention(self, now: datetime | None = None) -> Any:
        from i2v_daemon.service.retention import apply_retention

        try:
            return apply_retention(self.store, self.s, now=now)
        except Exception:
            log.exception("retention_failed")  # tomorrow's run tries again; nothing was half-done
            return None
