"""Job databases for tests: a SQLite file, or a fresh PostgreSQL database made from $I2V_TEST_POSTGRES_URL.

`I2V_TEST_POSTGRES_URL` names a database the tests may connect to as a role with CREATEDB, e.g.
`postgresql+psycopg://i2v:i2v@127.0.0.1:5432/i2v_test`; each test gets its own database beside
it, dropped afterwards. `.ci/run` starts a server and sets the variable. Without it the
PostgreSQL cases skip, except under CI=true, where they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

POSTGRES_URL_ENV = "I2V_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")


def postgres_admin_url() -> str:
    """The URL from the environment; skips the test (fails it under CI) when it is not set."""
    url = os.environ.get(POSTGRES_URL_ENV, "").strip()
    if url:
        return url
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but {POSTGRES_URL_ENV} is not set: .ci/run must start PostgreSQL and export it")
    pytest.skip(
        f"PostgreSQL tests need {POSTGRES_URL_ENV}=postgresql+psycopg://USER:PASSWORD@127.0.0.1:5432/DB "
        "(a role with CREATEDB); .ci/run starts a server and sets it"
    )


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database on the test server; dropped (its connections closed) afterwards."""
    admin_url = make_url(postgres_admin_url())
    name = f"i2v_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@contextmanager
def database(backend: str, folder: Path) -> Iterator[str]:
    """A URL of an empty job database of `backend` ("sqlite" lives in `folder`)."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'jobs.db'}"
    elif backend == "postgresql":
        with fresh_postgres_database() as url:
            yield url
    else:
        raise ValueError(f"unknown backend {backend!r}")


class OwnPostgres:
    """A PostgreSQL cluster of one test's own (its own folder and port), to stop and start at will.

    Tests that take the server away must never touch the shared one on $I2V_TEST_POSTGRES_URL: other
    tests use it. Runs as the `postgres` user (root only), trusting connections from 127.0.0.1.
    """

    def __init__(self, folder: Path, port: int, bin_dir: Path) -> None:
        self.folder = folder
        self.port = port
        self.bin = bin_dir
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/i2v"

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        import subprocess

        proc = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise AssertionError(f"{argv[0]} failed: {proc.stdout}{proc.stderr}\n{tail}")

    def start(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-l",
                          str(self.folder / "server.log"), "-w", "-t", "120", "-o",
                          f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.folder / "data" / "postmaster.pid").exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    """A fresh cluster with an empty database `i2v`, running; stopped and removed afterwards."""
    import shutil
    import subprocess
    import tempfile

    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if os.geteuid() != 0 or not bins or shutil.which("runuser") is None:
        pytest.skip("a PostgreSQL server of the test's own needs root and Debian's postgresql binaries")
    folder = Path(tempfile.mkdtemp(prefix="i2v-own-postgres-", dir="/tmp"))
    shutil.chown(folder, "postgres", "postgres")
    server = OwnPostgres(folder, free_port(), bins[-1].parent)
    try:
        server._as_postgres(str(server.bin / "initdb"), "-D", str(folder / "data"), "-U", "postgres",
                            "--auth-local=trust", "--auth-host=trust", "--encoding=UTF8", "--locale=C.UTF-8")
        server.start()
        subprocess.run(["runuser", "-u", "postgres", "--", str(server.bin / "psql"), "-h", str(folder), "-p",
                        str(server.port), "-U", "postgres", "-d", "postgres", "-q", "-c", "CREATE DATABASE i2v"],
                       check=True, capture_output=True, timeout=60)
        yield server
    finally:
        if server.running():
            with suppress(AssertionError):
                server.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)
