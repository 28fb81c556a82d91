"""What every request handler shares: the settings, the store, the token, the events hub; and the API's errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from i2v_daemon.api import auth
from i2v_daemon.api.events import EventHub
from i2v_daemon.files import job_dir
from i2v_daemon.queue.jobs import Job
from i2v_daemon.queue.store import Store
from i2v_daemon.settings import Settings


class ApiError(Exception):
    """An answer other than success: `{"error": {"type": kind, "message": message}}` with `status`."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.kind, "message": self.message}}


@dataclass
class Context:
    settings: Settings
    store: Store
    token: auth.Token
    hub: EventHub
    sessions: auth.Sessions

    def job_folders(self, job: Job) -> list[Path]:
        """Where a job's files are: its folder in output/ or failed/ once chosen, and work/<id>/ while it runs."""
        folders = [Path(job.final_dir)] if job.final_dir else []
        return [*folders, job_dir(str(self.settings.work_dir), job.id)]

    def inside_job(self, job: Job, path: Path) -> Path | None:
        """`path` resolved, if it is a regular file inside one of the job's folders (and those inside ours)."""
        s = self.settings
        roots = [os.path.realpath(str(p)) for p in (s.output_dir, s.failed_dir, s.work_dir)]
        real = os.path.realpath(path)
        for folder in self.job_folders(job):
            home = os.path.realpath(folder)
            if not any(_within(home, root) for root in roots):
                continue  # a folder the database names outside our folders is never served
            if _within(real, home) and os.path.isfile(real):
                return Path(real)
        return None


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root and path != root


def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def authenticated(request: Request) -> str:
    """The dependency every `/api/` route has: "bearer" or "cookie", or a 401/403 answer."""
    try:
        ctx = context(request)
        return auth.check(request, ctx.token, ctx.sessions)
    except auth.AuthError as err:
        raise ApiError(err.status, err.kind, str(err)) from None
