"""The on_finish hook: its environment, its output, its bounds, and failing without touching anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from i2v_daemon.delivery.hook import TAIL_BYTES, hook_env, run_hook
from i2v_daemon.queue.jobs import JobStatus

#: A hook that writes its whole environment, as JSON, to the file named by its first argument.
DUMP_ENV = [sys.executable, "-c", "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"]


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, waiting for a parent to reap it) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def sh(script: str) -> list[str]:
    """A test hook written in sh (the runner itself never uses a shell)."""
    return ["/bin/sh", "-c", script]


@pytest.mark.parametrize(
    ("status", "video"), [(JobStatus.SUCCEEDED, "cat.mp4"), (JobStatus.FAILED, None)]
)
def test_the_hook_gets_the_jobs_variables_and_no_secrets_of_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: JobStatus, video: str | None
) -> None:
    monkeypatch.setenv("I2V_DATABASE_URL", "postgresql+psycopg://i2v:secret@db/i2v")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    job_dir = tmp_path / ("output" if video else "failed") / "cat"
    env = hook_env(7, status, job_dir, job_dir / "job.json", job_dir / video if video else None)
    out = tmp_path / "env.json"
    result = run_hook([*DUMP_ENV, str(out)], env, timeout=30)
    assert result.ok and result.exit_code == 0 and result.error is None
    seen = json.loads(out.read_text())
    assert {k: v for k, v in seen.items() if k.startswith("I2V_")} == {
        "I2V_JOB_ID": "7",
        "I2V_STATUS": status.value,
        "I2V_JOB_DIR": str(job_dir),
        "I2V_MANIFEST": str(job_dir / "job.json"),
        "I2V_VIDEO": str(job_dir / "cat.mp4") if video else "",
    }
    assert seen["LC_ALL"] == "C.UTF-8" and seen["PATH"]
    assert "secret" not in json.dumps(seen)


def test_a_hook_that_exits_non_zero_is_logged_with_its_status_and_output(tmp_path: Path) -> None:
    with capture_logs() as logs:
        result = run_hook(sh("echo to stdout; echo to stderr >&2; exit 3"), {"I2V_JOB_ID": "9"}, timeout=30)
    assert (result.exit_code, result.timed_out, result.error, result.ok) == (3, False, None, False)
    assert result.output_tail == "to stdout\nto stderr\n"  # both streams, in the order written
    [line] = [e for e in logs if e["event"].startswith("hook_")]
    assert (line["event"], line["log_level"], line["job_id"], line["exit_code"]) == ("hook_failed", "warning", "9", 3)
    assert "to stderr" in line["output_tail"]


def test_a_hook_that_succeeds_is_logged_as_finished(tmp_path: Path) -> None:
    with capture_logs() as logs:
        result = run_hook(sh("echo done"), {"I2V_JOB_ID": "4"}, timeout=30)
    assert result.ok and result.output_tail == "done\n"
    [line] = [e for e in logs if e["event"].startswith("hook_")]
    assert (line["event"], line["log_level"], line["exit_code"]) == ("hook_finished", "info", 0)


def test_a_hook_that_hangs_is_killed_at_its_timeout_with_everything_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    hang = sh(f"sleep 300 & echo $! > {pid_file}; echo started; wait")
    with capture_logs() as logs:
        result = run_hook(hang, {"I2V_JOB_ID": "5"}, timeout=1.0)
    assert result.timed_out and not result.ok
    assert result.exit_code is not None and result.exit_code < 0  # ended by a signal
    assert result.output_tail == "started\n"
    assert not alive(int(pid_file.read_text()))
    assert [e["event"] for e in logs if e["event"].startswith("hook_")] == ["hook_timed_out"]


def test_what_a_hook_leaves_running_when_it_exits_is_stopped_and_not_waited_for(tmp_path: Path) -> None:
    pid_file = tmp_path / "leftover"
    # The leftover keeps the output pipe open; waiting for its end would take 300 s (past the timeout).
    result = run_hook(sh(f"sleep 300 & echo $! > {pid_file}; exit 0"), {}, timeout=60)
    assert (result.exit_code, result.timed_out) == (0, False)
    assert not alive(int(pid_file.read_text()))


def test_only_the_last_4_kib_of_a_loud_hook_are_kept(tmp_path: Path) -> None:
    loud = [sys.executable, "-c", "import sys; sys.stdout.write('x' * 1_000_000 + 'the end')"]
    result = run_hook(loud, {}, timeout=30)
    assert result.ok
    assert len(result.output_tail) == TAIL_BYTES and result.output_tail.endswith("xthe end")


def test_output_that_is_not_utf8_is_kept_with_replacement_characters(tmp_path: Path) -> None:
    result = run_hook([sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe')"], {}, timeout=30)
    assert result.output_tail == "ok \ufffd\ufffd"


def test_the_hook_reads_nothing_from_stdin(tmp_path: Path) -> None:
    result = run_hook([sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"], {}, timeout=30)
    assert result.output_tail == "''\n"


def test_a_missing_command_is_reported_not_raised(tmp_path: Path) -> None:
    with capture_logs() as logs:
        result = run_hook([str(tmp_path / "notify-me"), "--flag"], {"I2V_JOB_ID": "3"}, timeout=30)
    assert (result.exit_code, result.timed_out, result.ok) == (None, False, False)
    assert result.error is not None and result.error.startswith(f"command not found: {tmp_path / 'notify-me'}")
    assert [(e["event"], e["error"]) for e in logs] == [("hook_failed", result.error)]


def test_a_command_that_is_not_executable_says_so(tmp_path: Path) -> None:
    script = tmp_path / "notify-me"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = run_hook([str(script)], {}, timeout=30)
    assert result.exit_code is None and result.error is not None and "chmod +x" in result.error


def test_a_folder_named_as_the_command_says_it_is_a_folder(tmp_path: Path) -> None:
    result = run_hook([str(tmp_path)], {}, timeout=30)
    assert result.exit_code is None and result.error == (
        f"{tmp_path} is a folder, not a program; name the program to run in on_finish's first item")


def test_an_empty_hook_is_reported_not_raised() -> None:
    result = run_hook([], {}, timeout=30)
    assert result.exit_code is None and result.error is not None and "on_finish" in result.error


