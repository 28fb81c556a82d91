"""Logging: one structlog pipeline to stderr (readable on a terminal, JSON lines otherwise) and each job's job.log.

Everything the process logs goes through one handler on the root logger: our own events, the
libraries' stdlib loggers (huggingface_hub, diffusers, transformers, torch, …), `warnings.warn`
and uncaught exceptions. Libraries that install their own stderr handler at import (which made
every Hub retry print twice, once bare and once through `basicConfig`'s handler) are refused
that handler, before or after `configure`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

#: The stdlib logger our own structlog events go through; everything else is a library.
OWN_LOGGER = "i2v_daemon"

#: syslog priority (RFC 5424) per level: a leading `<N>` on a line sets its priority in the journal.
SYSLOG_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


class SyslogPrefixRenderer:
    """Wraps a renderer to put `<N>` before each line; systemd's SyslogLevelPrefix= turns it into the priority."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> str:
        level = str(event_dict.get("level", method_name)).lower()
        return f"<{SYSLOG_PRIORITY.get(level, 6)}>{self.inner(logger, method_name, event_dict)}"


# ---- the libraries' own handlers ----------------------------------------------------------------

_console_streams: list[Any] = []  # what counts as "the console": stderr, stdout and our own stream


def terminal_safe(line: str) -> str:
    """One line of text for a terminal: control and bidi-format characters (from file names, prompts) as escapes.

    Anyone who may drop files names them, and a name holding ESC sequences or a newline would
    otherwise reach the operator's terminal as commands, or break a table into lines.
    """
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in line)


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def terminal_json(obj: Any, *, indent: int | None = None) -> str:
    """JSON for a terminal: what `json.dumps` leaves raw (C1 controls, bidi formats) as `\\uXXXX` escapes.

    Still the same JSON to a parser (the name itself comes back), and, like `terminal_safe`'s
    text, nothing in it can act on the terminal that shows it.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=str)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in " \n" else _json_escape(c) for c in text)


def _json_escape(c: str) -> str:
    n = ord(c)
    if n < 0x10000:
        return f"\\u{n:04x}"
    n -= 0x10000  # a UTF-16 surrogate pair, as JSON spells a character beyond the BMP
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"


class TerminalWriter:
    """The command line's stdout or stderr: no control or bidi-format character reaches the terminal raw.

    Whatever a command writes keeps its line breaks; every other character that is not printable
    is written as `terminal_safe`'s escape. So a command that forgets to pass a user's text through
    `terminal_safe` still cannot let a file name set the window title, clear the screen or colour
    the text. (A newline inside a name is a line break to this writer: lines that hold users' text
    go through `terminal_safe` too, which escapes it.) `control` writes a sequence the command
    itself means, such as `status --watch`'s redraw.
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        safe = text if text.isprintable() else "\n".join(terminal_safe(part) for part in text.split("\n"))
        self.raw.write(safe)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def control(self, sequence: str) -> None:
        """Write a terminal control sequence the program itself means (never a user's text)."""
        self.raw.write(sequence)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, …
        return getattr(self.raw, name)


@contextlib.contextmanager
def terminal_writers() -> Iterator[None]:
    """For a command's run: sys.stdout and sys.stderr as TerminalWriters (the log pipeline writes its own)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TerminalWriter(sys.stdout), TerminalWriter(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to this process's stderr or stdout (a FileHandler is not one)."""
    if getattr(handler, "_i2v_daemon", False) or isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__, *_console_streams)
    consoles += tuple(s.raw for s in consoles if isinstance(s, TerminalWriter))
    return isinstance(handler, logging.StreamHandler) and any(stream is s for s in consoles if s is not None)


