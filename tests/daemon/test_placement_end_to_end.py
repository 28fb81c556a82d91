"""The daemon plans where the weights go before it loads them, places them, and records it in every try.

On the CPU there is no card to plan for: the documented test seam I2V_TEST_DEVICE_BUDGET_GIB makes
the holder plan as if the device were a card of that size (README: docs/development.md).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import Env, write_config

pytestmark = pytest.mark.slow


def test_the_planned_placement_is_applied_and_recorded_in_the_manifest(env: Env, drop, tiny_family_dirs):
    write_config(env.config, env.data, tiny_family_dirs("wan"))
    drop("cat", (".json", json.dumps({"prompt": "a cat turns its head"})))
    proc = env.cli("run", "--once", env={"I2V_TEST_DEVICE_BUDGET_GIB": "100"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = [json.loads(line) for line in proc.stderr.splitlines() if '"placement_planned"' in line]
    assert len(planned) == 1 and planned[0]["placement"] == "gpu" and planned[0]["fits"] is True, proc.stderr[-3000:]
    assert planned[0]["budget_bytes"] == 100 * 2**30
    doc = json.loads((env.output / "cat" / "job.json").read_text())
    (entry,) = doc["attempts"]
    assert entry["placement"] == "gpu" and entry["outcome"] == "succeeded"
    assert entry["placement_predicted_peak_bytes"] == planned[0]["predicted_peak_bytes"]


def test_a_card_too_small_for_any_placement_plans_the_leanest_and_leaves_the_job_to_a_larger_card(env: Env, drop,
                                                                                                  tiny_family_dirs):
    write_config(env.config, env.data, tiny_family_dirs("wan"))
    drop("cat", (".json", json.dumps({"prompt": "a cat turns its head"})))
    proc = env.cli("run", "--once", env={"I2V_TEST_DEVICE_BUDGET_GIB": "0.000001"})
    assert proc.returncode == 0, proc.stderr[-3000:]  # it does not wait for a job it can never take
    planned = [json.loads(line) for line in proc.stderr.splitlines() if '"placement_planned"' in line]
    assert planned[0]["placement"] == "group_offload_leaf" and planned[0]["fits"] is False  # the leanest
    assert '"jobs_left_for_a_larger_card"' in proc.stderr
    [job] = env.status()["jobs"]
    assert job["status"] == "queued" and job["attempts"] == 0 and not (env.output / "cat").exists()
    assert job["error"].startswith("needs a card offering at least") and job["need_bytes"] > 1024
