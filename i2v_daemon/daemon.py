"""The composition root: builds the parts, runs intake and housekeeping beside the worker, shuts down in order.

Threads: the main thread runs the GPU worker (one job at a time, the GPU is the bottleneck); one
intake thread scans the inbox (woken early by watchdog events, debounced); APScheduler runs the
lease reaper, the liveness beat, housekeeping (rejections, cancels, retries' staging) and the
clock; the outbox sender delivers webhooks and the hook; `signals.Stopper` turns SIGTERM, SIGINT
and SIGHUP into a graceful stop without doing anything unsafe inside a signal handler.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from i2v_daemon import files as folders
from i2v_daemon.delivery.sender import Sender
from i2v_daemon.errors import ConfigError, DatabaseGone, EnvironmentProblem, StopDaemon
from i2v_daemon.intake.inbox import NETWORK_FS, ScanResult, Watcher, filesystem_type
from i2v_daemon.intake.staging import Intake
from i2v_daemon.logs import get_logger
from i2v_daemon.models.gpu import (
    ALLOC_CONF,
    CUDNN_WORKSPACE_MIB,
    CUDNN_WORKSPACE_VAR,
    configure_allocator,
    configure_cudnn_workspace,
)
from i2v_daemon.models.holder import ModelHolder
from i2v_daemon.models.loader import check_never_loads, check_weights
from i2v_daemon.params import BUILTIN_PRESETS, NEEDS_LORA
from i2v_daemon.queue.clock import now_us, utcnow
from i2v_daemon.queue.jobs import Job, JobStatus
from i2v_daemon.queue.migrate import Upgrade
from i2v_daemon.queue.store import Store
from i2v_daemon.service import readiness
from i2v_daemon.service.duties import Service
from i2v_daemon.service.signals import Stopper
from i2v_daemon.service.systemd import Notifier
from i2v_daemon.settings import Settings
from i2v_daemon.views.jobs import job_summary
from i2v_daemon.weights import problem
from i2v_daemon.work import provenance
from i2v_daemon.work.closer import Closer
from i2v_daemon.work.finish import Finisher
from i2v_daemon.work.housekeeper import Housekeeper
from i2v_daemon.work.worker import Worker, dead_local_workers, make_worker_id, model_name

log = get_logger()

EX_CONFIG = 78
#: After a file event, wait this long for more before scanning: a burst of renames is one pass.
DEBOUNCE_SECONDS = 0.1
#: A model that cannot be fetched now is tried again after this long, doubling up to the maximum.
MODEL_RETRY_SECONDS, MODEL_RETRY_MAX = 30.0, 600.0
#: How long the events stream's log of job states is kept (for reconnecting clients).
EVENTS_KEPT_SECONDS = 86_400.0


def open_store(settings: Settings) -> Store:
    """The job store, its schema upgraded to this release's revision (once, even with many daemons starting)."""
    return open_and_upgrade(settings)[0]


def open_and_upgrade(settings: Settings) -> tuple[Store, Upgrade]:
    url = settings.filled("database_url")
    store: Store | None = None
    try:
        store = Store(url, max_attempts=settings.max_attempts, describe=job_summary)
        upgrade = store.create_schema()
    except Exception as err:
        if store is not None:
            store.close()
        if isinstance(err, ConfigError):
            raise
        # A server that is not accepting connections yet is NotReady (`run` waits for it); refused
        # credentials or a URL no driver handles are a ConfigError (exit 78).
        raise readiness.database_problem(err, url) from err
    if upgrade.changed:
        log.info("database_schema_upgraded", before=upgrade.before, after=upgrade.after, stamped=upgrade.stamped)
    return store, upgrade


def one_line(err: BaseException) -> str:
    """The driver's own message, without SQLAlchemy's statement echo and link."""
    return "; ".join(line.strip() for line in str(getattr(err, "orig", None) or err).splitlines() if line.strip())


