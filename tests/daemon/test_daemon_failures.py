"""Failures as a user meets them, through the real daemon process: nothing silently stuck, nothing lost.

Each test here reproduces a finding of the round-2 review ("Where the pieces meet") that failed on
the code before it. Where permissions matter the daemon runs unprivileged (as root with every
capability dropped: bound by permissions and the sticky bit like any user).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from i2v_daemon.faults import STAGING_POINTS
from tests.conftest import Env, daemon_log, make_image, stop_daemon, wait_for, wait_ready, write_config

pytestmark = pytest.mark.slow


def job_of(env: Env, name: str) -> dict | None:
    """The job's `status --json` entry; None while there is none (or no database yet)."""
    proc = env.cli("status", "--json", "--limit", "1000")
    if proc.returncode != 0:
        return None
    return next((j for j in json.loads(proc.stdout)["jobs"] if j["name"] == name), None)


def every_byte_in_one_place(env: Env, names: list[str]) -> None:
    """Each dropped name is in exactly one of inbox/, work/, output/, failed/."""
    for name in names:
        found = [p for root in (env.inbox, env.data / "work", env.output, env.failed) for p in root.rglob(name)
                 if p.parent.name == "input" or root == env.inbox]
        assert len(found) == 1, (name, found)


# ---- publishing ----------------------------------------------------------------------------------


def test_an_unwritable_output_folder_keeps_the_job_visible_and_it_finishes_by_itself_once_fixed(env: Env, drop):
    write_config(env.config, env.data, env.model_dir, retry_backoff_seconds=1)
    daemon = env.start(unprivileged=True)
    try:
        wait_ready(daemon)
        env.output.chmod(0o555)  # after start-up: the daemon's own check of the folders passed
        drop("cat", (".txt", "a cat"))
        waiting = wait_for(lambda: (j := job_of(env, "cat")) and j["error"] and "Permission denied" in j["error"]
                           and j, what="the job to show why it waits")
        assert waiting["status"] == "queued" and "without using an attempt" in waiting["error"]
        time.sleep(4)  # several more tries of the publish: none of them uses an attempt
        again = job_of(env, "cat")
        assert again is not None and again["attempts"] <= 1 and again["status"] in ("queued", "running")
        assert again["error"] and "Permission denied" in again["error"]
        env.output.chmod(0o755)
        done = wait_for(lambda: (j := job_of(env, "cat")) and j["status"] == "succeeded" and j, what="success")
        assert done["output"] == str(env.output / "cat" / "cat.mp4") and done["error"] is None
        generated = json.loads((env.output / "cat" / "job.json").read_text())["attempts"]
        assert len(generated) == 1  # the video was generated once; only the publish was done again
    finally:
        env.output.chmod(0o755)
        assert stop_daemon(daemon) == 0
    every_byte_in_one_place(env, ["cat.png", "cat.txt"])


def test_publishes_that_fail_while_output_is_not_a_folder_use_up_no_name(env: Env, drop):
    daemon = env.start()
    try:
        wait_ready(daemon)
        env.output.rmdir()
        env.output.write_text("not a folder\n")  # after start-up: the daemon's own check of the folders passed
        drop("blocked", (".txt", "a blocked cat"))
        waiting = wait_for(lambda: (j := job_of(env, "blocked")) and j["error"] and j, what="the publish to fail")
        assert waiting["status"] in ("queued", "running") and "without using an attempt" in waiting["error"]
        shown = json.loads(env.cli("show", str(waiting["id"]), "--json", check=True).stdout)
        wait_for(lambda: (json.loads(env.cli("show", str(waiting["id"]), "--json").stdout)["error_detail"] or {})
                 .get("waits", 0) >= 2, what="a second failed publish")
        assert "not a folder" in shown["error"] or "Not a directory" in shown["error"]
        env.output.unlink()
        env.output.mkdir()
        done = wait_for(lambda: (j := job_of(env, "blocked")) and j["status"] == "succeeded" and j, what="success")
    finally:
        if env.output.is_file():
            env.output.unlink()
        assert stop_daemon(daemon) == 0
    # S/, since no `blocked` stood there when the job published: no name was used up by the failed tries.
    assert sorted(p.name for p in env.output.iterdir()) == ["blocked"]
    assert done["output"] == str(env.output / "blocked" / "blocked.mp4")
    assert "destination_in_the_way" not in (env.output / "blocked" / "job.log").read_text()


