"""`i2v-daemon serve`: the API and page in their own process (no PyTorch), on uvicorn.

The listening socket is bound here, before uvicorn starts, so a bad address or a port in use is
one clear line and exit status 78 instead of a traceback; systemd does not restart into it.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from i2v_daemon.api import auth
from i2v_daemon.errors import ConfigError, DatabaseGone
from i2v_daemon.logs import get_logger
from i2v_daemon.queue.schema import HEAD
from i2v_daemon.queue.store import Store
from i2v_daemon.settings import Settings
from i2v_daemon.views.jobs import job_summary

EX_OK, EX_FAILED, EX_CONFIG = 0, 1, 78
# Loggers in this package are fetched when used: one bound at import would keep structlog's default
# output (stdout) if the package was imported before `logs.configure`.


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def loopback(self) -> bool:
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback

    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}/" if ":" in self.host else f"http://{self.host}:{self.port}/"


def parse_listen(value: str) -> Listen:
    """`HOST:PORT` (IPv6 in brackets: `[::1]:8765`); HOST is an IP address or `localhost`."""
    host, sep, port = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"api_listen / --listen: {value!r}: write an IPv6 address in brackets, e.g. [::1]:8765")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"api_listen / --listen: {value!r} is not HOST:PORT, e.g. 127.0.0.1:8765 or [::1]:8765")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"api_listen / --listen: {host!r} is not an IP address; use one such as 127.0.0.1 (or localhost)"
            ) from None
    return Listen("127.0.0.1" if host == "localhost" else host, int(port))


def bind(listen: Listen) -> socket.socket:
    sock = socket.socket(listen.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listen.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        hint = "another program (or another serve) listens there; stop it or pick another port with --listen" \
            if err.errno == 98 else "use an address of this machine, e.g. 127.0.0.1"
        raise ConfigError(f"api_listen / --listen: cannot listen on {listen.url()}: {err.strerror}; {hint}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, listen: str | None = None) -> int:
    """Run the API until SIGTERM/SIGINT on `listen or settings.api_listen`; returns the exit status."""
    try:
        where = parse_listen(listen or settings.api_listen)
        if not where.loopback:
            get_logger().warning(
                "api_listen_not_loopback", address=where.url(),
                risk="anyone who can reach this address may try the token; TLS is not served here",
                fix="keep 127.0.0.1 and put a TLS reverse proxy in front, or restrict it with a firewall",
            )
        token, created = auth.load_or_create_token(settings.api_token_file)  # type: ignore[arg-type]
        sock = bind(where)
        where = Listen(where.host, sock.getsockname()[1])  # the port the kernel chose for :0
    except ConfigError as err:
        print(f"i2v-daemon: {err}", file=sys.stderr)
        return EX_CONFIG
    if created:
        get_logger().info("api_token_created", file=str(settings.api_token_file), mode="0600")
    elif auth.readable_by_others(settings.api_token_file):  # type: ignore[arg-type]
        get_logger().warning("api_token_readable_by_others", file=str(settings.api_token_file), fix="chmod 600 it")
    try:
        store = _open_store(settings)
    except (NotYet, ConfigError) as err:
        sock.close()
        print(f"i2v-daemon: {err}", file=sys.stderr)
        return EX_FAILED if isinstance(err, NotYet) else EX_CONFIG  # not yet: systemd tries again shortly
    try:
        return _run(settings, store, token, sock, where)
    finally:
        store.close()


class NotYet(Exception):
    """The database is not ready for this release yet (none, or an older schema): `run` will make it so."""


def _open_store(settings: Settings) -> Store:
    """The store as `run` made it: never created, never migrated here (the daemon owns the schema)."""
    url: str = settings.database_url  # type: ignore[assignment]
    try:
        store = Store(url, max_attempts=settings.max_attempts, create=False, describe=job_summary)
        revision = store.revision()
    except DatabaseGone as err:
        raise NotYet(f"database_url / I2V_DATABASE_URL: {err}") from None
    except Exception as err:  # the server is down, the file unreadable: one line, and systemd tries again
        detail = str(getattr(err, "orig", None) or err).strip().splitlines()
        raise NotYet(
            f"database_url / I2V_DATABASE_URL: cannot open {safe_url(url)}: {detail[0] if detail else err!r}"
        ) from None
    if revision == HEAD:
        return store
    store.close()
    if revision is None or revision < HEAD:
        raise NotYet(
            f"database_url / I2V_DATABASE_URL: {safe_url(url)} is at schema revision {revision or 'none'}, this "
            f"release needs {HEAD}: start `i2v-daemon run` (or run `i2v-daemon migrate`) first"
        )
    raise ConfigError(
        f"database_url / I2V_DATABASE_URL: {safe_url(url)} is at schema revision {revision}, newer than this "
        f"i2v-daemon's {HEAD}: upgrade i2v-daemon on this host"
    )


def _run(settings: Settings, store: Store, token: auth.Token, sock: socket.socket, where: Listen) -> int:
    import uvicorn

    from i2v_daemon.api.app import create_app
    from i2v_daemon.service.systemd import Notifier

    notifier = Notifier.from_env()

    def ready() -> None:
        get_logger().info("api_ready", url=where.url(), database=safe_url(settings.database_url or ""),
                 token_file=str(settings.api_token_file))
        notifier.ready()  # Type=notify: `systemctl start` returns once the socket is served

    app = create_app(settings, store, token=token, on_ready=ready)
    # access_log off: its lines carry the query string, and `/?token=` must never reach a log (ours
    # logs the path only). Proxy headers are believed from 127.0.0.1 alone: a TLS proxy on this host.
    config = uvicorn.Config(
        app, log_config=None, access_log=False, server_header=False, proxy_headers=True,
        forwarded_allow_ips="127.0.0.1", timeout_graceful_shutdown=3, lifespan="on",
    )
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(_logged_by_us)
    app.state.ctx.hub.stopping = lambda: server.should_exit  # event streams end so shutdown need not wait
    # uvicorn handles SIGTERM/SIGINT while it runs, then restores the handlers it found and raises the
    # signal again. These are what it finds: the signal has been answered by a clean stop, exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    notifier.stopping()
    get_logger().info("api_stopped")
    return EX_OK


def _logged_by_us(record: logging.LogRecord) -> bool:
    """Drop uvicorn's copy of a request's traceback: `api_request_failed` logged it once, with the request."""
    return record.getMessage() != "Exception in ASGI application"


def safe_url(url: str) -> str:
    """The database URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured URL"
