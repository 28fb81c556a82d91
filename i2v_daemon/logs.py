"""Logging: structlog to stderr (readable on a terminal, JSON lines otherwise) and each job's job.log."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog once per process: `fmt` is auto (console on a TTY), console or json."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging; keep their noise at warning and in the same stream.
    logging.basicConfig(level=logging.WARNING, stream=stream, format="%(levelname)s %(name)s: %(message)s")


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("i2v_daemon").bind(**bind)


class JobLog:
    """One job's own log: lines appended to `<job folder>/job.log` and echoed to the daemon's log.

    Each line is opened, appended and closed so that a crash loses at most the line being
    written, and two processes (intake and worker) can both add to it.
    """

    def __init__(self, path: Path, job_id: int, name: str) -> None:
        self.path = path
        self._log = get_logger(job_id=job_id, job=name)

    def _write(self, level: str, event: str, fields: dict[str, Any]) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        line = f"{now} {level.upper():7} {event}{' ' + extra if extra else ''}\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as err:  # the daemon's own log still has the line; don't fail the job over it
            self._log.warning("job_log_unwritable", path=str(self.path), error=str(err))
        getattr(self._log, level)(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._write("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._write("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._write("error", event, fields)


def _fmt(v: Any) -> str:
    if isinstance(v, str) and v and " " not in v and "=" not in v and '"' not in v:
        return v
    return json.dumps(v, ensure_ascii=False, default=str)


def journal_stream() -> bool:
    """True when stderr goes to the systemd journal (JOURNAL_STREAM names our stderr)."""
    js = os.environ.get("JOURNAL_STREAM")
    if not js:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return js == f"{st.st_dev}:{st.st_ino}"
