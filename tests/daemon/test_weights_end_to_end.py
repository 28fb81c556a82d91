"""Weights through the real CLI: a preset's fp8 weights reach the job and its manifest; an impossible choice
stops `run` and fails in `doctor`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_PRESET, Env, write_config

pytestmark = pytest.mark.slow


def manifest(folder: Path) -> dict:
    return json.loads((folder / "job.json").read_text())


def test_a_job_of_a_preset_with_fp8_weights_runs_on_fp8_weights_and_its_manifest_and_tries_say_so(env: Env, drop):
    write_config(env.config, env.data, env.model_dir, presets_extra={"small": {**TINY_PRESET, "weights": "fp8"}})
    drop("plain")
    drop("small", (".json", json.dumps({"preset": "small", "prompt": "a cat"})))

    env.cli("run", "--once", check=True)

    plain, small = manifest(env.output / "plain"), manifest(env.output / "small")
    assert plain["model"]["weights"] == "auto" and [t["weights"] for t in plain["attempts"]] == ["auto"]
    assert small["model"] == {"name": "default", "id": str(env.model_dir), "family": "i2vgen-xl", "revision": None,
                              "weights": "fp8"}
    assert [(t["outcome"], t["weights"]) for t in small["attempts"]] == [("succeeded", "fp8")]
    assert small["requested"]["weights"] == "fp8"


def test_gguf_weights_for_a_unet_model_stop_run_once_with_78_and_the_fix(env: Env, tmp_path: Path):
    pytest.importorskip("gguf")
    file = tmp_path / "i2vgen.gguf"
    file.write_bytes(b"GGUF")
    write_config(env.config, env.data, env.model_dir, weights="gguf", weights_file=str(file))

    proc = env.cli("run", "--once")

    assert proc.returncode == 78, proc.stderr[-2000:]
    assert "weights: 'gguf' replaces a transformer, and i2vgen-xl" in proc.stderr
    assert "use weights = 'fp8' (or 'torchao') for it" in proc.stderr
    doctor = env.cli("doctor", "--json")
    model = next(c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "model")
    assert doctor.returncode == 1 and model["level"] == "fail" and "exit 78" in model["message"], model
