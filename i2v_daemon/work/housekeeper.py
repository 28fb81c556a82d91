"""The housekeeper: ends the jobs that need no GPU (a rejection, a cancel, a job out of attempts, a publish
that was interrupted) at once, even while the GPU worker is deep in a long job. It never generates.
"""

from __future__ import annotations

import socket
from datetime import datetime
from typing import TYPE_CHECKING

from i2v_daemon.errors import ConfigError, StopDaemon
from i2v_daemon.queue.store import Store
from i2v_daemon.work.closer import Attempt, Closer

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings


class Housekeeper:
    def __init__(self, settings: Settings, store: Store, closer: Closer, *, worker_id: str) -> None:
        self.s = settings
        self.store = store
        self.closer = closer
        self.worker_id = worker_id
        self.host = socket.gethostname()

    def run_once(self, now: datetime | None = None) -> bool:
        """Claim and end one job that needs no GPU; True if there was one (more may be waiting)."""
        job = self.store.claim_next(
            self.worker_id, lease_seconds=self.s.lease_seconds, now=now, host=self.host, device=self.s.device,
            housekeeping=True,
        )
        if job is None:
            return False
        attempt = Attempt(job)
        try:
            if not self.closer.end_without_gpu(attempt, worker_id=self.worker_id):
                # claim_next(housekeeping=True) hands out only jobs that need no GPU; were one to come, it is
                # refused as a worker without a model refuses it (the policy gives it back to the queue).
                raise ConfigError("model: this worker cannot generate videos")
        except StopDaemon:
            raise
        except Exception as err:
            self.closer.judge(attempt, err, worker_id=self.worker_id, stopping=False)
        return True
