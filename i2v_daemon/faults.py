"""Faults the crash and stall tests inject into the real daemon process, through its environment.

`I2V_TEST_CRASH_AT=NAME` kills the process at that point, as a power cut would (no cleanup, no
flush); `I2V_TEST_HANG_AT=PHASE` makes the worker hang, using no CPU and doing no I/O, when the
job enters that phase (a driver that never returns). `I2V_TEST_READ_ONLY_FLAG=FILE`: while FILE
exists, the start-up write check of every folder fails with EROFS, as a folder on a read-only mount
does (for tests that cannot mount one: they do not run as root); removing FILE is the remount. The
tests run the daemon in a subprocess, so its environment is the one seam that reaches it. Unset,
each costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import time

#: The finishing steps, in order (see finish.py). A crash after any of them must be recoverable.
POINTS = ("video_written", "signed", "manifest_written", "destination_recorded", "folder_published")
#: After the status (and the notifications owed with it) were committed, before any was sent.
FINISHED = "job_finished"
#: The staging steps (see intake.py): rows inserted, files moved (not yet synced), queued.
STAGING_POINTS = ("rows_staged", "files_moved", "jobs_queued")


def crashpoint(name: str) -> None:
    if os.environ.get("I2V_TEST_CRASH_AT") == name:
        os._exit(99)


def hangpoint(phase: str) -> None:
    if os.environ.get("I2V_TEST_HANG_AT") == phase:
        while True:
            time.sleep(3600)


def write_fault(path: str) -> None:
    """Raise EROFS for `path` while the `I2V_TEST_READ_ONLY_FLAG` file exists (the start-up write check only)."""
    flag = os.environ.get("I2V_TEST_READ_ONLY_FLAG")
    if flag and os.path.exists(flag):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
