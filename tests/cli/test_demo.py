"""`i2v-daemon demo`: the real command in a subprocess, with its state folder in a temporary folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from i2v_daemon.work.mp4 import read_video_track
from tests.conftest import ROOT, SUBPROCESS_ENV


def demo(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command with XDG_DATA_HOME in tmp_path, so the tiny model is built there and not in the real home."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")} | SUBPROCESS_ENV
    full |= {"XDG_DATA_HOME": str(tmp_path / "xdg"), **(env or {})}
    full.pop("STATE_DIRECTORY", None)
    return subprocess.run([sys.executable, "-m", "i2v_daemon.cli", "demo", *args], capture_output=True, text=True,
                          timeout=300, env=full, cwd=ROOT)


def printed(stdout: str, label: str) -> Path:
    match = re.search(rf"^\s*{label}\s+(\S.*)$", stdout, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{stdout}"
    return Path(match.group(1).strip())


@pytest.mark.slow
def test_demo_runs_one_job_with_a_tiny_model_and_prints_a_real_mp4_that_it_says_is_noise(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    # The user's own variables must not reach the demo: not their database, not their preset.
    other_db = tmp_path / "users-own.db"
    proc = demo(tmp_path, "--data-dir", str(data),
                env={"I2V_DATABASE_URL": f"sqlite:///{other_db}", "I2V_DEFAULT_PRESET": "high"})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    video = printed(proc.stdout, "the video")
    assert video.is_file() and video.stat().st_size > 0
    assert video.parent.parent == data / "output"
    track = read_video_track(video)
    assert (track["codec"], track["num_frames"]) == ("h264", 16)

    manifest = json.loads(printed(proc.stdout, "its manifest").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["requested"]["preset"] == "demo"
    assert "noise" in proc.stdout and "random" in proc.stdout

    assert (tmp_path / "xdg" / "i2v-daemon" / "demo-model" / "tiny-i2vgen-xl-v1" / "model_index.json").is_file()
    assert (data / "jobs.db").is_file() and not other_db.exists()


def test_demo_refuses_a_folder_that_is_not_empty_and_not_an_earlier_demos_and_leaves_it_alone(tmp_path: Path) -> None:
    data = tmp_path / "mine"
    data.mkdir()
    (data / "jobs.db").write_bytes(b"precious")

    proc = demo(tmp_path, "--data-dir", str(data))

    assert proc.returncode == 2
    assert "not empty" in proc.stderr
    assert [p.name for p in data.iterdir()] == ["jobs.db"]
    assert (data / "jobs.db").read_bytes() == b"precious"
    assert not (tmp_path / "xdg").exists()  # it stopped before building anything


def test_demo_refuses_the_daemons_own_data_folder(tmp_path: Path) -> None:
    proc = demo(tmp_path, "--data-dir", str(tmp_path / "xdg" / "i2v-daemon"))

    assert proc.returncode == 2
    assert "own data folder" in proc.stderr
    assert not (tmp_path / "xdg").exists()
