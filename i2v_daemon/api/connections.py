"""What `serve` does with each HTTP connection: deadlines, a cap that sheds silent ones, and JSON refusals.

uvicorn's h11 protocol waits for ever for a request that never comes, for half a header block and
for a body that trickles in; each such connection holds a file descriptor, and once the process's
limit (1,024 by default) is reached nothing more is accepted, /healthz included. `Connection` is
that protocol with what it lacks:

- a request's line and headers must be complete within `api_header_timeout_seconds` of the
  connection opening (or of the previous answer on a kept-alive one): else 408, closed (a connection
  that sent nothing is just closed); a byte at a time does not reset the clock;
- a body may pause at most `api_read_timeout_seconds`, and past that long it must have averaged
  `MIN_BODY_RATE`; else 408, closed. Time the server itself holds the body back does not count;
- at `max_connections` open (fewer than the descriptors the process may have), a new connection
  closes the one that has waited longest for its request, as nginx reuses idle keep-alive
  connections; only when every connection is busy with a request does the newcomer get 503. A crowd
  of silent connections never keeps /healthz or the page out;
- an answer sent before the request's body was read (401, 413, 415, ...) says `Connection: close`,
  and the connection closes instead of reading the rest of what was announced;
- what is not HTTP/1.1 at all gets the API's JSON error (400 `malformed`, 431 `too_large`).

uvicorn's own idle keep-alive timeout (`KEEP_ALIVE_SECONDS` after an answer) still applies.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from i2v_daemon.logs import get_logger
from i2v_daemon.settings import Settings

#: Slowest average a body may arrive at once it has taken `api_read_timeout_seconds`: 1 KiB/s (a
#: 64 MiB upload may take 18 hours; a trickle of a byte a second is dropped).
MIN_BODY_RATE = 1024
KEEP_ALIVE_SECONDS = 5  # uvicorn's default: an idle kept-alive connection is closed after this
#: The kernel queue of connections not accepted yet, and how many asyncio accepts in one go.
BACKLOG = 128
#: Descriptors kept for everything but connections: the database, files served and uploaded, threads,
#: logs, and a burst of `BACKLOG` accepted before the oldest silent ones are closed.
RESERVED_DESCRIPTORS = BACKLOG + 96
_TICK = 0.25  # how often a body's pace is looked at, at most


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    read_timeout: float
    max_connections: int
    min_body_rate: float = MIN_BODY_RATE


def limits(settings: Settings, descriptors: int | None = None) -> Limits:
    """The limits of `settings`, the connection cap lowered to fit the descriptors the process may open."""
    soft = descriptors if descriptors is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = settings.api_max_connections if soft == resource.RLIM_INFINITY else soft - RESERVED_DESCRIPTORS
    return Limits(
        header_timeout=settings.api_header_timeout_seconds, read_timeout=settings.api_read_timeout_seconds,
        max_connections=max(16, min(settings.api_max_connections, room)),
    )


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config arguments for connections and proxies (logged once, as `api_connections`)."""
    lim = limits(settings)
    trusted = list(settings.api_trusted_proxies)
    get_logger().info(
        "api_connections", max_connections=lim.max_connections,
        descriptors=resource.getrlimit(resource.RLIMIT_NOFILE)[0], header_timeout_s=lim.header_timeout,
        read_timeout_s=lim.read_timeout, keep_alive_s=KEEP_ALIVE_SECONDS, trusted_proxies=trusted,
    )
    protocol = type("Connection", (Connection,), {"limits": lim})
    # X-Forwarded-For/-Proto are believed only from the proxies named: any local user can send them.
    return {
        "http": protocol, "timeout_keep_alive": KEEP_ALIVE_SECONDS, "backlog": BACKLOG,
        "proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None,
    }


