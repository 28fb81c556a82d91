"""What a start needs, and whether it is there, not there yet (wait for it) or never right (exit 78).

A daemon that starts at boot meets a world that is still coming up: PostgreSQL not accepting
connections yet, a share mounted read-only until its server answers, a driver being reloaded.
Those go away by themselves, so `run` and `serve` wait for them (`Waiter`: capped exponential
backoff, one `waiting_for` log line per try, `STATUS=` and the start timeout kept alive for
systemd) and go on once everything is there. What can never work as configured (a bad value, a URL
no driver handles, a path that is a file, refused credentials, a CPU-only torch for `device =
"cuda"`) is a `ConfigError` at once: exit 78, and systemd does not restart into it.

Every probe raises one of the two, judged here by the real exception: the errno of an `OSError`,
the driver's message of a database error. `doctor` asks the same probes once, without waiting.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from i2v_daemon import faults
from i2v_daemon.errors import ConfigError, I2VError, NotReady
from i2v_daemon.logs import get_logger
from i2v_daemon.service.systemd import Notifier

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings

log = get_logger()

#: The first wait after a failed look, doubling up to the cap.
FIRST_WAIT_SECONDS, MAX_WAIT_SECONDS = 1.0, 30.0
#: While waiting, systemd's start timeout is pushed this far ahead, at least this often (EXTEND_TIMEOUT_USEC):
#: a daemon that waits is never killed for it, one that hangs still is, once both timeouts have passed.
EXTEND_SECONDS, EXTEND_EVERY_SECONDS = 90.0, 10.0
#: When a wait is over, the rest of the start (the model load, a first download) gets what the shipped
#: unit's TimeoutStartSec gives a start that did not wait.
AFTER_WAIT_SECONDS = 1800.0

#: errnos of a filesystem that is not there now but may be soon: read-only (a share's server away, a
#: remount pending), stale or failing (NFS, CIFS, FUSE), a device that is not there yet, a full disk.
NOT_YET_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EROFS", "EIO", "ESTALE", "ENOTCONN", "ETIMEDOUT", "EHOSTDOWN", "EHOSTUNREACH", "ENETUNREACH",
        "ENETDOWN", "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "ENOSPC", "EDQUOT", "EAGAIN", "EBUSY",
        "EINTR", "ENOMEDIUM", "ENODEV", "ENXIO", "ENOLCK", "EREMOTEIO", "ECOMM",
    ) if hasattr(errno, name)
)

DATABASE_KEY = "database_url / I2V_DATABASE_URL"
#: A server that answered and refused for good: credentials, a database or role that is not there.
_REFUSED = re.compile(
    r"authentication failed|no pg_hba\.conf entry|does not exist|permission denied|no password supplied|"
    r"password is required|invalid (connection option|sslmode|integer value|uri|port)|missing \"=\"|"
    r"certificate|does not support ssl|scram authentication requires|unsupported frontend protocol",
    re.IGNORECASE,
)
#: A server that answered "not now": starting, stopping, recovering, full.
_SERVER_NOT_NOW = re.compile(
    r"starting up|shutting down|recovery mode|not yet accepting|not accepting connections|too many (clients|"
    r"connections)|remaining connection slots|administrator command|cannot connect now|in hot standby",
    re.IGNORECASE,
)
#: SQLite's own words for a file that cannot be used as it is (a person must replace or move it).
_SQLITE_BROKEN = re.compile(r"not a database|malformed|is encrypted", re.IGNORECASE)


@dataclass(frozen=True)
class Probe:
    """One thing a start needs: `check()` returns once it is there, raises NotReady (not yet) or ConfigError."""

    name: str
    check: Callable[[], object]


# ---- judging a failure ---------------------------------------------------------------------------------


def os_problem(err: OSError, key: str, path: Path, doing: str = "cannot use") -> I2VError:
    """A folder's OSError judged: NotReady for a filesystem that may come back, else a ConfigError naming `key`."""
    env = f"{key} / I2V_{key.upper()}"
    reason = err.strerror or str(err)
    if err.errno in NOT_YET_ERRNOS:
        return NotReady(f"{key} {path}", reason[:1].lower() + reason[1:],
                        fix=f"the daemon goes on by itself once {path} can be written again")
    if err.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(f"{env}: {path} is not writable by this user ({reason})")
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        return ConfigError(f"{env}: {doing} {path}: it, or a folder above it, is a file, not a folder")
    return ConfigError(f"{env}: {doing} {path}: {reason}")


