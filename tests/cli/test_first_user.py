"""What a new user tripped on, each driven the way they met it: the real command line, its bytes read back."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from i2v_daemon.params import Params
from i2v_daemon.queue.jobs import JobRequest
from i2v_daemon.queue.store import Store
from tests.conftest import ROOT, SUBPROCESS_ENV, Env

PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=40, guidance_scale=9.0, fps=8)


def cli(data: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")} | SUBPROCESS_ENV | (env or {})
    return subprocess.run([sys.executable, "-m", "i2v_daemon.cli", args[0], "--data-dir", str(data), *args[1:]],
                          capture_output=True, text=True, timeout=120, env=full, cwd=ROOT)


def on_terminal(data: Path, *args: str, columns: int, env: dict[str, str] | None = None) -> str:
    """What the command shows on a terminal `columns` wide (a pseudo-terminal that size; no $COLUMNS unless in env)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("I2V_") and k not in ("COLUMNS", "LINES")}
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "i2v_daemon.cli", args[0], "--data-dir", str(data), *args[1:]],
                            stdout=child, stderr=child, env=full | SUBPROCESS_ENV | (env or {}), cwd=ROOT)
    os.close(child)
    seen = b""
    try:
        while True:
            if select.select([main], [], [], 1.0)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the other end closed: it is done
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(120) == 0, seen
    finally:
        proc.kill()
        proc.wait(60)
        os.close(main)
    return seen.decode().replace("\r\n", "\n")


def new_store(data: Path) -> Store:
    store = Store(f"sqlite:///{data / 'jobs.db'}")
    store.create_schema()
    return store


