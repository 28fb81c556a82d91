"""The composition root: builds the parts, runs intake beside the worker, and shuts down in order.

Threads: the main thread runs the worker (one job at a time, the GPU is the bottleneck); one
intake thread scans the inbox (woken early by watchdog events); APScheduler runs the lease
reaper, the heartbeat and the shutdown clock. Signal handlers only set flags.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from i2v_daemon import folders
from i2v_daemon.errors import ConfigError
from i2v_daemon.inbox import NETWORK_FS, Group, InboxScanner, ScanResult, Watcher, filesystem_type
from i2v_daemon.intake import build_request, intake_key
from i2v_daemon.jobs import JobStatus
from i2v_daemon.logs import JobLog, get_logger
from i2v_daemon.migrate import Upgrade
from i2v_daemon.models.holder import ModelHolder
from i2v_daemon.service import Service
from i2v_daemon.settings import Settings
from i2v_daemon.store import LeaseLost, Store
from i2v_daemon.worker import Worker, dead_local_workers, make_worker_id

log = get_logger()


def open_store(settings: Settings) -> Store:
    """The job store, its schema upgraded to this release's revision (once, even with many daemons starting)."""
    return open_and_upgrade(settings)[0]


def open_and_upgrade(settings: Settings) -> tuple[Store, Upgrade]:
    url: str = settings.database_url  # type: ignore[assignment]
    try:
        store = Store(url, max_attempts=settings.max_attempts)
        upgrade = store.create_schema()
    except ConfigError:
        raise
    except Exception as err:
        # One line: the driver's own message, without SQLAlchemy's statement echo and link.
        detail = "; ".join(line.strip() for line in str(getattr(err, "orig", None) or err).splitlines() if line.strip())
        raise ConfigError(f"database_url / I2V_DATABASE_URL: cannot open {safe_url(url)}: {detail}") from err
    if upgrade.changed:
        log.info("database_schema_upgraded", before=upgrade.before, after=upgrade.after, stamped=upgrade.stamped)
    return store, upgrade


