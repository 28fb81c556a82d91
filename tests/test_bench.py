"""The GPU benchmark script runs end to end on a tiny model, so it is known to work before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_on_a_tiny_model_and_reports_every_case(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--tiny", "--device", "cpu", "--hygiene-jobs", "2"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["case"] for r in result["rows"]] == ["fast", "standard", "high", "1024x32"]
    for row in result["rows"]:
        for path in ("daemon", "plain"):
            assert row[path]["s_per_step"] > 0 and row[path]["s_per_video"] > 0
    assert result["hygiene"]["jobs"] == 2