def folder_problem(key: str, path: Path) -> None:
    """Make `path` (and its parents) and write a file in it: ConfigError (never) or NotReady (not now) if not."""
    env = f"{key} / I2V_{key.upper()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{env}: {path} is a file, not a folder") from None
    except NotADirectoryError:
        raise ConfigError(f"{env}: cannot create {path}: a part of that path is a file, not a folder") from None
    except OSError as err:
        raise os_problem(err, key, path, "cannot create") from None
    try:
        faults.write_fault(str(path))
        # Writing is the only honest test: a share can be mounted read-write and still refuse (an NFS
        # export made read-only on its server), and os.access does not say why it would fail.
        fd, name = tempfile.mkstemp(prefix=".i2v-write-check-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise os_problem(err, key, path, "cannot write in") from None


def database_what(url: str) -> str:
    """The database as waiting messages name it: `the database at db.example:5432`, or its SQLite file."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return "the database"
    if parsed.get_backend_name() == "sqlite":
        return f"the database {parsed.database or 'in memory'}"
    host = parsed.host or parsed.query.get("host") or "the local socket"
    return f"the database at {host}:{parsed.port or 5432}" if parsed.host else f"the database at {host}"


def database_problem(err: BaseException, url: str) -> I2VError:
    """Why the job database could not be opened, judged: NotReady (not now) or ConfigError (never as configured)."""
    from sqlalchemy import exc

    if isinstance(err, I2VError):
        return err if isinstance(err, ConfigError | NotReady) else NotReady(database_what(url), str(err))
    text = _one_line(err)
    shown = f"{DATABASE_KEY}: cannot open {_safe_url(url)}: {text}"
    if isinstance(err, exc.ArgumentError | exc.NoSuchModuleError | ImportError | ValueError):
        return ConfigError(shown)  # a URL no driver handles, or one that does not parse
    orig = getattr(err, "orig", None) or err
    if isinstance(orig, OSError) and not isinstance(err, exc.DBAPIError):
        path = Path(_sqlite_file(url) or ".").parent
        judged = os_problem(orig, "database_url", path)
        return judged if isinstance(judged, NotReady) else ConfigError(shown)
    if not isinstance(err, exc.OperationalError | exc.InterfaceError):
        return ConfigError(shown)  # e.g. no right to create the tables: a person must grant it
    if _sqlite_file(url) is not None:
        return _sqlite_problem(text, url, shown)
    server_said = "FATAL:" in text or "ERROR:" in text
    if _SERVER_NOT_NOW.search(text) or not (server_said or _REFUSED.search(text)):
        return NotReady(database_what(url), _cause(text),
                        fix="the daemon goes on by itself once the database accepts connections")
    return ConfigError(shown)


def _sqlite_problem(text: str, url: str, shown: str) -> I2VError:
    if _SQLITE_BROKEN.search(text):
        return ConfigError(shown)
    path = Path(_sqlite_file(url) or ".")
    try:
        folder_problem("database_url", path.parent)  # its folder: read-only or failing now, or never writable
    except NotReady as err:
        return NotReady(database_what(url), err.cause, fix=err.fix)
    except ConfigError:
        return ConfigError(shown)
    if "locked" in text or "disk i/o" in text.lower() or "readonly" in text.lower():
        return NotReady(database_what(url), _cause(text))
    return ConfigError(shown)


def _sqlite_file(url: str) -> str | None:
    from i2v_daemon.queue.store import sqlite_path

    try:
        return sqlite_path(url)
    except Exception:
        return None


def _one_line(err: BaseException) -> str:
    """The driver's own message, without SQLAlchemy's statement echo and link."""
    return "; ".join(line.strip() for line in str(getattr(err, "orig", None) or err).splitlines() if line.strip())


def _cause(text: str) -> str:
    """The reason alone, for `waiting for X: <cause>`: `connection refused`, `the database system is starting up`."""
    first = text.split("; ")[0]
    if " failed: " in first:
        first = first.rsplit(" failed: ", 1)[1]
    first = re.sub(r"^(FATAL|ERROR):\s+", "", first)
    first = re.sub(r"\[Errno -?\d+\]\s*", "", first).strip()
    return first[:1].lower() + first[1:200] if first else "no answer"


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured URL"


# ---- the probes of a start --------------------------------------------------------------------------


def folder_probes(settings: Settings) -> list[Probe]:
    """inbox, output, failed and work: each made if missing and written to."""
    return [Probe(key, _folder_check(key, Path(path))) for key, path in settings.folders().items()]


def _folder_check(key: str, path: Path) -> Callable[[], None]:
    return lambda: folder_problem(key, path)


def database_probe(settings: Settings) -> Probe:
    """The job database opens and is at (or upgraded to) this release's schema: what `run` does at start."""

    def check() -> None:
        from i2v_daemon.queue.store import Store

        url = settings.filled("database_url")
        try:
            store = Store(url, max_attempts=settings.max_attempts)
            try:
                store.create_schema()
            finally:
                store.close()
        except Exception as err:
            raise database_problem(err, url) from None

    return Probe("database", check)


def model_cache_problem(settings: Settings) -> None:
    """The default model's folder, or the Hugging Face cache it is fetched into, can be read now.

    Only a filesystem that is failing *now* (a stale or unreachable share) is judged here; a folder
    that is missing or not a pipeline is the loader's to name (exit 78).
    """
    model = str(settings.model)
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        target, what = Path(model).expanduser(), "the model folder"
    else:
        from huggingface_hub import constants

        target, what = Path(constants.HF_HUB_CACHE), "the model cache"
    try:
        os.listdir(target)
    except OSError as err:
        if err.errno in NOT_YET_ERRNOS:
            reason = err.strerror or str(err)
            raise NotReady(f"{what} {target}", reason[:1].lower() + reason[1:]) from None


def gpu_problem(device: str) -> None:
    """`device = "cuda…"`: a CUDA build of torch (else 78) and a driver that shows the GPU now (else wait).

    `auto` never waits: it means "the GPU if there is one"; set `cuda` to wait for it.
    """
    if not device.startswith("cuda"):
        return
    from i2v_daemon.models.gpu import gpu_state

    state = gpu_state()
    if state.cuda_build is None and state.count is not None:
        raise ConfigError(
            f"device / I2V_DEVICE: device = {device!r}, but this torch ({state.torch}) is a CPU-only build; "
            "install a CUDA build of torch (`make install` where nvidia-smi sees a GPU), or set device = \"cpu\""
        )
    if state.count is None:
        return  # a ROCm build: torch asks at load
    if not state.count:
        raise NotReady("the GPU", state.error or "the NVIDIA driver shows no GPU",
                       fix="the daemon goes on by itself once the driver shows the GPU (see nvidia-smi)")
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= state.count:
        raise ConfigError(
            f"device / I2V_DEVICE: device = {device!r}, but the driver shows {state.count} GPU(s); "
            "set device to cuda:0 … or to 'auto'"
        )


def run_probes(settings: Settings) -> list[Probe]:
    """What `run` needs before it can say READY, cheapest first."""
    return [
        *folder_probes(settings),
        database_probe(settings),
        Probe("model_cache", lambda: model_cache_problem(settings)),
        Probe("gpu", lambda: gpu_problem(str(settings.device))),
    ]


# ---- waiting -----------------------------------------------------------------------------------------


class Waiter:
    """Looks at the probes until all pass, backing off 1 s doubling to 30 s, telling the log and systemd.

    `stopping()` ends a wait early (a signal); `clock` and `sleep` are parameters so tests need no
    real time.
    """

    def __init__(
        self, notifier: Notifier | None = None, *, stopping: Callable[[], bool] = lambda: False,
        first: float = FIRST_WAIT_SECONDS, cap: float = MAX_WAIT_SECONDS,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.notifier = notifier or Notifier(None)
        self.stopping = stopping
        self.cap = cap
        self.clock = clock
        self.sleep = sleep
        self.current: NotReady | None = None  #: what the wait is for now (None: nothing)
        self.attempts = 0
        self.waited_since: float | None = None
        self._delay = first

    @staticmethod
    def look(probes: Sequence[Probe]) -> list[tuple[Probe, NotReady]]:
        """Each probe once: those not there yet. A ConfigError (one never will be) is raised at once."""
        pending: list[tuple[Probe, NotReady]] = []
        for probe in probes:
            try:
                probe.check()
            except NotReady as err:
                pending.append((probe, err))
        return pending

    def wait(self, probes: Sequence[Probe], then: Probe | None = None) -> bool:
        """Until every probe passed (True) or `stopping()` (False); ConfigError as soon as one never can.

        `then` (building the daemon) runs once every probe passed; if it meets something that is not
        there (it went away again in between), the wait goes on and every probe is asked again.
        """
        left = list(probes)
        while True:
            pending = self.look(left)
            left = [probe for probe, _ in pending]
            if not pending and then is not None:
                pending = self.look([then])
                left = list(probes) if pending else []
            if not pending:
                self._done()
                return True
            self._say(pending)
            if not self._pause(self._delay):
                return False
            self._delay = min(self.cap, self._delay * 2)

    def _say(self, pending: list[tuple[Probe, NotReady]]) -> None:
        first = pending[0][1]
        self.current = first
        self.attempts += 1
        if self.waited_since is None:
            self.waited_since = self.clock()
        others = sorted({err.what for _, err in pending[1:]} - {first.what})
        log.warning("waiting_for", what=first.what, cause=first.cause, next_try_in_seconds=self._delay,
                    attempt=self.attempts, **({"also_waiting_for": others} if others else {}),
                    **({"fix": first.fix} if first.fix else {}))
        self.notifier.status(f"waiting for {first.what}: {first.cause}", force=True)
        self.notifier.extend_timeout(EXTEND_SECONDS + self._delay, now=self.clock(), every=0)

    def _pause(self, seconds: float) -> bool:
        """Sleep `seconds` in short slices: alive for the watchdog, the start timeout pushed ahead, a stop seen."""
        end = self.clock() + seconds
        while True:
            if self.stopping():
                return False
            now = self.clock()
            if now >= end:
                return True
            self.notifier.alive(now)
            self.notifier.tick(now)
            self.notifier.extend_timeout(EXTEND_SECONDS, now=now, every=EXTEND_EVERY_SECONDS)
            self.sleep(min(0.25, end - now))

    def _done(self) -> None:
        if self.waited_since is not None:
            log.info("waited", what=self.current.what if self.current else None,
                     seconds=round(self.clock() - self.waited_since, 1), attempts=self.attempts)
            self.notifier.status("starting: what it waited for is there", force=True)
            self.notifier.extend_timeout(AFTER_WAIT_SECONDS, now=self.clock(), every=0)
        self.current = None
        self.waited_since = None


@contextlib.contextmanager
def stop_signals() -> Iterator[Callable[[], bool]]:
    """SIGTERM, SIGINT and SIGHUP while waiting: noted (the wait ends, exit 0), the handlers put back after."""
    got: list[int] = []
    wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    before = {sig: signal.getsignal(sig) for sig in wanted}
    for sig in wanted:
        signal.signal(sig, lambda signum, _frame: got.append(signum))  # a list append: safe in a handler
    try:
        yield lambda: bool(got)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
