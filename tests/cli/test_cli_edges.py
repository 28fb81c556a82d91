"""The command line at its edges: out-of-range values, a folder for a config, a locked database, a closed
pipe, and the operator's views (`show` with phase, ETA and notes; `status --watch`). No traceback, ever."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from i2v_daemon.params import Params
from i2v_daemon.queue.jobs import JobRequest, JobStatus
from i2v_daemon.queue.store import Store
from tests.conftest import ROOT, SUBPROCESS_ENV

PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)


def cli(data: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")} | SUBPROCESS_ENV
    return subprocess.run([sys.executable, "-m", "i2v_daemon.cli", args[0], "--data-dir", str(data), *args[1:]],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    store = Store(f"sqlite:///{folder / 'jobs.db'}")
    store.create_schema()
    for i in range(300):
        store.enqueue(JobRequest(name=f"job{i}", inputs=(f"job{i}.png",), intake_key=f"k{i}", params=PARAMS,
                                 notes=("no sidecar arrived within 10 s",) if i == 0 else ()))
    store.close()
    return folder


@pytest.mark.parametrize("args", [
    ["show", str(2**63)], ["cancel", str(2**64)], ["retry", "0"], ["show", "12abc"],
    ["status", "--limit", str(10**20)], ["status", "--limit", "-1"], ["status", "--watch", "--interval", "0"],
])
def test_an_out_of_range_value_is_a_usage_error_saying_what_to_use(data: Path, args: list[str]) -> None:
    proc = cli(data, *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and ("out of range" in proc.stderr or "not a" in proc.stderr
                                               or "between 1 and" in proc.stderr)


def test_a_config_that_is_a_folder_is_a_configuration_error_in_one_line(tmp_path: Path) -> None:
    for command in (["status"], ["run", "--once"], ["doctor"]):
        proc = subprocess.run([sys.executable, "-m", "i2v_daemon.cli", *command, "--config", str(tmp_path)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={k: v for k, v in os.environ.items() if not k.startswith("I2V_")})
        assert proc.returncode == 78, (command, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1] == f"i2v-daemon: config: {tmp_path} is a folder; --config / " \
            "I2V_CONFIG must name a TOML file"


def test_pause_against_a_database_another_process_holds_locked_says_so_and_exits_1(data: Path) -> None:
    holder = sqlite3.connect(data / "jobs.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(30, holder.rollback)
    release.start()
    try:
        proc = cli(data, "pause")
    finally:
        release.cancel()
        holder.rollback()
        holder.close()
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("i2v-daemon: the job database stayed locked by another process for 10 s; try "
                                   "again (a daemon in the middle of a large intake pass holds it only briefly)")


@pytest.mark.parametrize("args", [["status", "--limit", "300"], ["status", "--json", "--limit", "300"],
                                  ["show", "1", "--json"]])
def test_output_piped_into_head_ends_quietly(data: Path, args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")}
    command = [sys.executable, "-m", "i2v_daemon.cli", args[0], "--data-dir", str(data), *args[1:]]
    proc = subprocess.run(" ".join(map(str, command)) + " | head -c 10", shell=True, capture_output=True,
                          text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0 and len(proc.stdout) == 10
    assert proc.stderr == ""  # no BrokenPipeError traceback


def test_show_says_everything_the_manifest_says_and_where_a_queued_job_stands(data: Path) -> None:
    detail = json.loads(cli(data, "show", "2", "--json").stdout)
    assert detail["position"] == 2 and detail["phase"] is None and "eta_seconds" in detail
    first = json.loads(cli(data, "show", "1", "--json").stdout)
    assert first["notes"] == ["no sidecar arrived within 10 s"] and first["position"] == 1
    text = cli(data, "show", "1").stdout
    assert "position: 1 in the queue" in text and "note: no sidecar arrived within 10 s" in text


def test_show_gives_a_running_jobs_phase_step_elapsed_time_and_eta_from_recorded_steps(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    store = Store(f"sqlite:///{folder / 'jobs.db'}")
    store.create_schema()
    past = datetime.now(UTC) - timedelta(minutes=5)
    done, _ = store.enqueue(JobRequest(name="done", inputs=("d.png",), intake_key="d", params=PARAMS), now=past)
    store.claim_next("w", lease_seconds=60, job_id=done.id, now=past)
    # A finished job of the same model took 2 s a step at 512×512×8: 100 s for 50 steps.
    store.update_running(done.id, "w", tries=[{"try": 1, "width": 512, "height": 512, "num_frames": 8, "steps": 50,
                                               "seconds": 100.0, "outcome": "succeeded", "model_name": "default"}])
    store.finish(done.id, "w", JobStatus.SUCCEEDED)
    run, _ = store.enqueue(JobRequest(name="run", inputs=("r.png",), intake_key="r", params=PARAMS))
    store.claim_next("w", lease_seconds=60, job_id=run.id)
    store.update_running(run.id, "w", effective={"width": 512, "height": 512, "num_frames": 8})
    store.heartbeat(run.id, "w", lease_seconds=60, phase="denoising", step=1, total_steps=30)
    time.sleep(1.0)
    store.heartbeat(run.id, "w", lease_seconds=60, step=11, total_steps=30)
    queued, _ = store.enqueue(JobRequest(name="next", inputs=("n.png",), intake_key="n", params=PARAMS))
    store.close()
    shown = json.loads(cli(folder, "show", str(run.id), "--json").stdout)
    assert shown["phase"] == "denoising" and shown["step"] == 11 and shown["total_steps"] == 30
    assert shown["elapsed_seconds"] >= 1.0
    assert 0 < shown["eta_seconds"] < 30  # about 0.1 s a step from its own 10 steps, 19 to go, plus the tail
    text = cli(folder, "show", str(run.id)).stdout
    assert "progress: denoising 11/30" in text and "left" in text
    later = json.loads(cli(folder, "show", str(queued.id), "--json").stdout)
    assert later["position"] == 1 and later["eta_seconds"] is not None  # from the finished job's seconds per step
    status = cli(folder, "status").stdout
    assert "denoising 11/30" in status
    # Paused, no queued job starts: when the next one would is not known (the running one's ETA still is).
    cli(folder, "pause")
    paused = json.loads(cli(folder, "show", str(queued.id), "--json").stdout)
    assert paused["position"] == 1 and paused["eta_seconds"] is None
    assert json.loads(cli(folder, "show", str(run.id), "--json").stdout)["eta_seconds"] is not None
    next_line = next(line for line in cli(folder, "status").stdout.splitlines() if line.rstrip().endswith("next"))
    assert re.search(r"queued\s+0%\s+-\s+-\s", next_line), next_line  # no ETA in its column


def watch_command(data: Path, interval: str = "0.3", limit: str = "2") -> list[str]:
    return [sys.executable, "-m", "i2v_daemon.cli", "status", "--watch", "--interval", interval, "--limit", limit,
            "--data-dir", str(data)]


def watch_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("I2V_") and k != "COLUMNS"}


def read_until(fd: int, done: Any, seconds: float = 60) -> bytes:
    """What the terminal's other end `fd` shows until `done(seen)` (or `seconds` pass)."""
    seen = b""
    deadline = time.monotonic() + seconds
    while not done(seen) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 65536)
    return seen


