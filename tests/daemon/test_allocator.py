"""PyTorch's CUDA allocator runs with expandable segments in the daemon and cuDNN's autotuning workspace is capped,
unless the environment names a setting of its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, Env

#: `run --once` in this process, then what its environment held: now, and when torch was first imported.
SCRIPT = """
import json, os, sys
seen = {}

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "at_torch_import" not in seen:
            seen["at_torch_import"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
            seen["cap_at_torch_import"] = os.environ.get("CUDNN_CONV_WSCAP_DBG")
        return None

sys.meta_path.insert(0, Spy())
from i2v_daemon.cli.main import main

rc = main(["run", "--once", "--config", sys.argv[1]])
import torch  # as loading a model would, had there been a job
print(json.dumps({"rc": rc, "now": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                  "cap": os.environ.get("CUDNN_CONV_WSCAP_DBG"), **seen}))
"""


@pytest.mark.parametrize(("theirs", "expected", "their_cap", "cap"), [
    pytest.param(None, "expandable_segments:True", None, "1024", id="the daemon's"),
    pytest.param("max_split_size_mb:128", "max_split_size_mb:128", "256", "256", id="the user's"),
])
def test_the_daemon_sets_expandable_segments_and_a_cudnn_workspace_cap_before_torch_unless_the_user_set_them(
    env: Env, theirs: str | None, expected: str, their_cap: str | None, cap: str
) -> None:
    environ = env.environ()
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDNN_CONV_WSCAP_DBG"):
        environ.pop(var, None)
    if theirs is not None:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = theirs
    if their_cap is not None:
        environ["CUDNN_CONV_WSCAP_DBG"] = their_cap
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(env.config)], env=environ, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"rc": 0, "now": expected, "at_torch_import": expected, "cap": cap, "cap_at_torch_import": cap}
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    kept = [e for e in events if e.get("event") == "allocator_setting_kept"]
    kept_cap = [e for e in events if e.get("event") == "cudnn_workspace_cap_kept"]
    if theirs is None:
        assert kept == [] and kept_cap == []
    else:  # said once, naming the user's value
        assert len(kept) == 1 and kept[0]["variable"] == "PYTORCH_CUDA_ALLOC_CONF" and kept[0]["value"] == theirs
        assert len(kept_cap) == 1 and kept_cap[0]["value"] == their_cap
