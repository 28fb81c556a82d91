"""The post-job hook (`on_finish`, INTERFACE.md §6): a command run once for every finished job.

The hook is an argv list run without a shell, in a session (and process group) of its own, with
stdin from /dev/null and stdout and stderr captured together, keeping only the last 4 KiB. Its
lifetime is bounded: when it exits, or when `on_finish_timeout_seconds` pass, whatever is left
of its process group is stopped (SIGTERM, then SIGKILL), so a hook never leaves work running
that nobody waits for; work that must outlive it should be handed to something that owns it (a
spool folder or queue that another service reads). A failing hook is logged and changes nothing
about the job.

Environment: the `I2V_*` variables of the job, added to a short list inherited from the daemon
(`INHERITED`: PATH, HOME, the locale, TZ, the user's name, TMPDIR) and nothing else, because the
daemon's own environment may hold secrets (`I2V_DATABASE_URL` with a password, tokens).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from i2v_daemon.logs import get_logger

#: What a hook inherits from the daemon's environment, when set (LC_* too).
INHERITED = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "USER", "LOGNAME", "TMPDIR")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
TAIL_BYTES = 4096
#: After SIGTERM, how long the hook's processes have to exit before SIGKILL.
KILL_GRACE_S = 2.0
_POLL_S = 0.02


@dataclass(frozen=True)
class HookResult:
    """How one run of a hook went."""

    exit_code: int | None  # its exit status; -N: killed by signal N; None: it never started
    timed_out: bool  # it ran past its timeout and was stopped
    output_tail: str  # the last TAIL_BYTES of stdout and stderr together, undecodable bytes replaced
    seconds: float
    error: str | None  # why it could not start, e.g. "command not found: notify-me"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None


def hook_env(job_id: int | str, status: str, job_dir: Path, manifest: Path, video: Path | None) -> dict[str, str]:
    """The I2V_* variables a hook gets for one finished job; I2V_VIDEO is empty when there is no video."""
    return {
        "I2V_JOB_ID": str(job_id),
        "I2V_STATUS": str(status),
        "I2V_JOB_DIR": str(job_dir),
        "I2V_MANIFEST": str(manifest),
        "I2V_VIDEO": str(video) if video else "",
    }


def run_hook(
    argv: list[str], env: Mapping[str, str], *, timeout: float, cwd: Path | None = None,
    stop: threading.Event | None = None,
) -> HookResult:
    """Run `argv` with `env` added to the inherited variables, within `timeout` seconds; never raises.

    Setting `stop` ends the hook early as a timeout does (for a shutdown).
    """
    started = time.monotonic()
    log = get_logger(job_id=env.get("I2V_JOB_ID"), hook=argv[0] if argv else None)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**_inherited(), **env}, cwd=cwd, start_new_session=True, close_fds=True,
        )
    except (OSError, ValueError, TypeError, IndexError) as err:
        result = HookResult(None, False, "", round(time.monotonic() - started, 3), _start_error(argv, cwd, err))
        log.warning("hook_failed", exit_code=None, seconds=result.seconds, error=result.error, output_tail="")
        return result
    tail = _Tail(proc)
    exited = _exited(proc.pid, started + timeout, stop)
    # Signalled while its zombie, unreaped, still holds the group id, so that id cannot be reused.
    _signal(proc.pid, signal.SIGTERM)  # on exit, this reaches only what it left behind
    if not exited and not _exited(proc.pid, time.monotonic() + KILL_GRACE_S, None):
        _signal(proc.pid, signal.SIGKILL)
    code = proc.wait()
    _empty_group(proc.pid, time.monotonic() + KILL_GRACE_S)
    tail.done.wait(KILL_GRACE_S)  # a process that left the group may still hold the pipe: not waited for
    stopped = not exited and stop is not None and stop.is_set()
    timed_out = not exited and not stopped
    error = "stopped: the daemon is shutting down" if stopped else None
    result = HookResult(code, timed_out, tail.text(), round(time.monotonic() - started, 3), error)
    fields = {"exit_code": code, "seconds": result.seconds, "output_tail": result.output_tail}
    if timed_out:
        log.warning("hook_timed_out", timeout_seconds=timeout, **fields)
    elif code != 0 or error:
        log.warning("hook_failed", error=error, **fields)
    else:
        log.info("hook_finished", **fields)
    return result


def _inherited() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in INHERITED or k.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def _start_error(argv: list[str], cwd: Path | None, err: Exception) -> str:
    """Why a hook did not start, in words that say what to fix."""
    if not argv:
        return "on_finish is an empty list; give the command and its arguments, or leave on_finish out"
    if isinstance(err, FileNotFoundError) and cwd is not None and err.filename == str(cwd):
        return f"the hook's working folder {cwd} does not exist"
    if isinstance(err, FileNotFoundError):
        return f"command not found: {argv[0]} (on_finish names a program: an absolute path, or one on PATH)"
    if isinstance(err, PermissionError) and os.path.isdir(argv[0]):
        return f"{argv[0]} is a folder, not a program; name the program to run in on_finish's first item"
    if isinstance(err, PermissionError):
        return f"not allowed to run {argv[0]}: make it executable (chmod +x) by the daemon's user"
    return f"could not start {argv[0]}: {err}"


def _exited(pid: int, deadline: float, stop: threading.Event | None) -> bool:
    """Wait until the process exits (left unreaped) or the deadline passes or `stop` is set; True if it exited."""
    while True:
        # WNOWAIT: learn that it exited without reaping it, so its group id stays ours to signal.
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # someone else reaped it: it has exited all the same
            return True
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            return False
        time.sleep(_POLL_S)


def _signal(pgid: int, sig: int) -> None:
    """Send `sig` to the hook's whole process group, if anything of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _empty_group(pgid: int, deadline: float) -> None:
    """Wait for the group's last processes to go (they had SIGTERM); SIGKILL what is left at `deadline`."""
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() >= deadline:
            _signal(pgid, signal.SIGKILL)
            return
        time.sleep(_POLL_S)


class _Tail:
    """Reads a process's output in a thread, keeping only the last TAIL_BYTES (memory stays bounded)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.buf = bytearray()
        self.done = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, args=(proc,), name="hook-output", daemon=True).start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            while chunk := proc.stdout.read1(65536):  # type: ignore[union-attr]
                with self.lock:
                    self.buf += chunk
                    del self.buf[:-TAIL_BYTES]
        except (OSError, ValueError):
            pass
        finally:
            self.done.set()

    def text(self) -> str:
        with self.lock:
            return bytes(self.buf).decode("utf-8", errors="replace")
