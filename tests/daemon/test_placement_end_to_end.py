"""The daemon plans where the weights go before it loads them, places them, and records it in every try.

On the CPU there is no card to plan for: the documented test seam I2V_TEST_DEVICE_BUDGET_GIB makes
the holder plan as if the device were a card of that size (README: docs/development.md).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import Env, write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("budget_gib", "expected"), [("100", "gpu"), ("0.000001", "group_offload_leaf")])
def test_the_planned_placement_is_applied_and_recorded_in_the_manifest(
    env: Env, drop, tiny_family_dirs, budget_gib: str, expected: str,
):
    write_config(env.config, env.data, tiny_family_dirs("wan"))
    drop("cat", (".json", json.dumps({"prompt": "a cat turns its head"})))
    proc = env.cli("run", "--once", env={"I2V_TEST_DEVICE_BUDGET_GIB": budget_gib})
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = [json.loads(line) for line in proc.stderr.splitlines() if '"placement_planned"' in line]
    assert len(planned) == 1 and planned[0]["placement"] == expected, proc.stderr[-3000:]
    assert planned[0]["budget_bytes"] == int(float(budget_gib) * 2**30)
    assert planned[0]["fits"] is (expected == "gpu")  # nothing fits a millionth of a GiB: the leanest is taken
    doc = json.loads((env.output / "cat" / "job.json").read_text())
    (entry,) = doc["attempts"]
    assert entry["placement"] == expected and entry["outcome"] == "succeeded"
    assert entry["placement_predicted_peak_bytes"] == planned[0]["predicted_peak_bytes"]
