"""`create_app(settings, store)`: the FastAPI application of `i2v-daemon serve`, with JSON errors and safe headers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from i2v_daemon.api import auth, page, routes
from i2v_daemon.api.context import ApiError, Context, authenticated
from i2v_daemon.api.events import EventHub
from i2v_daemon.errors import NotReady
from i2v_daemon.logs import get_logger
from i2v_daemon.queue.store import Store
from i2v_daemon.service.readiness import database_problem
from i2v_daemon.settings import Settings

#: The page loads nothing from anywhere but here, and no other site may frame it.
CSP = (
    "default-src 'self'; img-src 'self'; media-src 'self'; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the sign-in URL carries the token; never pass it on
    (b"x-frame-options", b"DENY"),
    # No other origin may embed an answer (a poster in an <img>, a video) with a visitor's cookie.
    (b"cross-origin-resource-policy", b"same-origin"),
]
#: What a client is told to wait before asking again while the database is away (503).
RETRY_AFTER_SECONDS = 5
_STATUS_KIND = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 401: "unauthorized"}


def create_app(
    settings: Settings, store: Store, *, token: auth.Token | None = None, on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The API and page over `store` (opened by the caller, not migrated: the daemon migrates)."""
    if token is None:
        token, _ = auth.load_or_create_token(settings.filled("api_token_file"))
    hub = EventHub(store)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield
        await hub.close()

    # No docs pages: they load scripts from a CDN and would be open to anyone. The schema is at
    # /api/v1/openapi.json, behind the token like the rest.
    app = FastAPI(
        title="i2v-daemon", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
    )
    sessions = auth.Sessions(token, Path(str(settings.data_dir)) / auth.SESSIONS_FILE, settings.api_session_seconds)
    app.state.ctx = Context(settings=settings, store=store, token=token, hub=hub, sessions=sessions)
    app.include_router(routes.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/api/v1/openapi.json", include_in_schema=False, dependencies=[Depends(authenticated)])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    _errors(app)
    app.add_middleware(_Edge)
    return app


def refuse(request: Request, status: int, kind: str, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """The one way a request is refused: the JSON error, and its type and message on the request's log line."""
    request.state.refused = (kind, message)
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers or None)


def _errors(app: FastAPI) -> None:
    """The API's error boundary: every refusal is JSON with a 4xx and one log line (`http_request`), never a traceback.

    A route raises ApiError (the upload's errors are ApiErrors too); FastAPI's own validation and
    Starlette's HTTP errors are answered alike. Only what nobody foresaw is a 500 with its traceback.
    """

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        headers = {**err.headers, **({"WWW-Authenticate": 'Bearer realm="i2v-daemon"'} if err.status == 401 else {})}
        return refuse(request, err.status, err.kind, err.message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "header", "body"))
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg", "invalid request"))
        return refuse(request, 422, "invalid_input", message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = _STATUS_KIND.get(err.status_code, "error")
        message = str(err.detail)
        if err.status_code == 404:
            message = f"no such path {request.url.path}; the API is under /api/v1/ (README: HTTP API)"
        return refuse(request, err.status_code, kind, message, getattr(err, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, _err: ClientDisconnect) -> Response:
        request.state.refused = ("client_gone", "the client left before its request was read; nothing was kept")
        return Response(status_code=400)  # nobody is listening; the upload was discarded

    @app.exception_handler(DBAPIError)
    async def database_away(request: Request, err: DBAPIError) -> JSONResponse:
        """The database went away under a request (restarting, unreachable): 503 and when to ask again, not a 500."""
        judged = database_problem(err, str(request.app.state.ctx.settings.database_url))
        if not isinstance(judged, NotReady):
            return await crashed(request, err)
        get_logger().warning("api_database_unavailable", method=request.method, path=request.url.path,
                             waiting_for=judged.what, cause=judged.cause)
        message = f"{judged}; try again in a few seconds"
        return JSONResponse({"error": {"type": judged.kind, "message": message}}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        get_logger().error("api_request_failed", method=request.method, path=request.url.path, exc_info=err)
        message = "the server failed on this request; its log (journalctl -u i2v-daemon-api) says why"
        return JSONResponse({"error": {"type": "internal", "message": message}}, status_code=500)


class _Edge:
    """Safe headers on every answer, and one log line per request (the path only: a query may hold the token)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            refused = (scope.get("state") or {}).get("refused")
            why = {"error": refused[0], "reason": refused[1][:300]} if refused else {}
            get_logger().info(
                "http_request", method=scope["method"], path=scope["path"], status=status,
                ms=round((time.monotonic() - started) * 1000, 1), client=(scope.get("client") or ("", 0))[0], **why,
            )