class _Connection(h11.Connection):
    """h11's connection, remembering why the last request could not be read (uvicorn drops the error)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as err:
            self.last_error = err
            raise


class Connection(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines, a shedding connection cap and JSON refusals."""

    limits: ClassVar[Limits] = Limits(header_timeout=10.0, read_timeout=30.0, max_connections=800)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        most = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self.conn = _Connection(h11.SERVER, most)
        self.app = _CloseUnread(self.app)
        self.waiting_since: float | None = None  # when this connection began waiting for a request's headers
        self._heard = False  # some bytes of the awaited request have come
        self._deadline: Any = None  # the header deadline's timer
        self._body_timer: Any = None
        self._body = _Pace()

    # ---- the connection's life ----------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._stop_body_watch()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.waiting_since is not None:
            self._heard = True
        if self._body_timer is not None:
            self._body.arrived(len(data))
        super().data_received(data)
        self._after_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may already read a pipelined next request
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            if self.waiting_since is None:
                self._await_request()  # the next request on this kept-alive connection, within the same deadline
        else:
            self._after_events()

    def _after_events(self) -> None:
        """A request's headers are in: stop the header clock; watch its body's pace while one is coming."""
        state = self.conn.their_state
        if self.waiting_since is not None and state is not h11.IDLE:
            self._stop_waiting()
        if state is h11.SEND_BODY and self._body_timer is None and not self.transport.is_closing():
            self._body = _Pace()
            self._body_timer = self.loop.call_later(_TICK, self._check_body)

    # ---- headers ----------------------------------------------------------------------------------

    def _await_request(self) -> None:
        self._stop_waiting()
        self._stop_body_watch()
        self.waiting_since = self.loop.time()
        self._heard = False
        self._deadline = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def _stop_waiting(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.waiting_since = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.waiting_since is None:
            return
        if self._heard:  # half a request: say why; a connection that said nothing is just closed
            self._give_up("headers", f"the request's headers did not arrive within {self.limits.header_timeout:g} s")
        else:
            self._close()

    # ---- bodies -----------------------------------------------------------------------------------

    def _check_body(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if (self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY or cycle is None
                or cycle.response_complete):
            return
        now = self.loop.time()
        self._body.tick(now, held_back=self.flow.read_paused)  # paused by us: the app has not read it yet
        why = self._body.too_slow(self.limits)
        if why is None:
            self._body_timer = self.loop.call_later(_TICK, self._check_body)
            return
        self._give_up("body", why, received=self._body.received)

    def _stop_body_watch(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # ---- making room ------------------------------------------------------------------------------

    def _make_room(self) -> None:
        idle = [c for c in self.connections if isinstance(c, Connection) and c is not self
                and c.waiting_since is not None and not c.transport.is_closing()]
        if idle:
            oldest = min(idle, key=lambda c: c.waiting_since or 0.0)
            oldest._close()
            return
        get_logger().warning("api_connections_full", open=len(self.connections), max=self.limits.max_connections,
                             fix="every connection is busy with a request; raise api_max_connections and LimitNOFILE")
        self._answer(503, "busy", "every connection this server may hold is busy; try again in a few seconds",
                     extra=[(b"retry-after", b"5")])

    # ---- answers the app never sees ---------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """A request that is not HTTP/1.1: the API's JSON error (h11's reason, its status hint), then close."""
        err: h11.RemoteProtocolError | None = getattr(self.conn, "last_error", None)
        status = err.error_status_hint if err is not None and err.error_status_hint in (400, 431) else 400
        reason = str(err) if err is not None and str(err) else "not an HTTP/1.1 request"
        if status == 431:
            message = "the request's line and headers are over 16 KiB; send fewer or shorter headers"
        else:
            message = f"the request is not valid HTTP/1.1 ({reason}); send a well-formed request"
        get_logger().info("http_request", method="", path="", status=status, error="malformed", reason=message,
                          client=(self.client or ("", 0))[0])
        self._answer(status, "too_large" if status == 431 else "malformed", message)

    def _give_up(self, phase: str, why: str, **fields: Any) -> None:
        get_logger().info("http_timeout", phase=phase, reason=why, client=(self.client or ("", 0))[0], **fields)
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self._answer(408, "timeout", f"{why}; send the whole request at once")
        else:
            self._close()

    def _answer(self, status: int, kind: str, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Write a whole JSON answer outside h11's bookkeeping and close: the connection ends with it."""
        from i2v_daemon.api.app import HEADERS

        body = json.dumps({"error": {"type": kind, "message": message}}).encode()
        reason = _REASONS.get(status, "Error").encode()
        lines = [
            b"HTTP/1.1 %d %s" % (status, reason), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close",
            *(k + b": " + v for k, v in [*(extra or []), *HEADERS]),
        ]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self._close()

    def _close(self) -> None:
        self._stop_waiting()
        self._stop_body_watch()
        if not self.transport.is_closing():
            self.transport.close()


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


class _Pace:
    """How a body is arriving: bytes, and the seconds spent waiting for them (not those we held it back)."""

    def __init__(self) -> None:
        self.received = 0
        self.waited = 0.0  # seconds the client could have sent
        self.silent = 0.0  # of those, since its last byte
        self._last_tick: float | None = None

    def arrived(self, n: int) -> None:
        self.received += n
        self.silent = 0.0

    def tick(self, now: float, *, held_back: bool) -> None:
        step = 0.0 if self._last_tick is None else now - self._last_tick
        self._last_tick = now
        if not held_back:
            self.waited += step
            self.silent += step

    def too_slow(self, lim: Limits) -> str | None:
        if self.silent >= lim.read_timeout:
            return f"the body paused for more than {lim.read_timeout:g} s"
        if self.waited >= lim.read_timeout and self.received < lim.min_body_rate * self.waited:
            return (f"the body came at {self.received / self.waited:.0f} bytes/s, under the "
                    f"{lim.min_body_rate / 1024:g} KiB/s every upload must average")
        return None


class _CloseUnread:
    """An answer that starts before the request's body was all read says `Connection: close`.

    h11 then closes the connection once the answer is out, instead of reading (and discarding) the
    rest of a body that may have been announced as gigabytes.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _announces_body(scope):
            await self.app(scope, receive, send)
            return
        read_all = False

        async def receive_counted() -> Message:
            nonlocal read_all
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                read_all = True
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not read_all:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"connection" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_counted, send_closing)


def _announces_body(scope: Scope) -> bool:
    for key, value in scope["headers"]:
        if key == b"transfer-encoding" or (key == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False