def safe_url(url: str) -> str:
    """The database URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured URL"


def _warn_if_sqlite_on_a_network_share(store: Store) -> None:
    if store.path is None:
        return
    fstype = filesystem_type(Path(store.path).parent)
    if fstype in NETWORK_FS:
        # SQLite's locks and WAL's shared memory do not work across hosts: two daemons on two hosts
        # would corrupt the file. One host alone usually gets away with it, but nothing promises that.
        log.warning(
            "sqlite_on_network_filesystem", database=store.path, filesystem=fstype,
            fix="keep jobs.db on a local disk (database_url), or use PostgreSQL for several hosts",
        )


def ensure_folders(settings: Settings) -> None:
    """The four folders, and the built-in presets' inbox folders (inbox/fast/, …; wan-turbo/ once it has its LoRA)."""
    wanted = dict(settings.folders())
    presets = settings.all_presets()
    for name in BUILTIN_PRESETS:
        if name in NEEDS_LORA and presets[name].lora is None:
            continue
        wanted[f"inbox_dir/{name}"] = settings.filled("inbox_dir") / name
    for key, path in wanted.items():
        readiness.folder_problem(key.split("/")[0], path)  # NotReady: a read-only or failing share, for now


def start(settings: Settings, *, once: bool = False) -> int:
    """`i2v-daemon run [--once]`: wait for what the start needs (never for what can never work), then run.

    `run` waits for a database, folder, model cache or GPU that is not there yet (NotReady), and
    says so to the log and systemd; a ConfigError is exit 78 at once. `run --once` does not wait: a
    NotReady goes up to the command line (exit 75, "try again later").
    """
    # First: the readiness probes import torch, and the allocator reads its setting at its first use.
    theirs = configure_allocator()
    if theirs is not None:
        log.info("allocator_setting_kept", variable=theirs[0], value=theirs[1], instead_of=ALLOC_CONF,
                 why="the environment sets PyTorch's allocator, so the daemon leaves it as it is")
    cap = configure_cudnn_workspace()
    if cap is not None and cap.strip().isdigit():
        log.info("cudnn_workspace_cap_kept", variable=CUDNN_WORKSPACE_VAR, value=cap,
                 why="the environment caps cuDNN's workspace, so the daemon counts that cap instead of its own")
    elif cap is not None:
        log.warning("cudnn_workspace_cap_unreadable", variable=CUDNN_WORKSPACE_VAR, value=cap,
                    counted_mib=CUDNN_WORKSPACE_MIB,
                    fix=f"set {CUDNN_WORKSPACE_VAR} to a whole number of MiB, or unset it")
    built: list[Daemon] = []

    def build() -> None:
        if not built:
            built.append(Daemon(settings))

    probes = [*readiness.run_probes(settings), readiness.Probe("c2pa_cert", lambda: _certificate(settings))]
    if once:
        pending = readiness.Waiter.look(probes)
        if pending:
            raise pending[0][1]
        build()
    else:
        with readiness.stop_signals() as stopping:
            waiter = readiness.Waiter(Notifier.from_env(), stopping=stopping)
            if not waiter.wait(probes, then=readiness.Probe("start", build)) or stopping():
                log.info("stopped", reason="a signal while waiting", exit_status=0)
                if built:
                    built[0].store.close()
                return 0
    daemon = built[0]
    daemon.install_signal_handlers()
    return daemon.run_once() if once else daemon.run_forever()


def _certificate(settings: Settings) -> None:
    """A configured C2PA certificate that can never sign is exit 78 before any wait (a self-made one is made later)."""
    if str(getattr(settings, "provenance", "c2pa")) == "c2pa":
        files = provenance.signer_files(settings, create=False)
        if not files.self_signed:
            provenance.check_certificate(files)


