"""The GPU benchmark script runs end to end on a tiny model, fast path included, so it is known to work before a
GPU is lent; its table lands in bench/RESULTS.md from the JSON a GPU run writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("compile-cache")]  # after test_accelerate.py
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny run; the compile cache is the session's (tests/models/test_accelerate.py's), so its graph is warm."""
    out = tmp_path_factory.mktemp("bench-out")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(OUT=str(out), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cache = tmp_path_factory.getbasetemp() / "compile-cache"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--tiny", "--device", "cpu", "--hygiene-jobs", "2",
         "--repeats", "1", "--budget-s", "1200", "--cache-dir", str(cache), "--cases", "fast,standard,1024x32"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"result": json.loads((out / "bench.json").read_text()), "table": (out / "table.md").read_text(),
            "out": out}


def test_every_case_runs_plain_eager_and_fast_and_reports_its_figures(bench):
    result = bench["result"]
    assert [r["case"] for r in result["rows"]] == ["fast", "standard"]  # "high" is the same code at a size
    for row in result["rows"]:
        for path in ("plain", "eager", "fast"):
            assert row[path]["e2e_s"] > 0 and row[path]["s_per_step"] > 0 and row[path]["tail_s"] > 0
        assert row["fast"]["accelerated"] == [True] and row["eager"]["accelerated"] == [False]
        assert row["fast"]["graphs"] == 1  # one graph for the one size, whatever the frame count
    assert result["capped"]["skipped"].startswith("no GPU")  # the 24 GiB cap needs CUDA's allocator
    assert result["hygiene"]["jobs"] == 2


def test_the_eager_path_makes_plain_diffusers_frames_and_the_fast_path_is_within_a_level(bench):
    for row in bench["result"]["rows"]:
        assert row["eager"]["vs_plain"]["max_abs"] == 0  # the same pipeline call, to the byte
        assert row["fast"]["vs_plain"]["max_abs"] <= 1 / 255 + 1e-9


def test_a_second_process_on_the_same_cache_reaches_its_first_step_warm(bench):
    warm = bench["result"]["warm_restart"]
    assert warm["accelerated"] is True and warm["first_step_after_start_s"] > 0
    assert warm["cache_loaded"]["files"] >= 1 and warm["cache_loaded"]["failed"] == 0


def test_the_table_is_rendered_into_results_md_between_its_markers(bench, tmp_path: Path):
    results = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "bench" / "RESULTS.md", results)
    before = results.read_text()
    for _ in range(2):  # rendering again replaces the table instead of adding a second one
        subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--render",
                        str(bench["out"] / "bench.json"), "--results", str(results)], check=True, timeout=120)
    text = results.read_text()
    assert text.count("<!-- bench_gpu.py --render: begin -->") == 1 and "| standard | 112x64x6 | 8 | fast |" in text
    assert text.startswith(before.split("<!-- bench_gpu.py --render: begin -->")[0].rstrip("\n")[:200])


def test_the_one_call_gpu_check_script_is_valid_shell():
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert "bench/bench_gpu.py" in text and ".whl/*.whl" in text and "timeout --signal=INT" in text
