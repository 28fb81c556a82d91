"""The operator's commands: `doctor`, `pause`, `resume`, `retention`. Parsing and printing only.

Kept apart from cli.py so that file stays the users' commands; cli.py registers these and hands
them over before it opens the database (doctor must work when the database does not).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from i2v_daemon.logs import terminal_json, terminal_safe

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store
    from i2v_daemon.settings import Settings

EX_OK, EX_FAILED = 0, 1
COMMANDS = frozenset({"doctor", "retention"})  # pause and resume take cli.py's fast path


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    doc = sub.add_parser("doctor", parents=[common], help="check the GPU, ffmpeg, folders, database and model")
    doc.add_argument("--json", action="store_true", help="one JSON object: ok and every check")
    doc.add_argument("--min-free-gib", type=float, default=5.0, metavar="GIB",
                     help="warn when a folder's disk has less free space (default 5)")
    sub.add_parser("pause", parents=[common], help="stop taking new jobs (running ones finish); the service stays up")
    sub.add_parser("resume", parents=[common], help="take new jobs again after `pause`")
    ret = sub.add_parser("retention", parents=[common],
                         help="show (or, with --now, do) what retention would forget or archive")
    ret.add_argument("--now", action="store_true", help="apply it now instead of showing it")
    ret.add_argument("--days", type=float, metavar="N", help="finished over N days ago (default: retention_days)")
    ret.add_argument("--action", choices=["forget", "archive"], help="default retention_action")
    ret.add_argument("--json", action="store_true", help="one JSON object: what was (or would be) done")


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "doctor":
        return _doctor(settings, args.json, args.min_free_gib)
    from i2v_daemon.queue.store import open_existing

    store = open_existing(settings.filled("database_url"))  # retention never creates or migrates a database
    try:
        return _retention(store, settings, args)
    finally:
        store.close()


def _doctor(settings: Settings, as_json: bool, min_free_gib: float) -> int:
    from i2v_daemon.service.doctor import exit_code, render, run_checks

    checks = run_checks(settings, min_free_gib=min_free_gib)
    if as_json:
        print(terminal_json({"ok": exit_code(checks) == 0, "checks": [c.as_dict() for c in checks]}))
    else:
        print(render(checks))
    return exit_code(checks)


def pause(store: Store, *, paused: bool) -> int:
    """`pause` / `resume`: one row every daemon sharing the database obeys."""
    import getpass
    import socket

    was = store.is_paused()
    store.set_paused(paused, by=f"{getpass.getuser()}@{socket.gethostname()}")
    if paused:
        print("paused: no new job starts; a running job finishes" + (" (it was already paused)" if was else ""))
    else:
        print("resumed: queued jobs start again" + ("" if was else " (it was not paused)"))
    return EX_OK


def _retention(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    from i2v_daemon.service.retention import apply_retention

    days = settings.retention_days if args.days is None else args.days
    action = args.action or settings.retention_action
    if days <= 0:
        print("retention is off (retention_days = 0); pass --days N to run it once")
        return EX_OK
    result = apply_retention(store, settings, days=days, action=action, dry_run=not args.now)
    if args.json:
        print(terminal_json({"applied": args.now, "action": action, "days": days, **result.as_dict()}))
        return EX_OK if not result.skipped else EX_FAILED
    verb = ("archived and forgot" if action == "archive" else "forgot") if args.now else f"would {action}"
    print(f"{verb} {len(result.forgotten)} job(s) finished before {result.as_dict()['cutoff']}")
    for job_id, folder in result.archived:
        print(terminal_safe(f"  job {job_id} → {folder}"))
    for job_id, why in result.skipped:
        print(terminal_safe(f"  job {job_id} kept: {why}"))
    if not args.now and result.forgotten:
        print("run again with --now to do it")
    return EX_OK if not result.skipped else EX_FAILED
