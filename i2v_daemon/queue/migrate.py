"""The job database's schema: brought to this release's Alembic revision at start-up, once.

Several daemons (one per GPU, several hosts) may start at the same moment against one database,
so the upgrade runs inside one transaction that first takes a lock: an advisory lock on
PostgreSQL, `BEGIN IMMEDIATE` (the store's engine begins every write that way) on SQLite. Both
databases have transactional DDL, so an upgrade is applied whole or not at all. Whoever gets the
lock second finds the work done. A database made by the first release (`create_all`, no
`alembic_version` table) is recognised and stamped as the baseline before upgrading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import Connection

from i2v_daemon.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"  #: what the first release's `metadata.create_all` made
#: pg_advisory_xact_lock key: any constant that other applications sharing the database do not use.
PG_LOCK_KEY = 0x6932_7664_6D69_6772  # "i2vdmigr"


@dataclass(frozen=True)
class Upgrade:
    """What `upgrade` found and left: revisions before and after, and whether it stamped a first-release database."""

    before: str | None
    after: str | None
    stamped: bool = False

    @property
    def changed(self) -> bool:
        return self.before != self.after or self.stamped


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    """The newest revision this release knows."""
    return ScriptDirectory.from_config(_config()).get_current_head()  # type: ignore[return-value]


def current_revision(engine: Engine) -> str | None:
    """The database's revision (None: empty, or made by the first release and not yet stamped)."""
    with engine.connect().execution_options(readonly=True) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> Upgrade:
    """Bring the schema to `revision` (default: the newest); safe to call from many processes at once."""
    script = ScriptDirectory.from_config(_config())
    target = script.get_revision(revision).revision  # type: ignore[union-attr]
    before = current_revision(engine)
    _check_known(script, before)
    if before == target:
        return Upgrade(before, before)  # the common start-up: nothing to do, no lock taken
    with engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite: one upgrader at a time
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        before = MigrationContext.configure(conn).get_current_revision()  # again: someone may have won
        stamped = False
        if before is None and inspect(conn).has_table("jobs"):
            command.stamp(_config(conn), BASELINE)  # a first-release database: its table is the baseline
            before, stamped = BASELINE, True
        _check_known(script, before)
        command.upgrade(_config(conn), revision)
        after = MigrationContext.configure(conn).get_current_revision()
    return Upgrade(before, after, stamped)


def _check_known(script: ScriptDirectory, revision: str | None) -> None:
    if revision is None:
        return
    known = {s.revision for s in script.walk_revisions()}
    if revision not in known:
        raise ConfigError(
            f"database_url / I2V_DATABASE_URL: the job database is at schema revision {revision}, newer than "
            f"this i2v-daemon knows ({', '.join(sorted(known))}); upgrade i2v-daemon on this host"
        )
