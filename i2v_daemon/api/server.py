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
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from i2v_daemon.api import auth
from i2v_daemon.errors import ConfigError, DatabaseGone, NotReady
from i2v_daemon.logs import get_logger
from i2v_daemon.queue.schema import HEAD
from i2v_daemon.queue.store import Store
from i2v_daemon.service.readiness import Probe, Waiter, database_problem, database_what, os_problem
from i2v_daemon.settings import Settings
from i2v_daemon.views.jobs import job_summary

EX_OK, EX_CONFIG = 0, 78
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
    """Run the API until SIGTERM/SIGINT on `listen or settings.api_listen`; returns the exit status.

    What can never work (a bad address, a port in use, a bad token file, refused credentials, a
    newer schema) is exit 78 at once. What is not there yet (the database not accepting connections,
    or not made or upgraded by `run` yet; a read-only share) is waited for while the socket already
    answers: 503 naming it, then the API, without a restart. `run` judges the same causes the same way.
    """
    try:
        where = parse_listen(listen or settings.api_listen)
        if not where.loopback:
            get_logger().warning(
                "api_listen_not_loopback", address=where.url(),
                risk="anyone who can reach this address may try the token; TLS is not served here",
                fix="keep 127.0.0.1 and put a TLS reverse proxy in front, or restrict it with a firewall",
            )
        sock = bind(where)
        where = Listen(where.host, sock.getsockname()[1])  # the port the kernel chose for :0
    except ConfigError as err:
        print(f"i2v-daemon: {err}", file=sys.stderr)
        return EX_CONFIG
    needs = _Needs(settings)
    try:
        pending = Waiter.look(needs.probes())
    except ConfigError as err:
        sock.close()
        print(f"i2v-daemon: {err}", file=sys.stderr)
        return EX_CONFIG
    try:
        return _run(settings, needs, sock, where, pending)
    finally:
        needs.close()


class _Needs:
    """What `serve` needs before it answers for real: its token and the job database, each looked for until there."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.token: auth.Token | None = None
        self.store: Store | None = None

    def probes(self) -> list[Probe]:
        return [Probe("database", self._database), Probe("api_token_file", self._token)]

    def _token(self) -> None:
        if self.token is not None:
            return
        if self.store is None:  # a mistyped --data-dir must not be made, nor a token left in it
            raise NotReady("the API token", "it is read or made once the database is there")
        path = Path(str(self.s.api_token_file))
        try:
            self.token, created = auth.load_or_create_token(path)
        except OSError as err:  # its folder cannot be written: a read-only share waits, a permission is 78
            raise os_problem(err, "api_token_file", path.parent, "cannot make the token file in") from None
        if created:
            get_logger().info("api_token_created", file=str(path), mode="0600")
        elif auth.readable_by_others(path):
            get_logger().warning("api_token_readable_by_others", file=str(path), fix="chmod 600 it")

    def _database(self) -> None:
        if self.store is None:
            _check_data_dir(self.s.data_dir)
            self.store = _open_store(self.s)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _check_data_dir(data: Path) -> None:
    """A data folder that is a file (or under one) can never hold the database or the token: ConfigError at
    once. One that is not there yet is waited for, never made here (`run` makes it)."""
    for part in (data, *data.parents):
        if part.exists():
            if not part.is_dir():
                above = "" if part == data else f" ({part}, a folder above it)"
                raise ConfigError(f"data_dir / I2V_DATA_DIR: {data}{above} is a file, not a folder")
            return


def _open_store(settings: Settings) -> Store:
    """The store as `run` made it: never created, never migrated here (the daemon owns the schema).

    NotReady while there is none yet, or an older schema (`run` makes and upgrades it), or the server
    does not accept connections; ConfigError for what `run` cannot fix either.
    """
    url = settings.filled("database_url")
    store: Store | None = None
    try:
        store = Store(url, max_attempts=settings.max_attempts, create=False, describe=job_summary)
        revision = store.revision()
    except DatabaseGone:
        raise NotReady(database_what(url), "there is none yet: `i2v-daemon run` makes it at its start") from None
    except Exception as err:
        if store is not None:
            store.close()
        raise database_problem(err, url) from None
    if revision == HEAD:
        return store
    store.close()
    if revision is None or revision < HEAD:
        raise NotReady(
            database_what(url), f"its schema is at revision {revision or 'none'}, this release needs {HEAD}: "
            "`i2v-daemon run` (or `i2v-daemon migrate`) upgrades it",
        )
    raise ConfigError(
        f"database_url / I2V_DATABASE_URL: {safe_url(url)} is at schema revision {revision}, newer than this "
        f"i2v-daemon's {HEAD}: upgrade i2v-daemon on this host"
    )


def _run(
    settings: Settings, needs: _Needs, sock: socket.socket, where: Listen, pending: list[tuple[Probe, NotReady]],
) -> int:
    import uvicorn

    from i2v_daemon.api import connections
    from i2v_daemon.api.app import create_app
    from i2v_daemon.api.gate import Gate
    from i2v_daemon.service.systemd import Notifier

    notifier = Notifier.from_env()
    failed: list[ConfigError] = []

    def ready() -> None:
        get_logger().info("api_ready", url=where.url(), database=safe_url(settings.database_url or ""),
                 token_file=str(settings.api_token_file))
        notifier.ready()  # Type=notify: `systemctl start` returns once the socket is served

    def real_app() -> Any:
        assert needs.store is not None and needs.token is not None
        app = create_app(settings, needs.store, token=needs.token, on_ready=None if pending else ready)
        app.state.ctx.hub.stopping = lambda: server.should_exit  # event streams end so shutdown need not wait
        return app

    waiter = Waiter(notifier, stopping=lambda: server.should_exit)
    gate = Gate(lambda: waiter.current or pending[0][1]) if pending else None
    # access_log off: its lines carry the query string, and `/?token=` must never reach a log (ours
    # logs the path only). Deadlines, the connection cap and proxy headers: api/connections.py.
    config = uvicorn.Config(
        gate if gate is not None else real_app(), log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=3, lifespan="on", **connections.uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(_logged_by_us)

    def wait() -> None:
        """The waiting thread: until the token and the database are there, then the real app behind the gate."""
        assert gate is not None
        try:
            if not waiter.wait([probe for probe, _ in pending]):
                return  # a stop came first
            app = real_app()
        except ConfigError as err:  # it answered at last, and what it said can never work (refused credentials)
            failed.append(err)
            server.should_exit = True
            return
        gate.open(app, on_shutdown=app.state.ctx.hub.close)
        ready()

    if gate is not None:
        first = pending[0][1]
        get_logger().info("api_waiting", url=where.url(), waiting_for=first.what, cause=first.cause)
        threading.Thread(target=wait, name="waiting", daemon=True).start()
    # uvicorn handles SIGTERM/SIGINT while it runs, then restores the handlers it found and raises the
    # signal again. These are what it finds: the signal has been answered by a clean stop, exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    notifier.stopping()
    if failed:
        print(f"i2v-daemon: {failed[0]}", file=sys.stderr)
        return EX_CONFIG
    get_logger().info("api_stopped")
    return EX_OK


#: uvicorn's lines for what is logged once already: a request's traceback (`api_request_failed`) and a
#: request that is not HTTP (`http_request` with its 400, from api/connections.py).
_OURS = frozenset({"Exception in ASGI application", "Invalid HTTP request received."})


def _logged_by_us(record: logging.LogRecord) -> bool:
    """Drop uvicorn's copies of what we log ourselves, with the request."""
    return record.getMessage().strip() not in _OURS


def safe_url(url: str) -> str:
    """The database URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured URL"