def test_a_job_whose_worker_was_killed_says_its_lease_ran_out_instead_of_a_step_and_a_growing_eta(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    store = new_store(data)
    past = datetime.now(UTC) - timedelta(seconds=80)
    # Killed with kill -9 at step 4 of 40, 80 s ago: its 60 s lease ran out 20 s ago.
    gone, _ = store.enqueue(JobRequest(name="gone", inputs=("g.png",), intake_key="g", params=PARAMS), now=past)
    store.claim_next("w1", lease_seconds=60, job_id=gone.id, now=past)
    store.update_running(gone.id, "w1", effective={"width": 512, "height": 512, "num_frames": 8})
    store.heartbeat(gone.id, "w1", lease_seconds=60, now=past, phase="denoising", step=4, total_steps=40)
    alive, _ = store.enqueue(JobRequest(name="alive", inputs=("a.png",), intake_key="a", params=PARAMS))
    store.claim_next("w2", lease_seconds=60, job_id=alive.id)
    store.heartbeat(alive.id, "w2", lease_seconds=60, phase="denoising", step=4, total_steps=40)
    store.close()

    gone_said = re.compile(r"worker gone, lease expired (\d+) s ago; it will be taken again")
    lines = cli(data, "status").stdout.splitlines()
    row = next(line for line in lines if line.split()[0] == str(gone.id))
    assert "denoising 4/40" not in row and (said := gone_said.search(row)) and 19 <= int(said[1]) < 300, row
    alive_row = next(line for line in lines if line.split()[0] == str(alive.id))
    assert "denoising 4/40" in alive_row and "worker gone" not in alive_row
    shown = cli(data, "show", str(gone.id)).stdout
    assert re.search(r"progress: " + gone_said.pattern, shown), shown
    detail = json.loads(cli(data, "show", str(gone.id), "--json").stdout)
    assert 19 <= detail["lease_expired_seconds"] < 300 and detail["eta_seconds"] is None
    listed = {j["name"]: j for j in json.loads(cli(data, "status", "--json").stdout)["jobs"]}
    assert 19 <= listed["gone"]["lease_expired_seconds"] < 300
    assert listed["alive"]["lease_expired_seconds"] is None


def test_the_key_folder_means_where_a_job_came_from_on_every_surface_and_job_dir_names_its_folder(
    tmp_path: Path,
) -> None:
    from i2v_daemon.delivery.webhook import job_payload
    from i2v_daemon.queue.jobs import JobStatus
    from i2v_daemon.work.manifest import build

    data = tmp_path / "data"
    store = new_store(data)
    job, _ = store.enqueue(JobRequest(name="cat", inputs=("cat.png",), intake_key="c", params=PARAMS,
                                      source="inbox/fast"))
    store.claim_next("w", lease_seconds=60, job_id=job.id)
    final = data / "output" / "cat"
    store.update_running(job.id, "w", final_dir=str(final))
    store.finish(job.id, "w", JobStatus.SUCCEEDED, output=str(final / "cat.mp4"))
    done = store.get(job.id)
    store.close()
    assert done is not None
    manifest = build(done, JobStatus.SUCCEEDED, finished_at=done.finished_at, error=None, output="cat.mp4",
                     model={"name": "default"}, notes=[])
    assert manifest["folder"] == "inbox/fast"  # the contract (INTERFACE.md §6): where it came from
    surfaces = {
        "status --json": json.loads(cli(data, "status", "--json").stdout)["jobs"][0],
        "show --json": json.loads(cli(data, "show", str(job.id), "--json").stdout),
        "the webhook": job_payload(done),
    }
    for where, entry in surfaces.items():
        assert entry.get("folder", "inbox/fast") == "inbox/fast", where  # never the output folder
        assert entry["job_dir"] == str(final), where
    assert f"job_dir: {final}" in cli(data, "show", str(job.id)).stdout


def test_status_fits_an_80_column_terminal_one_line_a_job(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = new_store(data)
    long_name = "a-rather-long-name-for-a-photo-of-the-beach-at-dawn"
    job, _ = store.enqueue(JobRequest(name=long_name, inputs=("b.png",), intake_key="b", params=PARAMS))
    store.claim_next("gpu-box-1/cuda:0/1234", lease_seconds=60, job_id=job.id, host="gpu-box-1", device="cuda:0")
    store.update_running(job.id, "gpu-box-1/cuda:0/1234", effective={"width": 512, "height": 512, "num_frames": 8})
    store.heartbeat(job.id, "gpu-box-1/cuda:0/1234", lease_seconds=60, phase="denoising", step=12, total_steps=40)
    store.enqueue(JobRequest(name="dog", inputs=("d.png",), intake_key="d", params=PARAMS))
    store.close()

    narrow = on_terminal(data, "status", columns=80).splitlines()
    table = narrow[narrow.index(next(line for line in narrow if line.lstrip().startswith("ID"))):]
    assert len(table) == 3 and all(len(line) <= 80 for line in table), "\n".join(table)
    for column in ("ID", "STATUS", "PHASE", "ETA", "NAME / RESULT"):
        assert column in table[0]
    assert "denoising 12/40" in table[2] and "a-rather-long-name" in table[2]
    assert table[1].split()[:2] == ["2", "queued"]
    # $COLUMNS says it too (as for `ls` and `ps`); into a pipe or a file every column is there, whole.
    assert max(map(len, on_terminal(data, "status", columns=200, env={"COLUMNS": "80"}).splitlines())) <= 80
    whole = cli(data, "status", env={"COLUMNS": "80"}).stdout.splitlines()
    assert "HOST/DEVICE" in whole[1] and any(long_name in line and "gpu-box-1/cuda:0" in line for line in whole)


def test_every_option_and_argument_of_every_command_says_what_it_is_for() -> None:
    import argparse

    from i2v_daemon.cli.main import _parser

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [(name, action.option_strings or action.dest) for name, parser in commands.items()
              for action in parser._actions if not action.help]
    assert silent == []
    text = subprocess.run([sys.executable, "-m", "i2v_daemon.cli", "status", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "COLUMNS": "100"}).stdout
    for flag in ("--json ", "--limit N ", "--interval S "):
        line = next(line for line in text.splitlines() if line.strip().startswith(flag))
        assert len(line.strip()) > len(flag) + 5, line  # the flag, then what it does


def test_a_config_with_a_typo_and_a_bad_value_says_both_in_one_line_with_a_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nstable_second = 2\nmax_attempts = "three"\n'
                      "[presets.fast]\nstepz = 3\n")
    for command in (["status"], ["run", "--once"], ["doctor"]):
        proc = subprocess.run([sys.executable, "-m", "i2v_daemon.cli", *command, "--config", str(config)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={k: v for k, v in os.environ.items() if not k.startswith("I2V_")})
        assert proc.returncode == 78, proc.stderr
        [line] = proc.stderr.splitlines()
        assert "stable_second: unknown setting — did you mean 'stable_seconds'?" in line, line
        assert "presets.fast.stepz: unknown setting — did you mean 'steps'?" in line, line
        assert "max_attempts / I2V_MAX_ATTEMPTS:" in line and "'three'" in line, line


@pytest.mark.slow
def test_a_job_rejected_for_its_input_runs_when_retried_after_the_input_is_fixed_in_place(env: Env, drop) -> None:
    drop("cat", (".json", '{"prompt": "a cat", "stepz": 2}'))
    env.cli("run", "--once", check=True)
    [job] = env.status()["jobs"]
    assert job["status"] == "failed" and "did you mean 'steps'" in job["error"]
    sidecar = env.failed / "cat" / "input" / "cat.json"
    sidecar.write_text('{"prompt": "a cat", "steps": "two"}')  # fixed one mistake, made another
    said = env.cli("retry", str(job["id"]))
    assert said.returncode == 0, said.stderr
    assert "read again" in said.stdout, said.stdout
    env.cli("run", "--once", check=True)
    [again] = env.status()["jobs"]
    assert again["status"] == "failed" and "'steps' must be a whole number" in again["error"], again["error"]
    sidecar = env.failed / "cat" / "input" / "cat.json"
    sidecar.write_text('{"prompt": "a cat", "steps": 2}')  # right this time
    assert env.cli("retry", str(job["id"])).returncode == 0
    env.cli("run", "--once", check=True)
    [done] = env.status()["jobs"]
    assert done["status"] == "succeeded", done
    assert done["output"] == str(env.output / "cat" / "cat.mp4") and not (env.failed / "cat").exists()
    manifest = json.loads((env.output / "cat" / "job.json").read_text())
    assert manifest["requested"]["steps"] == 2 and manifest["prompt"] == "a cat"


def test_a_rejected_row_of_a_batch_manifest_is_not_retried_and_says_what_to_do_instead(tmp_path: Path) -> None:
    from i2v_daemon.queue.jobs import JobStatus

    data = tmp_path / "data"
    store = new_store(data)
    row, _ = store.enqueue(JobRequest(name="owl", inputs=(), intake_key="batch:abc:3", rejection={
        "type": "invalid_input", "message": "shots.csv line 3: unknown key 'stepz'"}))
    store.claim_next("w", lease_seconds=60, job_id=row.id)
    store.finish(row.id, "w", JobStatus.FAILED, error={"type": "invalid_input", "message": "x"})
    store.close()
    said = cli(data, "retry", str(row.id))
    assert said.returncode == 1 and "a row of a batch manifest" in said.stderr, said.stderr