def test_a_file_standing_where_the_jobs_folder_should_go_is_passed_by_with_the_next_free_name(env: Env, drop):
    drop("cat", (".txt", "a cat"))
    assert env.cli("run", "--once", env={"I2V_TEST_CRASH_AT": "destination_recorded"}).returncode == 99
    (env.output / "cat").write_text("someone's notes\n")  # a plain file where output/cat/ was to go
    env.cli("run", "--once", check=True)
    assert (env.output / "cat").read_text() == "someone's notes\n"  # untouched
    assert (env.output / "cat-2" / "cat.mp4").exists()
    [job] = env.status()["jobs"]
    assert job["status"] == "succeeded" and job["job_dir"] == str(env.output / "cat-2")
    assert "destination_in_the_way" in (env.output / "cat-2" / "job.log").read_text()


# ---- intake --------------------------------------------------------------------------------------


def test_a_file_the_daemon_may_not_move_is_said_once_and_every_other_drop_is_still_taken(env: Env, drop):
    os.chown(env.inbox, 65534, 65534)  # the inbox belongs to someone else and is sticky, like /tmp
    env.inbox.chmod(0o1777)
    daemon = env.start(unprivileged=True)
    try:
        wait_ready(daemon)
        stuck = []
        for name, write in (("aaa.png", make_image), ("aaa.txt", lambda p: p.write_text("another user's"))):
            hidden = env.inbox / f".{name}"  # sorted first: it used to stop the whole pass
            write(hidden)
            os.chown(hidden, 1, 1)  # another user's (uid 1), before it is visible under its name
            os.utime(hidden, (1, 1))
            stuck.append(hidden.rename(env.inbox / name))
        drop("zzz", (".txt", "mine"))
        wait_for(lambda: (j := job_of(env, "zzz")) and j["status"] == "succeeded", what="the other drop to run")
        time.sleep(3)  # many rescans and wake-ups later …
        log = daemon_log(daemon)
        problems = [line for line in log.splitlines() if "intake_problem" in line and "aaa.png" in line]
        assert len(problems) == 1, problems  # … said once, not once per scan
        assert "sticky" in problems[0] and "Traceback" not in log
        status = env.cli("status", check=True).stdout
        assert "problem" in status and "aaa.png" in status and "sticky" in status
        assert job_of(env, "aaa") is None and all(p.exists() for p in stuck)  # untouched, still in the inbox
        for p in stuck:
            os.chown(p, 0, 0)  # fixed: now the daemon's own
        wait_for(lambda: (j := job_of(env, "aaa")) and j["status"] == "succeeded", what="the fixed drop to run")
        wait_for(lambda: "aaa.png" not in env.cli("status", check=True).stdout.split("ID")[0], what="problem gone")
    finally:
        assert stop_daemon(daemon) == 0


def test_a_file_name_that_is_not_utf8_fails_alone_saying_what_to_do_and_keeps_its_bytes(env: Env, drop):
    inbox = os.fsencode(env.inbox)
    make_image(Path(os.fsdecode(inbox + b"/caf\xe9.png")))
    Path(os.fsdecode(inbox + b"/caf\xe9.txt")).write_bytes(b"a latin-1 name")
    os.utime(os.fsdecode(inbox + b"/caf\xe9.png"), (1, 1))
    os.utime(os.fsdecode(inbox + b"/caf\xe9.txt"), (1, 1))
    drop("dog", (".txt", "a dog"))
    env.cli("run", "--once", check=True)
    statuses = {j["name"]: j for j in env.status()["jobs"]}
    assert statuses["dog"]["status"] == "succeeded"
    bad = statuses["caf\\xe9"]
    assert bad["status"] == "failed" and "not valid UTF-8" in bad["error"] and "rename it" in bad["error"]
    kept = os.listdir(os.fsencode(env.failed / "caf\\xe9" / "input"))
    assert sorted(kept) == [b"caf\xe9.png", b"caf\xe9.txt"]  # under their own names, as dropped
    assert env.inbox_files() == []


def test_a_251_byte_file_name_runs_and_one_too_long_for_its_outputs_is_refused_at_intake(env: Env, drop):
    long_stem = "a" * 247  # "…a.png" is 251 bytes: the temporary encode name used to be 263
    drop(long_stem, (".txt", "a long name"))
    too_long = "b" * 245  # with interpolation its delivered files include "…b.generated.mp4": 259 bytes
    drop(too_long, (".json", json.dumps({"prompt": "p", "output_fps": 8, "fps": 4})))
    env.cli("run", "--once", check=True)
    jobs = {j["name"]: j for j in env.status()["jobs"]}
    assert jobs[long_stem]["status"] == "succeeded"
    assert (env.output / long_stem / f"{long_stem}.mp4").exists()
    refused = jobs[too_long]
    assert refused["status"] == "failed" and refused["attempts"] == 0  # refused at intake, never retried
    assert "255-byte" in refused["error"] and "at most 241 bytes" in refused["error"]


