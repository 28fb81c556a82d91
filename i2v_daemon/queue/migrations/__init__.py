"""Alembic migrations of the job database, applied by `i2v_daemon.queue.migrate` (no alembic.ini needed).

A new revision: copy the newest file in versions/, give it the next number as `revision`, the
previous one as `down_revision`, and keep it additive (new nullable columns, new indexes), so
daemons of the previous version on other hosts keep working until they are upgraded too.
"""
