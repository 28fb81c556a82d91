"""`i2v-daemon doctor` through the real CLI: a good set-up passes, a broken one names each problem and its fix."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Env


def test_doctor_on_a_good_set_up_finds_nothing_to_fix_and_exits_0(env: Env):
    env.cli("status", check=True)  # the database exists, with its schema
    proc = env.cli("doctor", "--json", "--min-free-gib", "0.001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    by_name = {c["name"]: c for c in report["checks"]}
    assert {"gpu", "ffmpeg", "data_dir", "inbox_dir", "output_dir", "failed_dir", "work_dir", "database",
            "model"} <= set(by_name)
    assert all(c["level"] == "ok" for c in report["checks"]), report["checks"]
    assert "device = cpu" in by_name["gpu"]["message"]
    assert "libx264" in by_name["ffmpeg"]["message"]
    assert "I2VGenXLPipeline" in by_name["model"]["message"]
    assert "queued 0" in by_name["database"]["message"]
    assert "GiB free" in by_name["inbox_dir"]["message"]


def test_doctor_names_each_broken_part_with_a_fix_and_exits_1(env: Env, tmp_path: Path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    proc = env.cli("doctor", env={
        "I2V_INBOX_DIR": str(a_file / "inbox"),  # cannot be created: its parent is a file
        "I2V_MODEL": str(tmp_path / "no-such-model"),
        "I2V_DATABASE_URL": "postgresql+psycopg://i2v@127.0.0.1:9/nothing",  # nothing listens on port 9
    })
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAIL  inbox_dir:" in out and "is a file, not a folder" in out
    assert "FAIL  model:" in out and "no-such-model" in out and "does not exist" in out
    assert "FAIL  database: cannot open postgresql+psycopg://i2v@127.0.0.1:9/nothing" in out
    fails = [i for i, line in enumerate(out.splitlines()) if line.startswith("FAIL")]
    assert len(fails) >= 3 and all(out.splitlines()[i + 1].strip().startswith("fix:") for i in fails)
    assert "OK    ffmpeg" in out  # the rest is still checked
    assert out.strip().splitlines()[-1].startswith(f"{len(fails)} problem(s) to fix")


def test_doctor_warns_about_a_paused_queue_but_still_exits_0(env: Env):
    env.cli("pause", check=True)
    proc = env.cli("doctor", "--min-free-gib", "0.001")
    assert proc.returncode == 0, proc.stdout
    assert "WARN  queue: paused since" in proc.stdout and "fix: i2v-daemon resume" in proc.stdout