@pytest.mark.parametrize("point", STAGING_POINTS)
def test_a_crash_in_the_middle_of_staging_is_finished_by_the_next_run_with_one_job(env: Env, drop, point: str):
    files = drop("cat", (".txt", "a cat"))
    dropped = {p.name: p.read_bytes() for p in files}
    assert env.cli("run", "--once", env={"I2V_TEST_CRASH_AT": point}).returncode == 99
    env.cli("run", "--once", check=True)
    [job] = env.status()["jobs"]
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert {p.name: p.read_bytes() for p in (env.output / "cat" / "input").iterdir()} == dropped
    assert env.inbox_files() == [] and list((env.data / "work").iterdir()) == []


# ---- liveness and signals ----------------------------------------------------------------------------


def test_sighup_stops_the_daemon_cleanly_like_sigterm(env: Env):
    daemon = env.start()
    wait_ready(daemon)
    assert stop_daemon(daemon, signal.SIGHUP) == 0
    log = daemon_log(daemon)
    assert '"stop_requested"' in log and "SIGHUP" in log and '"stopped"' in log


def test_a_signal_is_noticed_at_once_even_while_the_worker_is_stuck_and_a_second_one_exits_at_once(env: Env, drop):
    write_config(env.config, env.data, env.model_dir, shutdown_grace_seconds=1)
    daemon = env.start(env={"I2V_TEST_HANG_AT": "loading"})
    try:
        drop("cat", (".txt", "a cat"))
        wait_for(lambda: (j := job_of(env, "cat")) and j["phase"] == "loading", what="the job to hang in loading")
        daemon.send_signal(signal.SIGTERM)
        wait_for(lambda: '"stop_requested"' in daemon_log(daemon), timeout=3, what="the stop to be noticed")
        time.sleep(1.5)
        assert daemon.poll() is None  # the job's call never returns: the daemon cannot finish it …
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(5) == 128 + signal.SIGTERM  # … and a second signal ends it at once
    finally:
        stop_daemon(daemon, signal.SIGKILL)
    assert '"second_signal"' in daemon_log(daemon)
    env.cli("run", "--once", check=True)  # the job was safe all along
    assert job_of(env, "cat")["status"] == "succeeded"  # type: ignore[index]


def test_a_job_stuck_in_a_phase_is_requeued_with_the_reason_and_the_hung_daemon_exits_to_be_restarted(
    env: Env, drop,
):
    write_config(env.config, env.data, env.model_dir, stall_seconds=10, lease_seconds=5)
    daemon = env.start(env={"I2V_TEST_HANG_AT": "loading"})
    try:
        drop("cat", (".txt", "a cat"))
        stalled = wait_for(lambda: (j := job_of(env, "cat")) and j["error"] and "no progress" in j["error"] and j,
                           timeout=60, what="the stall to be visible")
        assert stalled["status"] == "queued" and "while loading" in stalled["error"]
        assert daemon.wait(30) == 75  # its worker never came back: it exits for its supervisor to restart it
    finally:
        stop_daemon(daemon, signal.SIGKILL)
    assert '"job_stalled"' in daemon_log(daemon) and '"worker_hung"' in daemon_log(daemon)
    env.cli("run", "--once", check=True)
    done = job_of(env, "cat")
    assert done is not None and done["status"] == "succeeded" and done["attempts"] == 2


def test_run_once_honours_the_grace_period_and_puts_the_job_back(env: Env, drop):
    write_config(env.config, env.data, env.model_dir, shutdown_grace_seconds=1)
    drop("slow", (".json", json.dumps({"prompt": "p", "steps": 1000})))
    once = env.start("--once")
    try:
        wait_for(lambda: (j := job_of(env, "slow")) and j["phase"] == "denoising", what="the job to be denoising")
        t0 = time.monotonic()
        once.send_signal(signal.SIGTERM)
        assert once.wait(30) == 0
        assert time.monotonic() - t0 < 20  # the grace (1 s) and one step, not the whole job
    finally:
        stop_daemon(once, signal.SIGKILL)
    job = job_of(env, "slow")
    assert job is not None and job["status"] == "queued" and job["attempts"] == 0  # the attempt was refunded
    assert "grace_period_over" in daemon_log(once)


# ---- the database --------------------------------------------------------------------------------------


