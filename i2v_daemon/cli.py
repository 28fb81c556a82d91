"""`i2v-daemon`: argument parsing and printing. Exit 0 done, 1 failed/not found, 2 usage, 78 config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from i2v_daemon import __version__, cli_ops
from i2v_daemon.errors import ConfigError, InputError
from i2v_daemon.jobs import Job, JobStatus
from i2v_daemon.views import iso as _iso
from i2v_daemon.views import job_detail, job_summary

EX_OK, EX_FAILED, EX_USAGE, EX_CONFIG = 0, 1, 2, 78


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE", help="TOML config file (else $I2V_CONFIG, else /etc/i2v-daemon/config.toml)"
    )
    common.add_argument("--data-dir", metavar="DIR", help="data folder (inbox/, output/, failed/, jobs.db)")
    common.add_argument("--database-url", metavar="URL", help="SQLAlchemy URL of the job database")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    common.add_argument("--log-format", choices=["auto", "console", "json"])

    p = argparse.ArgumentParser(
        prog="i2v-daemon", description="Turn images and prompts dropped in a folder into videos."
    )
    p.add_argument("--version", action="version", version=f"i2v-daemon {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="the daemon")
    run.add_argument(
        "--once", action="store_true", help="take what is in the inbox now, process every queued job, exit"
    )
    run.add_argument("--model", help="Hugging Face repo id or local diffusers folder")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"])

    st = sub.add_parser("status", parents=[common], help="counts by status and the newest jobs")
    st.add_argument("--json", action="store_true")
    st.add_argument("--limit", type=int, default=20, metavar="N")

    show = sub.add_parser("show", parents=[common], help="one job in full, with its attempts")
    show.add_argument("job_id", type=int, metavar="JOB_ID")
    show.add_argument("--json", action="store_true")

    retry = sub.add_parser("retry", parents=[common], help="requeue a failed or canceled job")
    retry.add_argument("job_id", type=int, metavar="JOB_ID")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id", type=int, metavar="JOB_ID")

    val = sub.add_parser("validate", parents=[common], help="check sidecars and images without queueing them")
    val.add_argument("paths", nargs="+", metavar="PATH")

    sub.add_parser(
        "migrate", parents=[common], help="create or upgrade the job database's schema (run also does it at start)"
    )
    cli_ops.add_commands(sub, common)  # doctor, pause, resume, retention
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"i2v-daemon: {err}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _settings(args: argparse.Namespace) -> Any:
    from i2v_daemon.settings import load_settings

    flags = {
        "data_dir": args.data_dir, "database_url": args.database_url, "log_level": args.log_level,
        "log_format": args.log_format, "model": getattr(args, "model", None),
        "device": getattr(args, "device", None), "dtype": getattr(args, "dtype", None),
    }
    return load_settings(args.config, **flags)


def _dispatch(args: argparse.Namespace) -> int:
    from i2v_daemon import logs

    settings = _settings(args)
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "run":
        from i2v_daemon.daemon import Daemon

        daemon = Daemon(settings)
        daemon.install_signal_handlers()
        return daemon.run_once() if args.once else daemon.run_forever()
    if args.command == "validate":
        return _validate(settings, args.paths)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command in cli_ops.COMMANDS:
        return cli_ops.dispatch(args, settings)
    from i2v_daemon.daemon import open_store

    store = open_store(settings)
    if args.command == "status":
        return _status(store, args.limit, args.json)
    job = store.get(args.job_id)
    if job is None:
        print(f"i2v-daemon: no job {args.job_id}", file=sys.stderr)
        return EX_FAILED
    if args.command == "show":
        print(json.dumps(job_detail(job), indent=2, ensure_ascii=False) if args.json else _show_text(job))
        return EX_OK
    if args.command == "retry":
        return _retry(store, job)
    return _cancel(settings, store, job)


def _migrate(settings: Any) -> int:
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


def _status(store: Any, limit: int, as_json: bool) -> int:
    counts = store.counts()
    jobs = store.list_jobs(max(0, limit))
    if as_json:
        # Exactly INTERFACE.md's two keys; `doctor --json` and the metrics say whether it is paused.
        print(json.dumps({"counts": counts, "jobs": [job_summary(j) for j in jobs]}, ensure_ascii=False))
        return EX_OK
    print("  ".join(f"{k} {v}" for k, v in counts.items()))
    pause = store.pause_state()
    if pause["paused"]:
        since = f"{pause['since']:%Y-%m-%d %H:%M:%S} UTC" if pause["since"] else "?"
        print(f"paused since {since} by {pause['by'] or '?'}: no new job starts (`i2v-daemon resume`)")
    if jobs:
        print(
            f"{'ID':>6}  {'STATUS':9}  {'PROGRESS':>8}  {'TRIES':>5}  {'SIZE':>13}  {'CREATED':20}  "
            f"{'HOST/DEVICE':20}  NAME / RESULT"
        )
    for j in jobs:
        size = f"{j.width}x{j.height}x{j.num_frames}" if j.width else "-"
        result = j.output or ((j.error or {}).get("message") if j.status is not JobStatus.SUCCEEDED else "") or ""
        created = _iso(j.created_at)[:19].replace("T", " ") if j.created_at else ""
        where = "/".join(x for x in (j.host, j.device) if x) or "-"  # the host and GPU that ran it last
        print(
            f"{j.id:>6}  {j.status.value:9}  {j.progress * 100:7.0f}%  {j.attempts:>5}  {size:>13}  {created:20}  "
            f"{where:20}  {j.name}{'  ' + result if result else ''}"
        )
    return EX_OK


def _show_text(job: Job) -> str:
    d = job_detail(job)
    lines = [f"job {job.id}: {job.name} ({job.status.value})"]
    for key in ("inputs", "prompt", "negative_prompt", "requested", "effective", "output", "folder", "created_at",
                "started_at", "finished_at", "attempts", "max_attempts", "host", "device", "model"):
        value = d.get(key)
        if value not in (None, "", [], {}):
            lines.append(f"  {key}: {json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value}")
    if job.status is JobStatus.RUNNING:
        lines.append(f"  progress: step {job.step} of {job.total_steps}")
    if job.error:
        lines.append(f"  error: [{job.error.get('type')}] {job.error.get('message')}")
    for t in job.tries:
        lines.append(
            f"  try {t.get('try')}: {t.get('width')}x{t.get('height')} savers={t.get('savers')} "
            f"{t.get('outcome')} in {t.get('seconds')} s"
            + (f" peak {t['peak_vram_bytes'] / 2**30:.2f} GiB" if t.get("peak_vram_bytes") else "")
            + (f" — {t['error']}" if t.get("error") else "")
        )
    return "\n".join(lines)


# ---- commands that change a job -------------------------------------------------------------


def _retry(store: Any, job: Job) -> int:
    if job.rejection:
        print(
            f"i2v-daemon: job {job.id} was rejected for its input ({job.rejection['message']}); "
            "fix the files and drop them in the inbox again", file=sys.stderr,
        )
        return EX_FAILED
    if not store.retry(job.id):
        print(f"i2v-daemon: job {job.id} is {job.status.value}; only failed or canceled jobs can be retried",
              file=sys.stderr)
        return EX_FAILED
    print(f"job {job.id} queued again; its files come back from {job.final_dir} when a worker takes it")
    return EX_OK


def _cancel(settings: Any, store: Any, job: Job) -> int:
    if job.status.is_terminal:
        print(f"i2v-daemon: job {job.id} is already {job.status.value}; nothing to cancel", file=sys.stderr)
        return EX_FAILED
    store.request_cancel(job.id)
    if job.status is JobStatus.QUEUED:
        from i2v_daemon.worker import Worker, make_worker_id

        dest = Worker(settings, store, worker_id=make_worker_id("cli")).cancel_queued(job.id)
        if dest is not None:
            print(f"job {job.id} canceled; its files are in {dest}")
            return EX_OK
    print(f"job {job.id} is running; cancel requested, it stops at its next step")
    return EX_OK


def _validate(settings: Any, paths: list[str]) -> int:
    from i2v_daemon.choices import check_choices
    from i2v_daemon.images import IMAGE_SUFFIXES, inspect_image
    from i2v_daemon.sidecar import SIDECAR_SUFFIXES, parse_sidecar

    bad = 0
    presets = settings.all_presets()
    for raw in paths:
        path = Path(raw)
        suffix = path.suffix.lower()
        try:
            if suffix in SIDECAR_SUFFIXES:
                side = parse_sidecar(path, max_bytes=settings.max_sidecar_bytes)
                preset = side.values.get("preset")
                if preset is not None and preset not in presets:
                    raise InputError(f"{path.name}: unknown preset {preset!r}; use one of {', '.join(sorted(presets))}")
                check_choices(side.values, settings, path.name)  # model allowed, LoRA file present
                notes = side.notes
            elif suffix in IMAGE_SUFFIXES:
                info = inspect_image(path, max_pixels=settings.max_image_pixels)
                notes = (f"{info.format} {info.width}x{info.height}", *info.notes)
            else:
                raise InputError(f"{path.name}: not an image (.png .jpg .jpeg .webp) or a sidecar (.txt .json .toml)")
        except InputError as err:
            bad += 1
            print(f"invalid {raw}: {err}")
            continue
        print(f"ok {raw}" + (f" ({'; '.join(notes)})" if notes else ""))
    return EX_FAILED if bad else EX_OK


if __name__ == "__main__":
    sys.exit(main())
