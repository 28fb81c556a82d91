"""`i2v-daemon`: argument parsing and printing. Exit 0 done, 1 failed/not found, 2 usage, 75 not yet, 78 config.

The commands that only read or ask (`status`, `show`, `cancel`, `retry`, `pause`, `resume`) find
the database with `locate` and import nothing else of weight (no pydantic, no logging stack, no
torch), never create or migrate a database, and answer in about the time SQLAlchemy takes to import.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from i2v_daemon import __version__
from i2v_daemon.cli import operator as cli_ops
from i2v_daemon.errors import ConfigError, DatabaseGone, NotReady
from i2v_daemon.logs import terminal_json, terminal_safe, terminal_writers
from i2v_daemon.queue.jobs import MAX_JOB_ID

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store
    from i2v_daemon.settings import Settings

EX_OK, EX_FAILED, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 2, 75, 78
#: Commands that need only the job database (the fast path).
LIGHT = frozenset({"status", "show", "cancel", "retry", "pause", "resume"})


def _within(kind: type, low: float, high: float, what: str, unit: str = "") -> Any:
    """An argparse type: a number of `kind` in [low, high], or a usage error saying what to use."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {low} to {high}{unit}")
        return value

    return parse


_job_id = _within(int, 1, MAX_JOB_ID, "a job id (a whole number such as 42)")
_limit = _within(int, 0, 1_000_000, "a whole number")
_seconds = _within(float, 0.1, 3600.0, "a number of seconds", " seconds")


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, told the terminal's width up front (it would import shutil to ask, every run)."""

    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ.get("COLUMNS") or os.get_terminal_size(2).columns)
        except (OSError, ValueError):
            width = 80
        super().__init__(prog, width=max(40, width - 2))


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE", help="TOML config file (else $I2V_CONFIG, else /etc/i2v-daemon/config.toml)"
    )
    common.add_argument("--data-dir", metavar="DIR", help="data folder (inbox/, output/, failed/, jobs.db)")
    common.add_argument("--database-url", metavar="URL", help="SQLAlchemy URL of the job database")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="how much the daemon's own log says (default log_level, info)")
    common.add_argument("--log-format", choices=["auto", "console", "json"],
                        help="log lines for a person or JSON lines (default: auto, console on a terminal)")

    p = _Parser(prog="i2v-daemon", description="Turn images and prompts dropped in a folder into videos.")
    p.add_argument("--version", action="version", version=f"i2v-daemon {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", parents=[common], help="the daemon")
    run.add_argument(
        "--once", action="store_true", help="take what is in the inbox now, process every queued job, exit"
    )
    run.add_argument("--model", help="Hugging Face repo id or local diffusers folder")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"],
                     help="the weights' precision (auto: the family's half precision on a GPU, float32 on the CPU)")

    st = sub.add_parser("status", parents=[common], help="counts by status and the newest jobs")
    st.add_argument("--json", action="store_true", help="one JSON object: counts and jobs (INTERFACE.md §4)")
    st.add_argument("--limit", type=_limit, default=20, metavar="N", help="show the newest N jobs (default 20)")
    st.add_argument("--watch", action="store_true", help="redraw every --interval seconds until interrupted")
    st.add_argument("--interval", type=_seconds, default=2.0, metavar="S",
                    help="seconds between two redraws of --watch (default 2)")

    show = sub.add_parser("show", parents=[common], help="one job in full, with its attempts")
    show.add_argument("job_id", type=_job_id, metavar="JOB_ID", help="the job's id, as status shows it")
    show.add_argument("--json", action="store_true", help="one JSON object, everything status --json has and more")

    retry = sub.add_parser("retry", parents=[common], help="requeue a failed or canceled job")
    retry.add_argument("job_id", type=_job_id, metavar="JOB_ID", help="the failed or canceled job's id")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id", type=_job_id, metavar="JOB_ID", help="the queued or running job's id")

    val = sub.add_parser("validate", parents=[common], help="check sidecars and images without queueing them")
    val.add_argument("paths", nargs="+", metavar="PATH",
                     help="images, sidecars, batch manifests, or a folder (the files directly in it)")

    sub.add_parser(
        "migrate", parents=[common], help="create or upgrade the job database's schema (run also does it at start)"
    )
    srv = sub.add_parser("serve", parents=[common], help="the HTTP API and web page (no GPU; beside `run`)")
    srv.add_argument("--listen", metavar="ADDR", help="host:port to listen on (default api_listen, 127.0.0.1:8765)")
    cli_ops.add_commands(sub, common)  # doctor, pause, resume, retention
    from i2v_daemon.cli import inspect as cli_inspect

    cli_inspect.add_command(sub, common)
    from i2v_daemon.cli import plan as cli_plan

    cli_plan.add_command(sub, common)
    from i2v_daemon.cli import demo

    demo.add_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: every command writes through `TerminalWriter`s, so no user's text drives the terminal."""
    with terminal_writers():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"i2v-daemon: {err}", file=sys.stderr)
        return EX_CONFIG
    except NotReady as err:  # a command that does not wait (`run --once`, `migrate`) met a dependency not there yet
        print(f"i2v-daemon: {err.what} is not there yet ({err.cause}); try again later (`run` and `serve` "
              "wait for it)", file=sys.stderr)
        return EX_TEMPFAIL
    except DatabaseGone as err:
        print(f"i2v-daemon: {err}", file=sys.stderr)
        return EX_FAILED
    except KeyboardInterrupt:
        return 130 if args.command != "status" else EX_OK
    except BrokenPipeError:
        # `status | head`: the reader left. Point stdout at /dev/null so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK
    except Exception as err:
        from sqlalchemy.exc import OperationalError

        if isinstance(err, OperationalError) and "locked" in str(err):
            print("i2v-daemon: the job database stayed locked by another process for 10 s; try again "
                  "(a daemon in the middle of a large intake pass holds it only briefly)", file=sys.stderr)
            return EX_FAILED
        raise


