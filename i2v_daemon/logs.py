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


#: syslog priority (RFC 5424) per level: a leading `<N>` on a line sets its priority in the journal.
SYSLOG_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


class SyslogPrefixRenderer:
    """Wraps a renderer to put `<N>` before each line; systemd's SyslogLevelPrefix= turns it into the priority."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> str:
        level = str(event_dict.get("level", method_name)).lower()
        return f"<{SYSLOG_PRIORITY.get(level, 6)}>{self.inner(logger, method_name, event_dict)}"


class _SyslogFormatter(logging.Formatter):
    """The same `<N>` prefix for libraries that log through the standard library."""

    def format(self, record: logging.LogRecord) -> str:
        levels = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
        prio = next((p for at_least, p in levels if record.levelno >= at_least), 7)
        return f"<{prio}>{super().format(record)}"


def configure(level: str = "info", fmt: str = "auto", stream: Any = None, syslog_prefix: bool | None = None) -> None:
    """Set up structlog once per process: `fmt` is auto (console on a TTY), console or json.

    `syslog_prefix` (default: when stderr is the journal) starts each line with its priority.
    """
    if syslog_prefix is None:
        syslog_prefix = stream is None and journal_stream()
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty() and not syslog_prefix)
    else:
        renderer = structlog.processors.JSONRenderer()
    if syslog_prefix:
        renderer = SyslogPrefixRenderer(renderer)
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
    handler = logging.StreamHandler(stream)
    line = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(_SyslogFormatter(line) if syslog_prefix else logging.Formatter(line))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


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
