"""The job database's schema under Alembic, on SQLite and PostgreSQL: upgrades keep every job, a
first-release database is adopted, many daemons starting at once upgrade it exactly once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    text,
)

from i2v_daemon.errors import ConfigError
from i2v_daemon.queue import migrate
from i2v_daemon.queue.jobs import JobRequest, JobStatus, Params
from i2v_daemon.queue.store import Store, metadata

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)

#: The job table exactly as the first release (commit e9f6a17) declared it and made it with `create_all`.
FIRST_RELEASE = MetaData()
Table(
    "jobs",
    FIRST_RELEASE,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("priority", Integer, nullable=False, default=0),
    Column("intake_key", String(128), nullable=False, unique=True),
    Column("inputs", JSON(none_as_null=True), nullable=False),
    Column("prompt", Text, nullable=False, default=""),
    Column("negative_prompt", Text, nullable=False, default=""),
    Column("params", JSON(none_as_null=True)),
    Column("rejection", JSON(none_as_null=True)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("not_before", DateTime),
    Column("worker_id", String(255)),
    Column("lease_until", DateTime),
    Column("progress", Float, nullable=False, default=0.0),
    Column("step", Integer, nullable=False, default=0),
    Column("total_steps", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("effective", JSON(none_as_null=True)),
    Column("tries", JSON(none_as_null=True)),
    Column("error", JSON(none_as_null=True)),
    Column("final_dir", String(1024), unique=True),
    Column("previous_dir", Text),
    Column("output", Text),
    Column("model", Text),
    Column("device", String(64)),
    Column("host", String(255)),
)


@pytest.fixture()
def bare(database_url: str) -> Iterator[Store]:
    """A store on an empty database whose schema the test makes itself."""
    s = Store(database_url, max_attempts=3)
    yield s
    s.close()


def insert_first_release_job(store: Store, name: str = "old") -> int:
    """A queued job written the way the first release's `enqueue` wrote it."""
    row = {
        "name": name, "status": "queued", "priority": 2, "intake_key": f"key-{name}",
        "inputs": [f"{name}.png", f"{name}.txt"], "prompt": f"{name} moves", "negative_prompt": "",
        "params": PARAMS.as_dict(), "rejection": None, "attempts": 0, "max_attempts": 3,
        "created_at": T0.replace(tzinfo=None), "progress": 0.0, "step": 0, "total_steps": 0,
        "cancel_requested": False, "tries": [],
    }
    with store.engine.begin() as conn:
        return conn.execute(FIRST_RELEASE.tables["jobs"].insert().values(**row)).inserted_primary_key[0]


def schema_drift(store: Store, target: MetaData) -> list:
    with store.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), target)


def assert_the_old_job_survived(store: Store, job_id: int) -> None:
    job = store.get(job_id)
    assert job is not None
    assert (job.name, job.status, job.priority, job.attempts) == ("old", JobStatus.QUEUED, 2, 0)
    assert job.inputs == ("old.png", "old.txt") and job.params == PARAMS and job.created_at == T0
    assert "intake_host" not in job.extra
    claimed = store.claim_next("host-b/7/cuda:1", lease_seconds=60, host="host-b", device="cuda:1")
    assert claimed is not None and claimed.id == job_id and claimed.attempts == 1
    store.finish(job_id, "host-b/7/cuda:1", JobStatus.SUCCEEDED, output="/out/old/old.mp4")
    assert store.get(job_id).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]


# ---- a new database ------------------------------------------------------------------------------


def test_a_new_database_is_created_at_the_newest_revision_and_a_second_upgrade_does_nothing(bare: Store) -> None:
    first = bare.create_schema()
    assert (first.before, first.after, first.stamped) == (None, migrate.head(), False) and first.changed
    assert migrate.current_revision(bare.engine) == migrate.head()
    again = bare.create_schema()
    assert (again.before, again.after, again.changed) == (migrate.head(), migrate.head(), False)


def test_the_migrations_make_exactly_the_schema_the_code_uses(bare: Store) -> None:
    bare.create_schema()
    assert schema_drift(bare, metadata) == []


