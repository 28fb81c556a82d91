"""The long-running daemon as systemd runs it: a real process, real files, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SUBPROCESS_ENV, Env, make_image, wait_for

pytestmark = pytest.mark.slow


def start_daemon(env: Env, *extra: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, **SUBPROCESS_ENV, **(extra_env or {})}
    full_env.pop("I2V_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "i2v_daemon.cli", "run", "--config", str(env.config), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
    )


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"daemon did not stop after {sig}: {err[-2000:]}") from None
    return proc.returncode, err


def log_events(stderr: str) -> list[dict]:
    events = []
    for line in stderr.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def test_the_running_daemon_picks_up_files_dropped_while_it_runs_and_exits_0_on_sigterm(env: Env):
    proc = start_daemon(env)
    try:
        time.sleep(1.0)
        # The safe way: write under a dot-name, then rename into place.
        tmp = make_image(env.inbox / ".cat.png")
        (env.inbox / ".cat.txt").write_text("a cat turns its head")
        os.rename(env.inbox / ".cat.txt", env.inbox / "cat.txt")
        os.rename(tmp, env.inbox / "cat.png")
        wait_for(lambda: (env.output / "cat" / "cat.mp4").exists(), what="output/cat/cat.mp4")
        # A second drop while it runs: no restart needed.
        make_image(env.inbox / ".dog.png").rename(env.inbox / "dog.png")
        (env.inbox / "dog.json").write_text(json.dumps({"prompt": "a dog", "priority": 3}))
        wait_for(lambda: (env.output / "dog" / "dog.mp4").exists(), what="output/dog/dog.mp4")
    finally:
        code, err = stop(proc)
    assert code == 0, err[-3000:]
    events = [e.get("event") for e in log_events(err)]
    assert "ready" in events and "stopped" in events
    counts = env.status()["counts"]
    assert counts["succeeded"] == 2 and counts["running"] == 0


def test_a_model_that_cannot_be_found_is_a_configuration_error_with_exit_78(env: Env, tmp_path: Path):
    proc = start_daemon(env, "--model", str(tmp_path / "no-such-model"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 78, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("i2v-daemon: model:") and "no-such-model" in last


def test_cancel_stops_a_running_job_at_its_next_step_and_the_daemon_keeps_serving(env: Env):
    from i2v_daemon.queue.jobs import JobStatus
    from i2v_daemon.queue.store import Store

    proc = start_daemon(env)
    try:
        make_image(env.inbox / ".long.png").rename(env.inbox / "long.png")
        (env.inbox / "long.json").write_text(json.dumps({"prompt": "long", "steps": 1000}))
        store = Store(f"sqlite:///{env.data / 'jobs.db'}")
        store.create_schema()

        def running():
            jobs = [j for j in store.list_jobs(5) if j.status is JobStatus.RUNNING and j.step >= 2]
            return jobs[0] if jobs else None

        job = wait_for(running, what="the long job to be running")
        out = env.cli("cancel", str(job.id), check=True).stdout
        assert "cancel requested" in out
        wait_for(lambda: (env.failed / "long" / "job.json").exists(), what="failed/long/job.json")
        manifest = json.loads((env.failed / "long" / "job.json").read_text())
        assert manifest["status"] == "canceled" and manifest["error"]["type"] == "canceled"
        assert store.get(job.id).step < 1000  # stopped early, at a step boundary
        # Still serving: the next drop runs.
        make_image(env.inbox / ".next.png").rename(env.inbox / "next.png")
        wait_for(lambda: (env.output / "next" / "next.mp4").exists(), what="output/next/next.mp4")
        store.close()
    finally:
        code, err = stop(proc)
    assert code == 0, err[-3000:]
