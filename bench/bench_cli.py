"""How fast the read-only CLI answers: `i2v-daemon status` beside `python -c "import sqlalchemy"`, same interpreter.

    python bench/bench_cli.py [--runs 30]      # prints JSON; appends nothing

Both are run alternately, `runs` times each, on a quiet-as-possible machine; the median of each and
their ratio are reported, for an empty database and for one with 1,000 jobs. The goal (issue 11):
`status` within 1.2x the bare import.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    from i2v_daemon.params import Params
    from i2v_daemon.queue.jobs import JobRequest
    from i2v_daemon.queue.store import Store
    from i2v_daemon.views.jobs import job_summary

    # As a user runs it: bytecode is cached (a session or CI may set PYTHONDONTWRITEBYTECODE, which would
    # make only our modules be compiled from source on every run, SQLAlchemy's .pyc being installed).
    env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_") and k != "PYTHONDONTWRITEBYTECODE"}
    out: dict[str, object] = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for label, jobs in (("empty", 0), ("1000_jobs", 1000)):
            data = Path(tmp) / label
            store = Store(f"sqlite:///{data / 'jobs.db'}", describe=job_summary)
            store.create_schema()
            params = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)
            for i in range(jobs):
                store.enqueue(JobRequest(name=f"j{i}", inputs=(f"j{i}.png",), intake_key=f"k{i}", params=params))
            store.close()
            bare = [sys.executable, "-c", "import sqlalchemy"]
            status = [sys.executable, "-m", "i2v_daemon.cli", "status", "--data-dir", str(data)]
            for _ in range(3):  # warm the page cache for both
                timed(bare, env)
                timed(status, env)
            a, b = [], []
            for _ in range(args.runs):
                a.append(timed(bare, env))
                b.append(timed(status, env))
            out[label] = {
                "import_sqlalchemy_s": round(statistics.median(a), 4), "status_s": round(statistics.median(b), 4),
                "ratio": round(statistics.median(b) / statistics.median(a), 3), "runs": args.runs,
            }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