def test_a_deleted_database_stops_the_daemon_with_78_and_status_does_not_make_a_new_one(env: Env, drop):
    daemon = env.start()
    try:
        wait_ready(daemon)
        for p in env.data.glob("jobs.db*"):
            p.unlink()
        assert daemon.wait(30) == 78
    finally:
        stop_daemon(daemon, signal.SIGKILL)
    log = daemon_log(daemon)
    assert "was deleted while the daemon ran" in log and '"daemon_cannot_go_on"' in log
    status = env.cli("status")
    assert status.returncode == 1 and "there is no job database" in status.stderr
    assert not (env.data / "jobs.db").exists()


def test_a_database_deleted_during_a_long_job_stops_it_at_its_next_step_and_publishes_nothing(env: Env, drop):
    drop("slow", (".json", json.dumps({"prompt": "p", "steps": 1000})))
    daemon = env.start()
    try:
        wait_for(lambda: ((j := job_of(env, "slow")) and j["phase"] == "denoising") or daemon.poll() is not None,
                 what="the job to be denoising")
        assert daemon.poll() is None, daemon_log(daemon)[-3000:]
        for p in env.data.glob("jobs.db*"):
            p.unlink()
        assert daemon.wait(60) == 78
    finally:
        stop_daemon(daemon, signal.SIGKILL)
    assert "was deleted while the daemon ran" in daemon_log(daemon)
    assert not (env.output / "slow").exists()  # its result would be recorded nowhere anyone can see
    every_byte_in_one_place(env, ["slow.png", "slow.json"])


def test_a_database_replaced_by_another_file_stops_the_daemon_with_78(env: Env):
    daemon = env.start()
    try:
        wait_ready(daemon)
        db = env.data / "jobs.db"
        other = env.data / "restored.db"
        other.write_bytes(db.read_bytes())  # e.g. a backup copied back over the live file
        os.replace(other, db)
        assert daemon.wait(30) == 78
    finally:
        stop_daemon(daemon, signal.SIGKILL)
    log = daemon_log(daemon)
    assert "was replaced by another file while the daemon ran" in log and '"daemon_cannot_go_on"' in log