def test_the_baseline_migration_makes_exactly_the_first_releases_table(bare: Store) -> None:
    migrate.upgrade(bare.engine, migrate.BASELINE)
    assert migrate.current_revision(bare.engine) == migrate.BASELINE
    assert schema_drift(bare, FIRST_RELEASE) == []


# ---- upgrading a database that has jobs -----------------------------------------------------------


def test_a_job_written_at_the_baseline_survives_the_upgrade_to_head_and_the_new_columns_work(bare: Store) -> None:
    migrate.upgrade(bare.engine, migrate.BASELINE)
    old = insert_first_release_job(bare)

    up = bare.create_schema()
    assert (up.before, up.after, up.stamped) == (migrate.BASELINE, migrate.head(), False)
    new, created = bare.enqueue(
        JobRequest(name="new", inputs=("new.png",), intake_key="key-new", params=PARAMS), now=T0, host="host-a"
    )
    assert created and new.extra["intake_host"] == "host-a"
    assert_the_old_job_survived(bare, old)


def test_a_first_release_database_without_alembic_version_is_stamped_as_the_baseline_then_upgraded(
    bare: Store,
) -> None:
    FIRST_RELEASE.create_all(bare.engine)  # what every user of the first release has
    old = insert_first_release_job(bare)
    assert migrate.current_revision(bare.engine) is None

    up = bare.create_schema()
    assert (up.before, up.after, up.stamped) == (migrate.BASELINE, migrate.head(), True)
    assert migrate.current_revision(bare.engine) == migrate.head()
    assert schema_drift(bare, metadata) == []
    assert_the_old_job_survived(bare, old)
    assert bare.create_schema().changed is False


def test_a_database_from_a_newer_release_is_refused_with_a_message_that_says_what_to_do(bare: Store) -> None:
    bare.create_schema()
    with bare.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(ConfigError, match=r"revision 9999, newer than this i2v-daemon .*upgrade i2v-daemon"):
        bare.create_schema()


# ---- several daemons starting at once --------------------------------------------------------------


def _start_up(url: str, start, out: str) -> None:
    store = Store(url)
    start.wait()
    up = store.create_schema()
    store.close()
    Path(out).write_text(json.dumps([up.before, up.after, up.changed]))


@pytest.mark.parametrize("first_release", [False, True], ids=["empty", "first-release"])
def test_daemons_starting_at_the_same_moment_upgrade_the_schema_exactly_once(
    bare: Store, tmp_path: Path, first_release: bool
) -> None:
    if first_release:
        FIRST_RELEASE.create_all(bare.engine)
        old = insert_first_release_job(bare)
    n = 4
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(n)
    outs = [tmp_path / f"up{i}.json" for i in range(n)]
    procs = [ctx.Process(target=_start_up, args=(bare.url, start, str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [json.loads(o.read_text()) for o in outs]
    assert sum(changed for _, _, changed in results) == 1, results
    assert all(after == migrate.head() for _, after, _ in results)
    assert migrate.current_revision(bare.engine) == migrate.head()
    assert inspect(bare.engine).has_table("jobs")
    if first_release:
        assert_the_old_job_survived(bare, old)


# ---- `i2v-daemon migrate` -------------------------------------------------------------------------


def test_the_migrate_command_creates_or_upgrades_the_schema_prints_the_revision_and_exits_0(
    database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("# defaults only\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")}

    def migrate_cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "i2v_daemon.cli", "migrate", "--config", str(config), "--data-dir",
             str(tmp_path / "data"), "--database-url", database_url],
            capture_output=True, text=True, timeout=60, env=env,
        )

    first = migrate_cli()
    assert first.returncode == 0, first.stderr
    assert f"schema revision {migrate.head()} (upgraded from an empty database)" in first.stdout
    assert ":***@" in first.stdout or "sqlite" in first.stdout  # never the password
    second = migrate_cli()
    assert second.returncode == 0, second.stderr
    assert f"schema revision {migrate.head()} (already up to date)" in second.stdout