def test_status_watch_redraws_in_place_on_a_terminal_and_prints_blocks_otherwise(data: Path) -> None:
    piped = subprocess.Popen(watch_command(data), stdout=subprocess.PIPE, text=True, env=watch_env(), cwd=ROOT)
    try:
        assert piped.stdout is not None
        blocks = 0
        while blocks < 2:  # one block per interval, for as long as it runs
            line = piped.stdout.readline()
            assert line, "status --watch stopped printing"
            blocks += line.startswith("queued 300")
            assert "\033[2J" not in line  # not a terminal: no screen clearing
    finally:
        piped.kill()  # a test ends what it starts, whatever happened
        piped.communicate(timeout=60)
    main, child = pty.openpty()
    tty = subprocess.Popen(watch_command(data), stdout=child, stderr=child, env=watch_env(), cwd=ROOT)
    os.close(child)
    try:
        seen = read_until(main, lambda seen: seen.count(b"\033[2J") >= 2)
        tty.send_signal(2)  # Ctrl-C
        assert tty.wait(60) == 0
    finally:
        tty.kill()
        tty.wait(60)
        os.close(main)
    assert seen.count(b"\033[H\033[2J") >= 2 and b"queued 300" in seen


@pytest.mark.slow
def test_run_on_a_terminal_shows_the_running_jobs_phases_and_steps(env, drop) -> None:
    drop("cat", (".json", json.dumps({"prompt": "a cat", "steps": 40})))
    main, child = pty.openpty()
    proc = subprocess.Popen(env.command("run", "--once"), stdout=child, stderr=child, env=env.environ(
        {"I2V_LOG_FORMAT": "console"}), cwd=ROOT)
    os.close(child)
    seen = b""
    while True:
        ready = select.select([main], [], [], 1.0)[0]
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    assert proc.wait(60) == 0
    os.close(main)
    text = re.sub(r"\x1b\[[0-9;]*m", "", seen.decode(errors="replace"))  # without the colours
    assert "phase=loading" in text and "phase=encoding" in text and "phase=publishing" in text
    assert "progress" in text and "step=40/40" in text  # the last step is always shown


def test_a_name_with_terminal_control_codes_reaches_the_terminal_escaped_and_keeps_the_table_whole(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "data"
    store = Store(f"sqlite:///{folder / 'jobs.db'}")
    store.create_schema()
    name = "esc\x1b[2J\x1b]0;pwned\x07x\nsecond line\u202e"
    job, _ = store.enqueue(JobRequest(name=name, inputs=(f"{name}.png",), intake_key="e", params=PARAMS,
                                      prompt="a prompt\x1b[31m in red"))
    store.close()
    status = cli(folder, "status").stdout
    shown = cli(folder, "show", str(job.id)).stdout
    for out in (status, shown):
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
        assert "esc\\x1b[2J\\x1b]0;pwned\\x07x\\x0asecond line\\u202e" in out
    assert len(status.splitlines()) == 3  # counts, header, one row: the newline did not break it
    assert "a prompt\\x1b[31m in red" in shown
    assert json.loads(cli(folder, "show", str(job.id), "--json").stdout)["name"] == name  # JSON: the name itself


def test_a_job_taken_while_it_is_described_is_described_as_it_is_now(tmp_path: Path) -> None:
    from i2v_daemon.views.jobs import describe

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    read_before, _ = store.enqueue(JobRequest(name="quick", inputs=("q.png",), intake_key="q", params=PARAMS))
    store.claim_next("w", lease_seconds=60)  # a worker takes it between the read and the description
    shown = describe(store, read_before)
    assert (shown["status"], shown["position"]) == ("running", None)  # not "queued" with no position
    store.close()