def _settings(args: argparse.Namespace) -> Any:
    from i2v_daemon.settings import load_settings

    flags = {
        "data_dir": args.data_dir, "database_url": args.database_url, "log_level": args.log_level,
        "log_format": args.log_format, "model": getattr(args, "model", None),
        "device": getattr(args, "device", None), "dtype": getattr(args, "dtype", None),
    }
    return load_settings(args.config, **flags)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in LIGHT:
        return _light(args)
    if args.command == "demo":  # its own settings: never the user's config file, variables or data folder
        from i2v_daemon.cli import demo

        return demo.run(args)
    from i2v_daemon import logs

    settings = _settings(args)
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "run":
        from i2v_daemon.daemon import start

        return start(settings, once=args.once)
    if args.command == "serve":
        from i2v_daemon.api import serve

        return serve(settings, args.listen)
    if args.command == "validate":
        from i2v_daemon.intake.validate import validate

        return validate(settings, args.paths)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "inspect":
        from i2v_daemon.cli import inspect as cli_inspect

        return cli_inspect.run(args, settings)
    if args.command == "plan":
        from i2v_daemon.cli import plan as cli_plan

        return cli_plan.run(args, settings)
    return cli_ops.dispatch(args, settings)


def _light(args: argparse.Namespace) -> int:
    """The commands that need only the job database: no settings model, no logging stack."""
    from i2v_daemon.locate import check_once, locate
    from i2v_daemon.queue.store import open_existing

    flags = {"data_dir": args.data_dir, "database_url": args.database_url}
    check_once(args.config, flags, lambda: _settings(args))  # a bad config is exit 78 here too, checked once
    where = locate(args.config, data_dir=args.data_dir, database_url=args.database_url)
    store = open_existing(where.database_url)
    try:
        if args.command == "status":
            return _status(store, args.limit, args.json, watch=args.watch, interval=args.interval)
        if args.command in ("pause", "resume"):
            return cli_ops.pause(store, paused=args.command == "pause")
        return _job_command(store, args)
    finally:
        store.close()


def _job_command(store: Store, args: argparse.Namespace) -> int:
    from i2v_daemon.views import asks as ops

    if args.command == "show":
        from i2v_daemon.views.jobs import describe

        job = store.get(args.job_id)
        if job is None:
            print(f"i2v-daemon: no job {args.job_id}", file=sys.stderr)
            return EX_FAILED
        detail = describe(store, job)
        print(terminal_json(detail, indent=2) if args.json else _show_text(detail))
        return EX_OK
    outcome = ops.cancel(store, args.job_id) if args.command == "cancel" else ops.retry(store, args.job_id)
    if not outcome.ok:
        print(terminal_safe(f"i2v-daemon: {outcome.message}"), file=sys.stderr)
        return EX_FAILED
    print(terminal_safe(outcome.message))
    return EX_OK


def _migrate(settings: Settings) -> int:
    from i2v_daemon.daemon import open_and_upgrade

    store, up = open_and_upgrade(settings)
    url = store.engine.url.render_as_string(hide_password=True)
    store.close()
    if up.stamped:
        how = f"a database from before migrations, stamped {up.before} and upgraded"
    elif up.before != up.after:
        how = f"upgraded from {up.before or 'an empty database'}"
    else:
        how = "already up to date"
    print(f"{url}: schema revision {up.after} ({how})")
    return EX_OK


