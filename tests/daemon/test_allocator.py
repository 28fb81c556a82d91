"""PyTorch's CUDA allocator runs with expandable segments in the daemon, unless the environment names a setting."""

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
        return None

sys.meta_path.insert(0, Spy())
from i2v_daemon.cli.main import main

rc = main(["run", "--once", "--config", sys.argv[1]])
import torch  # as loading a model would, had there been a job
print(json.dumps({"rc": rc, "now": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), **seen}))
"""


@pytest.mark.parametrize(("theirs", "expected"), [
    pytest.param(None, "expandable_segments:True", id="the daemon's"),
    pytest.param("max_split_size_mb:128", "max_split_size_mb:128", id="the user's"),
])
def test_the_daemon_sets_expandable_segments_before_torch_unless_the_user_set_the_allocator(
    env: Env, theirs: str | None, expected: str
) -> None:
    environ = env.environ()
    environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    environ.pop("PYTORCH_ALLOC_CONF", None)
    if theirs is not None:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = theirs
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(env.config)], env=environ, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"rc": 0, "now": expected, "at_torch_import": expected}
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    kept = [e for e in events if e.get("event") == "allocator_setting_kept"]
    if theirs is None:
        assert kept == []
    else:  # said once, naming the user's value
        assert len(kept) == 1 and kept[0]["variable"] == "PYTORCH_CUDA_ALLOC_CONF" and kept[0]["value"] == theirs
