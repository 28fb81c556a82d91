"""Crash points for the crash tests: `I2V_TEST_CRASH_AT=NAME` kills the process at that point.

The tests run the real daemon in a subprocess and need it to die between two finishing steps
exactly as a power cut would (no cleanup, no flush). Unset, this costs one dict lookup.
"""

from __future__ import annotations

import os

#: The finishing steps, in order (see worker.py). A crash after any of them must be recoverable.
POINTS = ("video_written", "manifest_written", "destination_recorded", "folder_published")


def crashpoint(name: str) -> None:
    if os.environ.get("I2V_TEST_CRASH_AT") == name:
        os._exit(99)