# ---- status ---------------------------------------------------------------------------------


def _status(store: Store, limit: int, as_json: bool, *, watch: bool = False, interval: float = 2.0) -> int:
    from i2v_daemon.views.status import render_status, status_document

    if not watch:
        if as_json:
            # Exactly INTERFACE.md's two keys; `doctor --json` and the metrics say whether it is paused.
            print(terminal_json(status_document(store, limit)))
        else:
            print(render_status(store, limit, width=_columns()))
        return EX_OK
    tty = sys.stdout.isatty() and not as_json
    import signal

    # Ctrl-C ends a watch at once, wherever it is (even blocked writing to a terminal nobody reads):
    # it only reads, so nothing is left to finish, and an orderly exit could wait on flushing its output.
    signal.signal(signal.SIGINT, lambda _signum, _frame: os._exit(EX_OK))
    while True:  # until Ctrl-C (exit 0)
        if as_json:
            print(terminal_json(status_document(store, limit)), flush=True)
        elif tty:
            getattr(sys.stdout, "control", sys.stdout.write)("\033[H\033[2J")  # home, clear: ours, not a user's
            sys.stdout.write(render_status(store, limit, width=_columns()) + "\n")
            sys.stdout.flush()
        else:
            print(render_status(store, limit, width=_columns()) + "\n", flush=True)
        time.sleep(interval)


def _columns() -> int | None:
    """How wide `status` may print on a terminal: $COLUMNS, else its width. None into a pipe or a file: every column."""
    try:
        if not sys.stdout.isatty():
            return None
        if (os.environ.get("COLUMNS") or "").isdigit():
            return max(40, int(os.environ["COLUMNS"]))
        return os.get_terminal_size(sys.stdout.fileno()).columns or None
    except (OSError, ValueError):
        return None


def _show_text(d: dict[str, Any]) -> str:
    import json

    lines = [f"job {d['id']}: {d['name']} ({d['status']})"]
    for key in ("inputs", "source", "prompt", "negative_prompt", "requested", "effective", "output", "job_dir",
                "created_at", "started_at", "finished_at", "attempts", "max_attempts", "host", "device", "model"):
        value = d.get(key)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}  # the JSON form keeps the nulls
        if value not in (None, "", [], {}):
            lines.append(f"  {key}: {json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value}")
    if d["status"] == "running" and d.get("lease_expired_seconds") is not None:
        from i2v_daemon.views.status import gone_text

        lines.append(f"  progress: {gone_text(d)}")
    elif d["status"] == "running":
        from i2v_daemon.views.status import phase_text

        eta = f", about {_duration(d['eta_seconds'])} left" if d.get("eta_seconds") is not None else ""
        elapsed = f" ({_duration(d['elapsed_seconds'])} in)" if d.get("elapsed_seconds") is not None else ""
        lines.append(f"  progress: {phase_text(d)}{elapsed}{eta}")
    if d.get("position"):
        eta = f"; done in about {_duration(d['eta_seconds'])}" if d.get("eta_seconds") is not None else ""
        lines.append(f"  position: {d['position']} in the queue{eta}")
    if d.get("cancel_requested") and d["status"] in ("queued", "running"):
        lines.append("  cancel requested: a daemon stops it shortly")
    err = d.get("error_detail")
    if err:
        lines.append(f"  {'error' if d['status'] != 'queued' else 'waiting'}: [{err.get('type')}] {err.get('message')}")
    for note in d.get("notes") or ():
        lines.append(f"  note: {note}")
    for n in d.get("notifications") or ():
        why = f" — {n['last_error']}" if n.get("last_error") and n["state"] != "delivered" else ""
        lines.append(f"  {n['kind']} {n['target']}: {n['state']} after {n['tries']} tries{why}")
    for t in d.get("attempts_detail") or ():
        lines.append(
            f"  try {t.get('try')}: {t.get('width')}x{t.get('height')} savers={t.get('savers')} "
            f"{t.get('outcome')} in {t.get('seconds')} s"
            + (f" peak {t['peak_vram_bytes'] / 2**30:.2f} GiB" if t.get("peak_vram_bytes") else "")
            + (f" — {t['error']}" if t.get("error") else "")
        )
    return "\n".join(terminal_safe(line) for line in lines)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


if __name__ == "__main__":
    sys.exit(main())
