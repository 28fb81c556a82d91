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
from contextlib import contextmanager
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
