"""One daemon per GPU, several hosts on one PostgreSQL: the same key for the same file from every
host, worker ids and `status` that say which host and GPU, a server that drops connections, the
systemd template unit."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from i2v_daemon.intake.staging import intake_key
from i2v_daemon.queue.clock import utcnow
from i2v_daemon.queue.jobs import JobRequest, JobStatus
from i2v_daemon.queue.store import Store
from i2v_daemon.settings import load_settings
from i2v_daemon.work.worker import dead_local_workers, make_worker_id
from tests.databases import fresh_postgres_database, postgres_admin_url

ROOT = Path(__file__).resolve().parents[2]


# ---- the intake key ------------------------------------------------------------------------------


def test_two_hosts_mounting_one_inbox_compute_the_same_intake_key(tmp_path: Path, monkeypatch) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files = [inbox / "cat.png", inbox / "cat.txt"]
    for f in files:
        f.write_bytes(f.name.encode())
    here = intake_key(inbox, files)

    # Host B mounts the share elsewhere, and its NFS client numbers the device differently.
    real_lstat = os.lstat

    class OtherClient:
        def __init__(self, st: os.stat_result) -> None:
            self._st = st

        def __getattr__(self, name: str):
            return getattr(self._st, name) if name != "st_dev" else self._st.st_dev + 4242

    monkeypatch.setattr(os, "lstat", lambda p: OtherClient(real_lstat(p)))
    assert intake_key(Path("/mnt/elsewhere/inbox"), files) == here


def test_a_new_copy_with_the_same_name_size_and_mtime_still_gets_a_new_key(tmp_path: Path) -> None:
    first = tmp_path / "cat.png"
    first.write_bytes(b"same bytes")
    st = first.stat()
    before = intake_key(tmp_path, [first])
    kept = first.rename(tmp_path / "kept.png")  # the first file lives on (in output/), keeping its inode
    again = tmp_path / "cat.png"
    again.write_bytes(b"same bytes")
    os.utime(again, ns=(st.st_atime_ns, st.st_mtime_ns))  # cp -p, rsync -a
    assert kept.exists() and again.stat().st_ino != st.st_ino
    assert intake_key(tmp_path, [again]) != before


# ---- worker ids and devices ----------------------------------------------------------------------


def test_worker_ids_name_the_host_the_process_and_the_device() -> None:
    wid = make_worker_id("cuda:1")
    assert wid == f"{socket.gethostname()}/{os.getpid()}/cuda:1"
    # A restarted daemon still recognises its dead predecessor on this host, device or not.
    dead = f"{socket.gethostname()}/999999999/cuda:0"
    assert dead_local_workers([wid, dead, "other-host/1/cuda:0"]) == [dead]


def test_a_daemon_on_one_gpu_claims_as_that_gpu(tmp_path: Path) -> None:
    from i2v_daemon.daemon import Daemon

    settings = load_settings(None, data_dir=tmp_path / "data", device="cuda:3")
    daemon = Daemon(settings)
    try:
        assert daemon.worker.worker_id.endswith("/cuda:3") and daemon.worker.device == "cuda:3"
        daemon.store.enqueue(JobRequest(name="cat", inputs=("cat.png",), intake_key="k"), host="h")
        claimed = daemon.store.claim_next(
            daemon.worker.worker_id, lease_seconds=60, host=daemon.worker.host, device=daemon.worker.device
        )
        assert claimed is not None and (claimed.host, claimed.device) == (socket.gethostname(), "cuda:3")
    finally:
        daemon.store.close()


# ---- status ---------------------------------------------------------------------------------------


def test_status_shows_which_host_and_gpu_ran_each_job(database_url: str, tmp_path: Path) -> None:
    store = Store(database_url)
    store.create_schema()
    for name, host, device in [("a", "gpu-box-1", "cuda:0"), ("b", "gpu-box-2", "cuda:1"), ("c", None, None)]:
        job, _ = store.enqueue(JobRequest(name=name, inputs=(f"{name}.png",), intake_key=name), host="intake-host")
        if host:
            wid = f"{host}/1/{device}"
            store.claim_next(wid, lease_seconds=60, host=host, device=device, job_id=job.id)
            store.finish(job.id, wid, JobStatus.SUCCEEDED, output=f"/out/{name}/{name}.mp4")
    store.close()
    config = tmp_path / "config.toml"
    config.write_text("# defaults only\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")}

    def status(*extra: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "i2v_daemon.cli", "status", "--config", str(config), "--database-url",
             database_url, *extra],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    lines = status().splitlines()
    header = next(line for line in lines if line.split()[:2] == ["ID", "STATUS"])
    assert "HOST/DEVICE" in header
    rows = {line.split()[-1] if "/out/" not in line else line.split()[-2]: line for line in lines if "  " in line}
    assert "gpu-box-1/cuda:0" in rows["a"] and "gpu-box-2/cuda:1" in rows["b"]
    assert re.search(r"\s-\s+c$", rows["c"])
    jobs = {j["name"]: j for j in json.loads(status("--json"))["jobs"]}
    assert (jobs["a"]["host"], jobs["a"]["device"]) == ("gpu-box-1", "cuda:0")
    assert (jobs["c"]["host"], jobs["c"]["device"]) == (None, None)


# ---- PostgreSQL: a server that drops connections, clocks ---------------------------------------------


@pytest.fixture()
def pg_store() -> Iterator[Store]:
    with fresh_postgres_database() as url:
        store = Store(url)
        store.create_schema()
        yield store
        store.close()


def test_the_store_survives_the_server_dropping_its_connections(pg_store: Store) -> None:
    job, _ = pg_store.enqueue(JobRequest(name="cat", inputs=("cat.png",), intake_key="k"))
    claimed = pg_store.claim_next("w", lease_seconds=60)
    assert claimed is not None
    # What a server restart or a failover does to every pooled connection.
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        killed = conn.execute(
            text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :db"),
            {"db": pg_store.engine.url.database},
        ).scalar_one()
    admin.dispose()
    assert killed >= 1
    assert pg_store.heartbeat(job.id, "w", lease_seconds=60) is False  # a fresh connection, no error
    pg_store.finish(job.id, "w", JobStatus.SUCCEEDED)
    assert pg_store.counts()["succeeded"] == 1


def test_no_transaction_stays_open_between_the_stores_calls(pg_store: Store) -> None:
    # A GPU works for minutes between two calls; an open transaction would hold locks (and block
    # VACUUM) all that time. Leases, not transactions, keep a running job ours.
    job, _ = pg_store.enqueue(JobRequest(name="cat", inputs=("cat.png",), intake_key="k"))
    assert pg_store.claim_next("w", lease_seconds=60) is not None
    pg_store.heartbeat(job.id, "w", lease_seconds=60, step=1, total_steps=2)
    pg_store.get(job.id)
    with pg_store.engine.connect() as conn:
        open_elsewhere = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
            )
        ).scalar_one()
    assert open_elsewhere == 0


def test_the_database_servers_clock_is_compared_with_ours(pg_store: Store, tmp_path: Path) -> None:
    assert abs(pg_store.clock_offset()) < 5  # type: ignore[arg-type]
    assert pg_store.clock_offset(now=utcnow() - timedelta(seconds=100)) == pytest.approx(100, abs=5)
    sqlite = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    assert sqlite.clock_offset() is None
    sqlite.close()


def test_a_plain_postgresql_url_uses_the_psycopg_driver_that_ships_with_the_daemon(pg_store: Store) -> None:
    plain = pg_store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    store = Store(plain)
    try:
        assert store.engine.driver == "psycopg" and store.counts()["queued"] == 0
    finally:
        store.close()


# ---- the systemd template unit ----------------------------------------------------------------------


def _directives(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_per_gpu_template_unit_is_the_main_unit_with_a_device_per_instance() -> None:
    main = _directives(ROOT / "systemd" / "i2v-daemon.service")
    template = _directives(ROOT / "systemd" / "i2v-daemon@.service")
    per_gpu = [line for line in template if line not in main]
    assert sorted(per_gpu) == sorted([
        "Description=i2v-daemon on GPU %i: images and prompts in a folder become videos",
        "Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID",
        "ExecStart=/opt/i2v-daemon/.venv/bin/i2v-daemon run --device cuda:%i",
        "Environment=I2V_METRICS_TEXTFILE=%S/i2v-daemon/metrics/i2v-daemon-gpu%i.prom",
    ])
    only_main = [line for line in main if line not in template]
    assert all(line.startswith(("Description=", "ExecStart=")) for line in only_main), only_main
    # Same state folder and config as the main unit: one inbox, one database, one model cache.
    for shared in ("StateDirectory=i2v-daemon", "ConfigurationDirectory=i2v-daemon", "CacheDirectory=i2v-daemon"):
        assert shared in template


def test_a_sqlite_file_on_a_network_share_is_warned_about(tmp_path: Path, monkeypatch) -> None:
    from structlog.testing import capture_logs

    from i2v_daemon import daemon

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        with capture_logs() as local:
            daemon._warn_if_sqlite_on_a_network_share(store)
        monkeypatch.setattr(daemon, "filesystem_type", lambda _path: "nfs4")
        with capture_logs() as shared:
            daemon._warn_if_sqlite_on_a_network_share(store)
    finally:
        store.close()
    assert local == []
    assert [(e["event"], e["filesystem"]) for e in shared] == [("sqlite_on_network_filesystem", "nfs4")]
    assert "PostgreSQL" in shared[0]["fix"]