def test_a_data_dir_with_a_question_mark_and_a_percent_keeps_jobs_db_inside_it(tmp_path: Path, tiny_i2vgen_dir):
    data = tmp_path / "odd?name%2Fhere"
    (data / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "config.toml", data, tiny_i2vgen_dir)
    env = Env(data=data, config=config, model_dir=tiny_i2vgen_dir)
    make_image(data / "inbox" / "cat.png")
    (data / "inbox" / "cat.txt").write_text("a cat")
    for p in (data / "inbox").iterdir():
        os.utime(p, (1, 1))
    env.cli("run", "--once", check=True)
    assert (data / "jobs.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("odd")) == ["odd?name%2Fhere"]
    assert env.status()["counts"]["succeeded"] == 1


# ---- encoding ----------------------------------------------------------------------------------------


def test_an_encode_that_fails_once_is_done_again_from_the_saved_frames_without_regenerating(env: Env, drop, tmp_path):
    import imageio_ffmpeg

    real = imageio_ffmpeg.get_ffmpeg_exe()
    marker = tmp_path / "failed-once"
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *libx264*) if [ ! -e "{marker}" ]; then touch "{marker}"; echo "killed" >&2; exit 1; fi;; esac\n'
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    drop("cat", (".txt", "a cat"))
    env.cli("run", "--once", check=True, env={"IMAGEIO_FFMPEG_EXE": str(wrapper)})
    manifest = json.loads((env.output / "cat" / "job.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["attempt_count"] == 2
    assert len(manifest["attempts"]) == 1  # one generation: the second attempt only encoded
    log = (env.output / "cat" / "job.log").read_text()
    assert "will_retry" in log and "frames_reused" in log
    assert not (env.output / "cat" / "frames.npy").exists()


# ---- a model that cannot be had right now -------------------------------------------------------------


def test_a_hub_model_that_cannot_be_fetched_keeps_jobs_queued_with_the_reason_and_run_once_exits_78(env: Env, drop):
    write_config(env.config, env.data, "someone/not-cached-anywhere")
    drop("cat", (".txt", "a cat"))
    once = env.cli("run", "--once", env={"HF_HUB_OFFLINE": "1"})
    assert once.returncode == 78, once.stderr[-2000:]
    job = job_of(env, "cat")
    assert job is not None and job["status"] == "queued" and job["attempts"] == 0  # taken in, kept, no attempt used
    status = env.cli("status", check=True).stdout
    assert "problem" in status and "cannot load the model someone/not-cached-anywhere" in status
    assert "HF_HUB_OFFLINE" in status and "hf download someone/not-cached-anywhere" in status
    doctor = env.cli("doctor", env={"HF_HUB_OFFLINE": "1"})
    assert doctor.returncode == 1 and "FAIL" in doctor.stdout
    # Fixed (a model that loads): the next run takes the job, and the old process's problem is gone.
    write_config(env.config, env.data, env.model_dir)
    env.cli("run", "--once", check=True)
    assert job_of(env, "cat")["status"] == "succeeded"  # type: ignore[index]
    assert "problem" not in env.cli("status", check=True).stdout


def test_run_once_with_jobs_only_for_another_model_it_cannot_fetch_exits_78_and_keeps_them_queued(env: Env, drop):
    env.config.write_text(env.config.read_text() + '[models]\nhub = "someone/not-cached-anywhere"\n')
    drop("cat", (".json", json.dumps({"prompt": "a cat", "model": "hub"})))
    once = env.cli("run", "--once", env={"HF_HUB_OFFLINE": "1"})
    assert once.returncode == 78, once.stderr[-2000:]
    assert '"jobs_wait_for_the_model"' in once.stderr and "someone/not-cached-anywhere" in once.stderr
    job = job_of(env, "cat")
    assert job is not None and job["status"] == "queued" and job["attempts"] == 0
    assert "cannot be fetched" in job["error"] or "not cached" in job["error"], job["error"]


def test_the_daemon_starts_without_a_model_it_cannot_fetch_takes_drops_and_says_why_they_wait(env: Env, drop):
    write_config(env.config, env.data, "someone/not-cached-anywhere")
    daemon = env.start(env={"HF_HUB_OFFLINE": "1"})
    try:
        wait_ready(daemon)
        assert '"model_unavailable"' in daemon_log(daemon) and '"model_loaded": false' in daemon_log(daemon)
        drop("cat", (".txt", "a cat"))
        cat = wait_for(lambda: (j := job_of(env, "cat")) and j["status"] == "queued" and j,
                       what="the drop to be queued")
        shown = env.cli("status", check=True).stdout
        assert "cannot load the model" in shown
        row = next(line for line in shown.splitlines() if line.split()[:1] == [str(cat["id"])])
        assert "waiting: cannot load the model" in row, row  # on its own row too, as README promises
        assert daemon.poll() is None  # still serving: intake goes on, the load is tried again later
    finally:
        assert stop_daemon(daemon) == 0


def test_a_model_folder_that_does_not_exist_can_never_load_and_stops_run_with_78(env: Env, tmp_path: Path):
    write_config(env.config, env.data, tmp_path / "no-such-folder")
    proc = env.cli("run")
    assert proc.returncode == 78 and "does not exist" in proc.stderr


def test_run_once_with_a_model_that_can_never_load_exits_78_even_with_nothing_queued(env: Env, tmp_path: Path):
    write_config(env.config, env.data, tmp_path / "no-such-folder")
    proc = env.cli("run", "--once")
    assert proc.returncode == 78 and "does not exist" in proc.stderr, proc.stderr[-2000:]
    write_config(env.config, env.data, env.model_dir)
    assert env.cli("run", "--once").returncode == 0  # a model that loads, nothing to do: done


def test_a_job_put_back_by_a_shutdown_and_then_canceled_says_it_had_run_and_used_no_attempt(env: Env, drop):
    write_config(env.config, env.data, env.model_dir, shutdown_grace_seconds=0, device="auto")
    drop("slow", (".json", json.dumps({"prompt": "p", "steps": 1000})))
    once = env.start("--once")
    try:
        wait_for(lambda: (j := job_of(env, "slow")) and j["step"] >= 10, what="ten steps")
        once.send_signal(signal.SIGTERM)
        assert once.wait(60) == 0
    finally:
        stop_daemon(once, signal.SIGKILL)
    assert env.cli("cancel", "1", check=True).returncode == 0
    env.cli("run", "--once", check=True)
    manifest = json.loads((env.failed / "slow" / "job.json").read_text())
    assert manifest["status"] == "canceled" and manifest["attempt_count"] == 0
    assert manifest["device"] == "cpu"  # where it ran, not the housekeeper that ended it ("auto" before)
    assert manifest["error"]["message"] == ("canceled on request (`i2v-daemon cancel` or the API) while queued "
                                            "(it had run before and was put back in the queue)")


def test_run_once_resolves_device_auto_to_the_device_it_really_uses(env: Env, drop):
    write_config(env.config, env.data, env.model_dir, device="auto")
    drop("cat", (".txt", "a cat"))
    env.cli("run", "--once", check=True)
    [job] = env.status()["jobs"]
    assert job["device"] == "cpu" and job["status"] == "succeeded"  # not "auto"