def safe_url(url: str) -> str:
    """The database URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured URL"


def _warn_if_sqlite_on_a_network_share(store: Store) -> None:
    url = store.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    fstype = filesystem_type(Path(url.database).parent)
    if fstype in NETWORK_FS:
        # SQLite's locks and WAL's shared memory do not work across hosts: two daemons on two hosts
        # would corrupt the file. One host alone usually gets away with it, but nothing promises that.
        log.warning(
            "sqlite_on_network_filesystem", database=url.database, filesystem=fstype,
            fix="keep jobs.db on a local disk (database_url), or use PostgreSQL for several hosts",
        )


def ensure_folders(settings: Settings) -> None:
    for key, path in settings.folders().items():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"{key} / I2V_{key.upper()}: cannot create {path}: {err.strerror}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key} / I2V_{key.upper()}: {path} is not writable by this user")


class Daemon:
    def __init__(self, settings: Settings, *, models: ModelHolder | None = None) -> None:
        self.s = settings
        ensure_folders(settings)
        self.store = open_store(settings)
        _warn_if_sqlite_on_a_network_share(self.store)
        self.models = models or ModelHolder.from_settings(settings, history=self.store.recent_tries)
        # host/pid/device: one daemon per GPU, so `status` and the logs say which GPU holds a job.
        self.worker = Worker(settings, self.store, worker_id=make_worker_id(settings.device), models=self.models)
        # Rejections are finished by the intake thread at once, under their own worker id.
        self.intake_worker = Worker(settings, self.store, worker_id=make_worker_id("intake"))
        # sd_notify, metrics, webhooks, retention: hooked into both workers (see service.py).
        self.service = Service(settings, self.store)
        self.service.attach(self.worker)
        self.intake_worker.on_finish = self.service.on_finish
        self.scanner = InboxScanner(
            settings.inbox_dir,  # type: ignore[arg-type]
            stable_seconds=settings.stable_seconds,
            sidecar_wait_seconds=settings.sidecar_wait_seconds,
            on_skip=lambda name, why: log.info("inbox_file_skipped", file=name, reason=why),
        )
        self.intake_wake = threading.Event()
        self.worker_wake = threading.Event()
        self.stop_requested: float | None = None  # monotonic time of the first SIGTERM/SIGINT
        self._signals = 0

    # ---- intake -------------------------------------------------------------------------------

    def intake_pass(self, *, once: bool = False) -> ScanResult:
        """One full scan of the inbox; every ready group becomes a job (or a rejected one)."""
        result = self.scanner.scan(once=once)
        for group in result.ready:
            self.take(group)
        return result

    def take(self, group: Group) -> None:
        inbox: Path = self.s.inbox_dir  # type: ignore[assignment]
        files = group.images + group.sidecars
        try:
            key = intake_key(inbox, files)
        except FileNotFoundError:
            return  # moved away between the scan and now; the next scan decides again
        req = build_request(group.stem, group.images, group.sidecars, self.s, key)
        job, created = self.store.enqueue(req, host=self.worker.host)
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            folders.stage_inputs(job.inputs, inbox, self.worker.job_dir(job.id))
        self.scanner.forget([p.name for p in files])
        if not created:
            return
        jlog = JobLog(self.worker.job_dir(job.id) / "job.log", job.id, job.name)
        jlog.info("received", inputs=list(job.inputs), priority=job.priority)
        for note in req.notes:
            jlog.info("note", message=note)
        if req.rejection:
            jlog.error("invalid_input", error=req.rejection["message"])
            self._finish_rejection(job.id)
        else:
            jlog.info("queued", **(req.params.as_dict() if req.params else {}))
            self.worker_wake.set()

    def _finish_rejection(self, job_id: int) -> None:
        claimed = self.store.claim_next(
            self.intake_worker.worker_id, lease_seconds=self.s.lease_seconds, job_id=job_id, host=self.worker.host
        )
        if claimed is not None:
            with contextlib.suppress(LeaseLost):
                self.intake_worker.process(claimed)

    def _intake_loop(self) -> None:
        while self.stop_requested is None:
            try:
                result = self.intake_pass()
            except Exception:
                log.exception("intake_pass_failed")  # keep serving; the next pass tries again
                result = ScanResult(next_check=5.0)
            timeout = self.s.rescan_seconds
            if result.next_check is not None:
                timeout = min(timeout, max(0.2, result.next_check + 0.05))
            self.intake_wake.wait(timeout)
            self.intake_wake.clear()

    # ---- start-up and housekeeping --------------------------------------------------------------

    def recover(self) -> None:
        """Requeue what our own previous run (or any worker whose lease expired) left running."""
        offset = self.store.clock_offset()
        if offset is not None and abs(offset) > self.s.lease_seconds / 4:
            # Another host would see our leases expire early (or we theirs) and run jobs twice.
            log.warning(
                "clock_skew", seconds_behind_database=round(offset, 1), lease_seconds=self.s.lease_seconds,
                fix="keep every host's clock in sync (chrony or systemd-timesyncd)",
            )
        dead = dead_local_workers(self.store.running_workers())
        requeued = self.store.requeue_workers(dead) + self.store.requeue_expired()
        if requeued:
            log.warning("recovered_jobs", job_ids=requeued, reason="left running by a stopped worker")

    def _reap(self) -> None:
        requeued = self.store.requeue_expired()
        if requeued:
            log.warning("lease_expired_requeued", job_ids=requeued)
            self.worker_wake.set()

    def _unload_idle_model(self) -> None:
        if self.models.unload_if_idle(self.s.model_idle_unload_seconds, busy=self.worker.current is not None):
            log.info("model_unloaded", idle_seconds=self.s.model_idle_unload_seconds, reason="idle")

    def _tick(self) -> None:
        since = self.stop_requested
        if since is not None and not self.worker.stop_now and time.monotonic() - since >= self.s.shutdown_grace_seconds:
            log.warning("grace_period_over", job_id=self.worker.current, action="stopping at the next step")
            self.worker.stop_now = True
        self.service.tick(stop_requested=since, running=self.worker.current, now=time.monotonic())

    # ---- running --------------------------------------------------------------------------------

    def run_once(self) -> int:
        """`run --once`: take what is in the inbox now, process every queued job, return 0."""
        self.service.start(serve_http=False)
        try:
            return self._drain()
        finally:
            self.service.close()

    def _drain(self) -> int:
        self.recover()
        while True:
            result = self.intake_pass(once=True)
            if result.pending == 0:
                break
            time.sleep(min(max(result.next_check or 0.1, 0.05), 1.0))
        while self.stop_requested is None:
            if self.worker.run_once():
                continue
            if self.worker.paused:
                log.warning("paused", action="queued jobs stay queued; `i2v-daemon resume` lets them run")
                break
            if not self.store.has_runnable():
                break
            time.sleep(0.2)  # a job is waiting out its retry backoff
        return 0

    def run_forever(self) -> int:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.recover()
        self.service.start()  # a metrics port in use fails here (exit 78), before the model loads
        self.service.loading()
        model = self.models.get()  # fail fast (exit 78) if the model cannot load; then it stays warm
        # `auto` and `cuda` resolve to a real device now; nothing was claimed yet, so the id can follow.
        resolved = getattr(model, "device", None)
        if resolved and resolved != self.worker.device:
            self.worker.device = resolved
            self.worker.worker_id = make_worker_id(resolved)
        watcher = Watcher(self.s.inbox_dir, self.intake_wake, mode=self.s.observer, poll_seconds=self.s.poll_seconds)  # type: ignore[arg-type]
        watcher.start()
        intake = threading.Thread(target=self._intake_loop, name="intake", daemon=True)
        intake.start()
        scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        scheduler.add_job(self._reap, "interval", seconds=max(1.0, self.s.lease_seconds / 2), id="reaper")
        scheduler.add_job(self.worker.heartbeat, "interval", seconds=max(1.0, self.s.lease_seconds / 3), id="heartbeat")
        scheduler.add_job(self._tick, "interval", seconds=1, id="tick")
        scheduler.add_job(self._unload_idle_model, "interval", seconds=30, id="idle-unload")
        self.service.schedule(scheduler)
        scheduler.start()
        log.info(
            "ready", inbox=str(self.s.inbox_dir), observer="polling" if watcher.polling else "native",
            model=self.s.model, worker=self.worker.worker_id,
        )
        self.service.ready()  # READY=1: the model is loaded and the inbox is watched
        failures = 0
        try:
            while self.stop_requested is None:
                self.service.loop(paused=self.worker.paused)  # feeds the watchdog
                try:
                    busy = self.worker.run_once()
                    failures = 0
                except ConfigError:
                    raise
                except Exception:
                    # The database or the disk is failing us; leases keep the job safe. Back off, go on.
                    failures += 1
                    log.exception("worker_loop_error", consecutive=failures)
                    busy = False
                    time.sleep(min(60.0, 2.0**failures))
                if not busy:
                    self.worker_wake.wait(1.0)
                    self.worker_wake.clear()
        finally:
            log.info("stopping", reason="signal")
            self.service.stopping()
            watcher.stop()
            self.intake_wake.set()
            intake.join(timeout=10)
            scheduler.shutdown(wait=False)
            self.service.close()
            self.models.unload()
            self.store.close()
        log.info("stopped")
        return 0

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only flags here: logging and I/O are not safe inside a signal handler.
        self._signals += 1
        if self._signals > 1:
            # Everything on disk is written atomically and the lease recovers the job: safe to go.
            os._exit(128 + signum)
        self.stop_requested = time.monotonic()
        self.worker.stopping = True
        if self.s.shutdown_grace_seconds == 0:
            self.worker.stop_now = True
        self.intake_wake.set()
        self.worker_wake.set()
