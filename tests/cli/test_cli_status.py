"""`i2v-daemon status` as a user's script meets it: the contract's JSON, newest first, and no GPU stack loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from i2v_daemon.queue.jobs import JobRequest, JobStatus, Params
from i2v_daemon.queue.store import Store

COUNT_KEYS = {"queued", "running", "succeeded", "failed", "canceled"}
JOB_KEYS = {
    "id", "name", "status", "progress", "attempts", "created_at", "started_at", "finished_at", "width", "height",
    "num_frames", "output", "error",
}
PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)
T0 = datetime(2030, 1, 1, tzinfo=UTC)
N_JOBS = 1000


@dataclass
class Data:
    folder: Path
    config: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(args[0], "--config", str(self.config), "--data-dir", str(self.folder), *args[1:])


def run_cli(*args: str, python_code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")}
    cmd = [sys.executable, "-c", python_code, *args] if python_code else [sys.executable, "-m", "i2v_daemon.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def make_data(root: Path) -> Data:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.toml"
    config.write_text("# defaults only\n")
    return Data(folder=root / "data", config=config)


@pytest.fixture()
def empty(tmp_path: Path) -> Data:
    """A data folder whose database exists (a daemon ran once) and holds no job."""
    data = make_data(tmp_path)
    store = Store(f"sqlite:///{data.folder / 'jobs.db'}")
    store.create_schema()
    store.close()
    return data


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["show", "1"], ["cancel", "1"],
                                     ["retry", "1"], ["pause"], ["resume"]])
def test_a_command_that_only_reads_or_asks_never_creates_a_database(tmp_path: Path, command: list[str]) -> None:
    data = make_data(tmp_path)
    proc = data.cli(*command)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("i2v-daemon: there is no job database at ")
    assert "start the daemon once" in proc.stderr and "Traceback" not in proc.stderr
    assert not data.folder.exists()  # neither the database nor its folder was made


@pytest.fixture(scope="module")
def thousand(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """1,000 jobs put straight into the store; the newest five end in every status."""
    data = make_data(tmp_path_factory.mktemp("thousand"))
    store = Store(f"sqlite:///{data.folder / 'jobs.db'}")
    store.create_schema()
    for i in range(N_JOBS):
        req = JobRequest(name=f"job{i:04d}", inputs=(f"job{i:04d}.png",), intake_key=f"key{i}", params=PARAMS)
        store.enqueue(req, now=T0 + timedelta(seconds=i))
    newest = [j.id for j in store.list_jobs(5)]  # newest first
    later = T0 + timedelta(hours=1)

    def claim(job_id: int) -> None:
        assert store.claim_next("w", lease_seconds=60, now=later, job_id=job_id) is not None

    claim(newest[0])
    store.heartbeat(newest[0], "w", lease_seconds=60, now=later, step=3, total_steps=4)
    claim(newest[1])
    store.update_running(newest[1], "w", effective={"width": 768, "height": 512, "num_frames": 8})
    store.finish(newest[1], "w", JobStatus.SUCCEEDED, now=later, output="/out/job0998/job0998.mp4")
    claim(newest[2])
    store.finish(newest[2], "w", JobStatus.FAILED, now=later, error={"type": "out_of_memory", "message": "too big"})
    claim(newest[3])
    store.finish(newest[3], "w", JobStatus.CANCELED, now=later, error={"type": "canceled", "message": "stopped"})
    store.close()
    return data


# ---- an empty database --------------------------------------------------------------------------


def test_status_on_an_empty_database_prints_zero_counts(empty: Data) -> None:
    proc = empty.cli("status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["queued 0  running 0  succeeded 0  failed 0  canceled 0"]


def test_status_json_on_an_empty_database_has_exactly_the_five_counts_and_no_jobs(empty: Data) -> None:
    proc = empty.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"counts", "jobs"}
    assert doc["counts"] == dict.fromkeys(COUNT_KEYS, 0)
    assert doc["jobs"] == []


# ---- a thousand jobs ----------------------------------------------------------------------------


def test_status_json_limit_returns_that_many_jobs_newest_first_with_the_contracts_keys(thousand: Data) -> None:
    proc = thousand.cli("status", "--json", "--limit", "5")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["counts"] == {"queued": 996, "running": 1, "succeeded": 1, "failed": 1, "canceled": 1}
    jobs = doc["jobs"]
    assert [j["name"] for j in jobs] == ["job0999", "job0998", "job0997", "job0996", "job0995"]
    ids = [j["id"] for j in jobs]
    assert ids == sorted(ids, reverse=True)
    for job in jobs:
        assert set(job) >= JOB_KEYS
        assert 0.0 <= job["progress"] <= 1.0
        assert job["output"] is None or isinstance(job["output"], str)
        assert job["error"] is None or isinstance(job["error"], str)
        assert job["created_at"].endswith("Z")
    running, succeeded, failed, canceled, queued = jobs
    assert running["status"] == "running" and running["progress"] == 0.75 and running["attempts"] == 1
    assert running["started_at"] == "2030-01-01T01:00:00Z" and running["finished_at"] is None
    assert succeeded["status"] == "succeeded" and succeeded["progress"] == 1.0
    assert succeeded["output"] == "/out/job0998/job0998.mp4" and succeeded["error"] is None
    assert (succeeded["width"], succeeded["height"], succeeded["num_frames"]) == (768, 512, 8)
    assert failed["status"] == "failed" and failed["error"] == "too big" and failed["output"] is None
    assert canceled["status"] == "canceled" and canceled["error"] == "stopped"
    assert queued["status"] == "queued" and queued["attempts"] == 0 and queued["started_at"] is None
    assert queued["num_frames"] == 8 and queued["width"] is None  # asked for, not yet known
    assert queued["created_at"] == "2030-01-01T00:16:35Z"  # job 995, enqueued at T0 + 995 s


def test_status_json_lists_twenty_jobs_by_default(thousand: Data) -> None:
    doc = json.loads(thousand.cli("status", "--json").stdout)
    assert len(doc["jobs"]) == 20
    assert doc["jobs"][-1]["name"] == "job0980"


def test_status_prints_one_line_per_job_under_the_counts(thousand: Data) -> None:
    proc = thousand.cli("status", "--limit", "5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "queued 996  running 1  succeeded 1  failed 1  canceled 1"
    assert lines[1].split()[:2] == ["ID", "STATUS"]
    body = lines[2:]
    assert len(body) == 5
    assert [line.split()[1] for line in body] == ["running", "succeeded", "failed", "canceled", "queued"]
    assert "75%" in body[0] and "/out/job0998/job0998.mp4" in body[1] and "too big" in body[2]


def test_status_with_a_limit_of_zero_prints_only_the_counts(thousand: Data) -> None:
    doc = json.loads(thousand.cli("status", "--json", "--limit", "0").stdout)
    assert doc["jobs"] == [] and sum(doc["counts"].values()) == N_JOBS


# ---- no GPU stack -------------------------------------------------------------------------------

PROBE = """
import json, sys
from i2v_daemon.cli import main as cli
codes = [cli.main(sys.argv[1:] + extra) for extra in ([], ["--json"])]
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}), file=sys.stderr)
"""


def test_status_never_imports_torch_or_diffusers(thousand: Data) -> None:
    proc = run_cli(
        "status", "--config", str(thousand.config), "--data-dir", str(thousand.folder), python_code=PROBE
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"codes": [0, 0], "heavy": []}

