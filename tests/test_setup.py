"""`make install` as a new user meets it: the CPU build of PyTorch where no GPU is visible, said before
it downloads; and once installed, `make run` and `make serve` install nothing again.

The venv is a stand-in (its `pip` writes down what it was asked, its `python` has no torch), so the
Makefile's own decisions are what is tested, without a download.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import ROOT


def stand_in_venv(tmp_path: Path) -> tuple[Path, Path]:
    venv, asked = tmp_path / "venv", tmp_path / "pip-asked.txt"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "pip").write_text(f'#!/bin/sh\necho "$*" >> {asked}\n')
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")  # no torch importable yet
    for name in ("pip", "python"):
        (venv / "bin" / name).chmod(0o755)
    return venv, asked


def make(venv: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    no_gpu = tmp_path / "no-gpu"
    no_gpu.mkdir(exist_ok=True)
    (no_gpu / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices were found' >&2\nexit 9\n")
    (no_gpu / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{no_gpu}:/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(["make", *args, f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_make_install_without_a_gpu_says_so_and_installs_the_cpu_build_of_pytorch(tmp_path: Path) -> None:
    venv, asked = stand_in_venv(tmp_path)
    done = make(venv, tmp_path, "install")
    assert done.returncode == 0, done.stderr
    assert "no NVIDIA GPU visible" in done.stdout and "CPU build" in done.stdout
    assert done.stdout.index("no NVIDIA GPU visible") < done.stdout.index("pip install -q -e .")  # said first
    torch, package = asked.read_text().splitlines()
    assert torch == "install -q --index-url https://download.pytorch.org/whl/cpu torch", torch
    assert package == "install -q -e ."


def test_make_install_once_done_installs_nothing_again_for_run_and_serve(tmp_path: Path) -> None:
    venv, asked = stand_in_venv(tmp_path)
    assert make(venv, tmp_path, "install").returncode == 0
    first = asked.read_text()
    again = make(venv, tmp_path, "install")
    assert again.returncode == 0 and asked.read_text() == first  # pip was not asked again
    assert make(venv, tmp_path, "-q", "install").returncode == 0  # make itself says: up to date