class _AdoptedLogger(logging.Logger):
    """A logger that may not print to the console itself: its records go to the root handler instead.

    huggingface_hub, transformers, diffusers and torch each add a bare StreamHandler(stderr) to
    their loggers at import (the last three also turn propagation off). Here such a handler is
    refused, and a logger that tried propagates to the root with its level left to ours, so each
    line is written once, by the one pipeline, at the daemon's `log_level`.
    """

    _refused_console = False
    _wants_propagate = True

    def addHandler(self, hdlr: logging.Handler) -> None:
        if _is_console(hdlr):
            self._refused_console = True
            super().setLevel(logging.NOTSET)  # through setLevel: it also clears the loggers' level caches
            return
        super().addHandler(hdlr)

    def setLevel(self, level: int | str) -> None:
        # A library's own verbosity call (diffusers' set_verbosity_error, its import-time WARNING)
        # would hide what log_level = "debug" asks for, or show what "error" hides.
        if not self._refused_console:
            super().setLevel(level)

    @property  # type: ignore[override]
    def propagate(self) -> bool:  # type: ignore[override]
        return self._refused_console or self._wants_propagate

    @propagate.setter
    def propagate(self, value: bool) -> None:
        self._wants_propagate = bool(value)


def _adopt_existing_loggers() -> None:
    """Take the console handlers off loggers made before `configure` (a library imported first)."""
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue  # a PlaceHolder: becomes an _AdoptedLogger when created
        if type(logger) is logging.Logger:  # so that it refuses the handlers a library adds later too
            wanted = logger.__dict__.pop("propagate", True)
            logger.__class__ = _AdoptedLogger  # adds no slots, so the instance can switch class
            logger.propagate = wanted
        consoles = [h for h in logger.handlers if _is_console(h)]
        for h in consoles:
            logger.removeHandler(h)
        if consoles:
            if isinstance(logger, _AdoptedLogger):
                logger._refused_console = True
            else:  # a library's own Logger subclass: it keeps its class, and propagates from now on
                logger.propagate = True
            logging.Logger.setLevel(logger, logging.NOTSET)


# ---- records from the standard library (libraries, warnings) --------------------------------------


#: Library warnings nobody running the daemon can act on, logged as the library's chatter (debug): a
#: notice that a class we chose is deprecated upstream, or that a library uses the backend it has
#: instead of one we do not need (torchvision), or diffusers' note on a cast with no module to keep in
#: float32 (an empty list: nothing to act on; the meta-device plans cast every component).
CHATTER = re.compile(
    r"\bdeprecated\b|\bdeprecation\b|will be removed in|requires torchvision \(not installed\); falling back"
    r"|that should be kept in float32: \[\]",
    re.IGNORECASE,
)
#: Python warning categories that are the same kind of notice.
CHATTER_CATEGORIES = frozenset({"DeprecationWarning", "PendingDeprecationWarning", "FutureWarning"})


def _is_chatter(record: logging.LogRecord) -> bool:
    """A library's warning that is only a notice for its own developers (deprecations, a fallback it is fine with)."""
    if record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + "."):
        return False
    if getattr(record, "i2v_category", None) in CHATTER_CATEGORIES:
        return True
    try:
        return bool(CHATTER.search(record.getMessage()))
    except (TypeError, ValueError):  # a malformed %-format: not ours to judge
        return False