class Daemon:
    def __init__(self, settings: Settings, *, models: ModelHolder | None = None) -> None:
        self.s = settings
        ensure_folders(settings)
        provenance.prepare(settings)  # the self-made signing chain on first start; a bad c2pa_cert is exit 78
        self.store = open_store(settings)
        _warn_if_sqlite_on_a_network_share(self.store)
        self.models = models or ModelHolder.from_settings(settings, history=self.store.recent_tries)
        self.stopper = Stopper(self.s.shutdown_grace_seconds, on_stop=self._on_stop, on_grace_over=self._grace_over)
        self.service = Service(settings, self.store, stop_requested=lambda: self.stopper.since is not None)
        # One finisher for every end of a job: the worker's, the housekeeper's and intake's rejections.
        self.finisher = Finisher(settings, self.store, model_info=lambda job: self.models.info(model_name(job)))
        self.closer = Closer(settings, self.store, self.finisher, on_finish=self.service.on_finish)
        # host/pid/device: one daemon per GPU, so `status` and the logs say which GPU holds a job.
        self.worker = Worker(
            settings, self.store, self.closer, worker_id=make_worker_id(settings.device), models=self.models,
            on_alive=self.service.alive, on_progress=self.service.on_progress, on_phase=self.service.on_phase,
            on_try=self.service.on_try,
        )
        # Jobs that need no GPU (rejections, cancels, interrupted finishes) end at once, even mid-job.
        self.housekeeper = Housekeeper(settings, self.store, self.closer, worker_id=make_worker_id("housekeeping"))
        self.intake = Intake(
            settings, self.store, owner=make_worker_id("intake"), host=self.worker.host,
            finish_rejected=self._finish_rejected, on_queued=self._wake_worker, fit=self.worker.cards.at_intake,
        )
        self.sender = self._sender()
        self.intake_wake = threading.Event()
        self.worker_wake = threading.Event()
        self.model_ready = False
        self._model_retry_at = 0.0
        self._model_wait = MODEL_RETRY_SECONDS
        self._drain_started_us = 0  # when `run --once` began draining (µs since the epoch)

    @property
    def stop_requested(self) -> float | None:
        return self.stopper.since

    # ---- the parts' wiring --------------------------------------------------------------------

    def _sender(self) -> Sender:
        from i2v_daemon.delivery import kinds as hooks_delivery  # webhooks and hooks: delivered from the outbox

        stopping = threading.Event()  # set by Sender.close: it also ends a hook that is still running
        return Sender(self.store.outbox, make_worker_id("outbox"), hooks_delivery.deliverers(self.s, stopping),
                      retries=self.s.webhook_retries, stopping=stopping)

    def _finish_rejected(self, job: Any, owner: str) -> None:
        latest = self.store.get(job.id) or job
        error = latest.rejection or latest.error or {"type": "invalid_input", "message": "invalid input"}
        self.finisher.finish(latest, JobStatus.FAILED, error, worker_id=owner, frm=JobStatus.STAGING)
        final = self.store.get(job.id)
        if final is not None:
            self.service.on_finish(final)

    def _wake_worker(self) -> None:
        self.worker_wake.set()

    def _on_stop(self, signum: int) -> None:
        self.worker.stopping = True
        if self.s.shutdown_grace_seconds == 0:
            self.worker.stop_now = True
        self.intake_wake.set()
        self.worker_wake.set()

    def _grace_over(self) -> None:
        if not self.worker.stop_now:
            log.warning("grace_period_over", job_id=self.worker.current, action="stopping at the next step")
            self.worker.stop_now = True

    # ---- intake -------------------------------------------------------------------------------

    def intake_pass(self, *, once: bool = False) -> ScanResult:
        """One full scan of the inbox (and staging left by others); every ready group becomes a job."""
        self.store.check()
        return self.intake.pass_once(once=once)

    def _intake_loop(self) -> None:
        while self.stop_requested is None:
            try:
                result = self.intake_pass()
            except DatabaseGone:
                return  # the main loop sees it too and stops the daemon
            except Exception:
                log.exception("intake_pass_failed")  # keep serving; the next pass tries again
                result = ScanResult(next_check=5.0)
            timeout = self.s.rescan_seconds
            if result.next_check is not None:
                timeout = min(timeout, max(0.05, result.next_check + 0.02))
            if self.intake_wake.wait(timeout):
                time.sleep(DEBOUNCE_SECONDS)  # let a burst of renames settle into one pass
            self.intake_wake.clear()

    def housekeeping(self) -> None:
        """Finish what needs no GPU: staging others left (retries), rejections, cancels, interrupted finishes."""
        try:
            self.intake.recover()
            while self.stop_requested is None and self.housekeeper.run_once():
                pass
        except StopDaemon:
            pass  # the main loop meets the same database and stops
        except Exception:
            log.exception("housekeeping_failed")

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
        # Problems a stopped process of this host reported (`run --once` leaves its own, to say why jobs
        # wait; a killed daemon could not take them back). What still holds, this run reports again.
        for owner in dead_local_workers(sorted({p["by"] for p in self.store.control.problems() if p["by"]})):
            self.store.control.resolve_all(by=owner)
        folders.remove_stale_uploads(self.s.filled("work_dir"))

    def _reap(self) -> None:
        requeued = self.store.requeue_expired()
        if requeued:
            log.warning("lease_expired_requeued", job_ids=requeued)
            self.worker_wake.set()

    def _forget_old_events(self) -> None:
        """The events stream's log of states is for live clients and reconnects: a day of it is kept."""
        try:
            self.store.forget_events(older_than_seconds=EVENTS_KEPT_SECONDS)
        except Exception:  # the database is away; the main loop says so, this tries again later
            log.warning("forget_events_failed", exc_info=True)

    def _unload_idle_model(self) -> None:
        if self.models.unload_if_idle(self.s.model_idle_unload_seconds, busy=self.worker.current is not None):
            log.info("model_unloaded", idle_seconds=self.s.model_idle_unload_seconds, reason="idle")

    def _tick(self) -> None:
        now = time.monotonic()
        self.service.tick(stop_requested=self.stop_requested, running=self.worker.current, now=now)
        stalled = self.worker.stalled_at
        if stalled is not None and now - stalled > max(5.0, self.s.stall_seconds / 2):
            # The job was requeued, but the call it is stuck in never returned (a hung driver): a fresh
            # process is the only way on. The supervisor (systemd) starts it again.
            log.critical("worker_hung", job_id=self.worker.current, action="exiting with status 75 to be restarted")
            os._exit(75)

    def _load_model(self) -> bool:
        """Load the default model (ConfigError: it can never load; a fetch problem is retried with backoff)."""
        if self.model_ready:
            return True
        if time.monotonic() < self._model_retry_at:
            return False
        self.service.loading()
        try:
            model = self.models.get()
        except EnvironmentProblem as err:
            self._model_retry_at = time.monotonic() + self._model_wait
            message = f"cannot load the model {self.s.model}: {err}"
            log.error("model_unavailable", model=self.s.model, error=str(err), retry_in_seconds=self._model_wait)
            self.store.control.report("model", message, fix=f"queued jobs wait; a running daemon tries again every "
                                      f"{self._model_wait:.0f} s (see `i2v-daemon doctor`)", by=self.worker.worker_id)
            self.service.status(f"waiting for the model: {err}")
            self._model_wait = min(MODEL_RETRY_MAX, self._model_wait * 2)
            return False
        self.model_ready = True
        self.store.control.resolve("model", by=self.worker.worker_id)
        # `auto` and `cuda` resolve to a real device now; nothing was claimed yet, so the id can follow.
        resolved = getattr(model, "device", None)
        if resolved and resolved != self.worker.device:
            self.worker.rename(resolved)
        return True

    # ---- running --------------------------------------------------------------------------------

    def run_once(self) -> int:
        """`run --once`: take what is in the inbox now, process every queued job, return 0 (78: cannot run).

        Its notifications are delivered in this process before it exits, one after another (each
        bounded by its own timeout); what is not due yet (a webhook in backoff) stays owed.
        """
        self.service.start(serve_http=False)
        try:
            return self._drain()
        except (StopDaemon, DatabaseGone) as err:
            log.error("stopped", reason=str(err))
            return EX_CONFIG
        finally:
            self.sender.drain()
            self.sender.close()
            self.service.close()
            self.worker.cards.retire()
            self.store.control.resolve_all(by=self.intake.owner)
            self._forget_old_events()  # a host that only ever runs `run --once` (a timer) prunes it too

    def _drain(self) -> int:
        self._drain_started_us = now_us()
        # A model that can never load is exit 78 even with no job to run now: the next run would fail the same.
        check_never_loads(self.s.model)
        self._check_weights()
        self.recover()
        while self.stop_requested is None:
            result = self.intake_pass(once=True)
            if result.pending == 0:
                break
            time.sleep(min(max(result.next_check or 0.1, 0.05), 1.0))
        while self.stop_requested is None:
            self.housekeeping()
            if not self.store.has_runnable(now=None):
                break
            if not self._load_model():
                problems = [p for p in self.store.control.problems() if p.get("what") == "model"]
                log.error("jobs_wait_for_the_model", fix=problems[0]["message"] if problems else self.s.model)
                return EX_CONFIG
            if self.worker.run_once():
                continue
            if self.worker.paused:
                log.warning("paused", action="queued jobs stay queued; `i2v-daemon resume` lets them run")
                break
            waiting = self.store.list_jobs(1000, statuses=[JobStatus.QUEUED])
            larger = [j.id for j in waiting if not self.worker.cards.fits(j)]
            if larger:  # this card will never take them: not worth waiting for (their error says why)
                self.worker.cards.explain_waiting()
                log.warning("jobs_left_for_a_larger_card", job_ids=larger)
                waiting = [j for j in waiting if j.id not in larger]
            if self._only_models_missing(waiting):
                return EX_CONFIG  # as for the default model: waiting out backoffs here would not fetch it
            if not self._wait_for_backoff(waiting):
                break
        return 0

    def _check_weights(self) -> None:
        """ConfigError (exit 78) when a configured model can never run with its weights (GGUF on a UNet, …)."""
        weights = self.s.model_weights()
        for name, model in self.s.model_choices().items():
            check_weights(model, weights[name], "" if name == "default" else f"models.{name}.")
        for name, preset in self.s.all_presets().items():
            said = problem(preset.weights, None, f"presets.{name}.weights") if preset.weights else None
            if said:
                raise ConfigError(said)

    def _only_models_missing(self, waiting: list[Job]) -> bool:
        """Every queued job waits for a model that cannot be fetched now (said once, with the reasons)."""
        # Only what this run found: a wait left by an earlier run is tried again, not believed.
        if not waiting or any((j.error or {}).get("type") != "model_unavailable"
                              or (j.updated_us or 0) < self._drain_started_us for j in waiting):
            return False
        log.error("jobs_wait_for_the_model", job_ids=[j.id for j in waiting],
                  reasons=sorted({(j.error or {}).get("message", "") for j in waiting}))
        return True

    def _wait_for_backoff(self, waiting: list[Job]) -> bool:
        """The queued jobs wait out a retry backoff: sleep for the next one if it is due soon; False: leave them."""
        if not waiting:  # only staging left: another intake's, or one that cannot be staged (its log says why)
            return False
        soonest = min((j.not_before for j in waiting if j.not_before), default=None)
        left = (soonest - utcnow()).total_seconds() if soonest else 0.2
        if left > 60:
            log.warning("jobs_left_waiting", job_ids=[j.id for j in waiting],
                        reasons=sorted({(j.error or {}).get("message", "") for j in waiting}))
            return False
        time.sleep(max(0.05, min(left, 1.0)))
        return True

    def run_forever(self) -> int:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.recover()
        self.service.start()  # a metrics port in use fails here (exit 78), before the model loads
        self._check_weights()
        self._load_model()  # ConfigError (exit 78) when it can never load; a fetch problem is retried
        watcher = Watcher(
            self.s.inbox_dir, self.intake_wake, mode=self.s.observer, poll_seconds=self.s.poll_seconds,  # type: ignore[arg-type]
            folders=tuple(self.intake.scanner.folders().values()),
        )
        watcher.start()
        intake = threading.Thread(target=self._intake_loop, name="intake", daemon=True)
        intake.start()
        self.sender.start()
        scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        scheduler.add_job(self._reap, "interval", seconds=max(1.0, self.s.lease_seconds / 2), id="reaper")
        scheduler.add_job(self.worker.beat, "interval", seconds=max(1.0, min(5.0, self.s.lease_seconds / 3)), id="beat")
        scheduler.add_job(self.housekeeping, "interval", seconds=1, id="housekeeping")
        scheduler.add_job(self._tick, "interval", seconds=1, id="tick")
        scheduler.add_job(self._unload_idle_model, "interval", seconds=30, id="idle-unload")
        scheduler.add_job(self._forget_old_events, "interval", minutes=10, id="job-events",
                          next_run_time=datetime.now(UTC))
        self.service.schedule(scheduler)
        scheduler.start()
        log.info(
            "ready", inbox=str(self.s.inbox_dir), observer="polling" if watcher.polling else "native",
            model=self.s.model, worker=self.worker.worker_id, model_loaded=self.model_ready,
        )
        self.service.ready()  # READY=1: the inbox is watched (and the model loaded, unless it waits for it)
        if self.model_ready and self.s.warm_up:
            self._warm_up()
        code = 0
        try:
            code = self._main_loop()
        finally:
            log.info("stopping", reason="signal" if self.stop_requested is not None else "error")
            self.service.stopping()
            watcher.stop()
            self.intake_wake.set()
            intake.join(timeout=10)
            scheduler.shutdown(wait=False)
            self.sender.close()
            self.service.close()
            self.models.unload()
            self.worker.cards.retire()
            for owner in (self.worker.worker_id, self.intake.owner):
                try:
                    self.store.control.resolve_all(by=owner)
                except Exception:  # the database may be what stopped us
                    break
            self.store.close()
        log.info("stopped", exit_status=code)
        return code

    def _warm_up(self) -> None:
        """Compile the presets' shapes before the first job (the fast path only), telling systemd how far it got."""
        done = threading.Event()

        def keep_alive() -> None:  # a cold compile is minutes of CPU with no step to show: that is progress
            cpu = time.process_time()
            while not done.wait(15):
                now = time.process_time()
                if now > cpu:
                    self.service.alive()
                cpu = now

        def progress(i: int, total: int, shape: str) -> None:
            self.service.alive()
            if i < total:
                self.service.status(f"compiling {i + 1}/{total} {shape}")
                log.info("warm_up", shape=shape, of=f"{i + 1}/{total}")

        threading.Thread(target=keep_alive, name="warm-up", daemon=True).start()
        try:
            report = self.models.warm_up(progress)
        except Exception:  # a warm-up is an optimisation: a failure is logged and the jobs compile as they come
            log.exception("warm_up_failed")
            report = []
        finally:
            done.set()
        if report:
            log.info("warmed_up", shapes=report)
            self.service.status(f"ready; watching {self.s.inbox_dir}")

    def _main_loop(self) -> int:
        failures = 0
        while self.stop_requested is None:
            self.service.loop(paused=self.worker.paused)  # feeds the watchdog
            try:
                self.store.check()
                busy = self._load_model() and self.worker.run_once()
                if failures:
                    log.info("worker_loop_recovered", after_failures=failures)
                failures = 0
            except (StopDaemon, DatabaseGone) as err:
                fix = ("put the database file back (or let a restart begin a new, empty one), then restart the daemon"
                       if isinstance(err, DatabaseGone) else "fix what the error names, then restart the daemon")
                log.error("daemon_cannot_go_on", error=str(err), fix=fix)
                self.service.status(f"stopped: {err}")
                return EX_CONFIG
            except ConfigError:
                raise
            except Exception as err:
                # The database or the disk is failing us; leases keep the job safe. Back off, go on.
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.exception("worker_loop_error", consecutive=failures, error=str(err))
                self.service.status(f"retrying: {one_line(err)[:200]}")
                busy = False
                self.worker_wake.wait(min(60.0, 2.0**failures))
            if not busy:
                self.worker_wake.wait(1.0)
                self.worker_wake.clear()
        return 0

    def install_signal_handlers(self) -> None:
        self.stopper.install()
