"""The queue's clock, and time as the database stores it (naive UTC); the one home of both.

Every module that stamps or compares a job's times takes them from here, so a test can rely on
one convention: aware UTC in values, naive UTC in columns, microseconds in `updated_us`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_us() -> int:
    """Microseconds since the epoch on this host's clock: the `updated_us` every write stamps."""
    return time.time_ns() // 1000


def utcnow() -> datetime:
    """Now, as an aware UTC datetime: the default of every `now` argument."""
    return datetime.now(UTC)


def db_time(dt: datetime | None) -> datetime | None:
    """Stored as naive UTC: SQLite has no time zones, and one convention keeps comparisons right."""
    if dt is None:
        return None
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt


def aware(dt: datetime | None) -> datetime | None:
    """A stored (naive UTC) time read back as aware UTC."""
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt
