"""The API while `serve` waits for what it needs (the job database): 503s naming it, then the real app.

`serve` listens at once, so a health check and the people using the API hear what it waits for
instead of "connection refused": `/healthz` answers 503 with `{"ok": false, "waiting_for", "cause"}`,
every other path 503 with the API's JSON error (`not_ready`) and `Retry-After`. Once the wait is
over, `open` hands every request to the real application; nothing has to restart.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from i2v_daemon.api.app import HEADERS, RETRY_AFTER_SECONDS
from i2v_daemon.errors import NotReady


class Gate:
    def __init__(self, waiting: Callable[[], NotReady]) -> None:
        self.waiting = waiting  # what the wait is for now (it changes as the wait goes on)
        self.app: ASGIApp | None = None
        self._on_shutdown: Callable[[], Awaitable[None]] | None = None

    def open(self, app: ASGIApp, on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        """Everything is there: every request from now on goes to `app` (called from the waiting thread)."""
        self._on_shutdown = on_shutdown
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self.app
        if app is not None:
            await app(scope, receive, send)
        elif scope["type"] == "http":
            await self._unavailable(scope, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._on_shutdown is not None:
                    await self._on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _unavailable(self, scope: Scope, send: Send) -> None:
        err = self.waiting()
        if scope["path"] == "/healthz":
            body = {"ok": False, "waiting_for": err.what, "cause": err.cause}
        else:
            message = f"{err}; the API answers once it is there: try again in a few seconds"
            body = {"error": {"type": err.kind, "message": message}}
        data = json.dumps(body, ensure_ascii=False).encode()
        headers = [
            (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
            (b"retry-after", str(RETRY_AFTER_SECONDS).encode()), (b"cache-control", b"no-store"), *HEADERS,
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": data})