def _library_fields(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Processor for stdlib records: a library's warning is a warning, its info and its chatter are debug noise."""
    record: logging.LogRecord = event_dict["_record"]
    own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
    if own or (record.levelno >= logging.WARNING and not _is_chatter(record)):
        name = logging.getLevelName(record.levelno).lower()
        event_dict["level"] = {"warn": "warning", "fatal": "critical"}.get(name, name)
    else:
        event_dict["level"] = "debug"
    if not own:
        event_dict["logger"] = record.name
    for key in ("category", "source"):  # what _showwarning attached
        if hasattr(record, f"i2v_{key}"):
            event_dict[key] = getattr(record, f"i2v_{key}")
    return event_dict


class _Threshold(logging.Filter):
    """Lets our own records through (structlog filtered them already) and library ones at `threshold` up."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "_logger") or record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + "."):
            return True
        if record.levelno < logging.ERROR and _is_chatter(record):
            return self.threshold <= logging.INFO  # as a library's info: shown only at log_level = "debug"
        return record.levelno >= self.threshold


_original_showwarning = warnings.showwarning


def _showwarning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int,
    file: TextIO | None = None, line: str | None = None,
) -> None:
    """`warnings.warn` as one `py.warnings` record (what logging.captureWarnings does, with fields)."""
    if file is not None:  # someone asked for a particular file: not ours to redirect
        _original_showwarning(message, category, filename, lineno, file, line)
        return
    logging.getLogger("py.warnings").warning(
        str(message), extra={"i2v_category": category.__name__, "i2v_source": f"{filename}:{lineno}"},
    )


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """An uncaught exception as one critical line, not a bare traceback between JSON lines."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    get_logger().critical("uncaught_exception", exc_info=(exc_type, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    thread = args.thread.name if args.thread else None
    get_logger(thread=thread).critical(
        "uncaught_exception", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


# ---- set-up -------------------------------------------------------------------------------------


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a real file
        return False


def _quiet_progress_bars() -> None:
    """No tqdm bars when stderr is not a terminal: in the journal they are screens of noise."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub at import
    # Already imported: tell them directly (importing them here would cost seconds of torch).
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            module.disable_progress_bar()


def _terminal_safe_values(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Console lines: control characters in string values (a file name with ESC or a newline) as escapes."""

    for key, value in event.items():
        if isinstance(value, str) and key != "exception" and not value.isprintable():
            event[key] = terminal_safe(value)
    return event


def configure(level: str = "info", fmt: str = "auto", stream: Any = None, syslog_prefix: bool | None = None) -> None:
    """Set up the one logging pipeline: `fmt` is auto (console on a TTY), console or json.

    `syslog_prefix` (default: when stderr is the journal) starts each line with its priority.
    May be called again (tests do); the last call wins.
    """
    if syslog_prefix is None:
        syslog_prefix = stream is None and journal_stream()
    stream = stream or sys.stderr
    if isinstance(stream, TerminalWriter):  # the pipeline escapes its values itself, and colours are its own
        stream = stream.raw
    tty = _isatty(stream)
    if fmt == "auto":
        fmt = "console" if tty else "json"
    renderer: Any
    # format_exc_info turns a traceback into one JSON string; the console renderer prints it itself.
    final: list[Any] = []
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=tty and not syslog_prefix)
        final.append(_terminal_safe_values)  # names from the inbox must not drive the terminal
    else:
        renderer = structlog.processors.JSONRenderer()
        final.append(structlog.processors.format_exc_info)
    if syslog_prefix:
        renderer = SyslogPrefixRenderer(renderer)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    # Libraries: their warnings always, their info (as debug) only when log_level = "debug", their own
    # debug never: torch's compiler and httpcore would bury the daemon's lines (and slow it down).
    threshold = logging.INFO if level == "debug" else max(logging.WARNING, _LEVELS[level])
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, _library_fields, timestamper],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler._i2v_daemon = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter)
    handler.addFilter(_Threshold(threshold))

    _console_streams[:] = [stream]
    logging.setLoggerClass(_AdoptedLogger)
    _adopt_existing_loggers()
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_i2v_daemon", False) or _is_console(old):  # ours from before, or basicConfig's
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    own = logging.getLogger(OWN_LOGGER)
    own.setLevel(_LEVELS[level])  # structlog's filter decides; this only must not stop what it let pass
    own.propagate = True

    warnings.showwarning = _showwarning
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    if not tty:
        _quiet_progress_bars()


def get_logger(**bind: Any) -> Any:
    """Our structlog logger with `bind` as its context; resolved at each call, so it follows `configure`."""
    # Lazy: a module-level `log = get_logger()` made before configure() still ends in the one pipeline.
    return structlog.get_logger(OWN_LOGGER, **bind)


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
