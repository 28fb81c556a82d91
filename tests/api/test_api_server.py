"""`i2v-daemon serve` as a process: real uvicorn on a loopback port, beside a real `i2v-daemon run`.

Also the harness the other API tests import: `Proc` (a subprocess whose stderr is read as it
comes), `start_serve`, `start_daemon`, and the `api` fixture. The server runs with an import
guard that makes any import of torch, diffusers or transformers fail, so a route that pulled
PyTorch into the API process would break the tests that use it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from i2v_daemon.queue.schema import HEAD
from tests.conftest import SUBPROCESS_ENV, Env, write_config

pytestmark = pytest.mark.slow

HEAVY = ("torch", "diffusers", "transformers")

#: Runs `i2v-daemon serve` with imports of PyTorch refused; on exit it reports any heavy module loaded.
LAUNCH = f"""
import json, sys
HEAVY = {HEAVY!r}
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"serve imported {{name}}: the API process must never import PyTorch")
        return None
sys.meta_path.insert(0, NoTorch())
from i2v_daemon.cli import main as cli
code = cli.main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({{"event": "launcher_exit", "code": code, "heavy_modules": loaded}}), file=sys.stderr, flush=True)
sys.exit(code)
"""


class Proc:
    """A subprocess whose stderr lines are collected by a thread (so its pipe never fills)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
        full_env.pop("I2V_CONFIG", None)
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out

    def wait_for_event(self, name: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e.get("event") == name]
            if found:
                return found[0]
            if self.popen.poll() is not None:
                self._reader.join(5)
                found = [e for e in self.events() if e.get("event") == name]
                if found:
                    return found[0]
                raise AssertionError(f"exited {self.popen.returncode} before {name!r}:\n{self.text[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} within {timeout} s:\n{self.text[-3000:]}")

    def wait(self, timeout: float = 60) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.wait(10)
            raise AssertionError(f"did not stop after {sig}:\n{self.text[-3000:]}") from None


def start_serve(config: Path, listen: str = "127.0.0.1:0") -> Proc:
    return Proc([sys.executable, "-c", LAUNCH, "serve", "--config", str(config), "--listen", listen])


def start_daemon(config: Path) -> Proc:
    return Proc([sys.executable, "-m", "i2v_daemon.cli", "run", "--config", str(config)])


def migrate(config: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "i2v_daemon.cli", "migrate", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **SUBPROCESS_ENV},
    )
    assert proc.returncode == 0, proc.stderr


@dataclass
class Api:
    """A running `serve` (and usually a daemon) over one data folder."""

    env: Env
    url: str
    token: str
    server: Proc
    daemon: Proc | None = None
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"} if token != "" else {}
        kw.setdefault("timeout", httpx.Timeout(30, read=30))
        c = httpx.Client(base_url=self.url, headers=headers, **kw)
        self.clients.append(c)
        return c


def open_api(tmp: Path, model_dir: Path, *, daemon: bool = True, database_url: str | None = None,
             **extra: Any) -> Api:
    """Write a config, start the daemon (it makes the schema) and `serve`; returns when both are ready."""
    data = tmp / "data"
    (data / "inbox").mkdir(parents=True)
    settings = {"api_max_upload_bytes": 262144, **extra}
    if database_url:
        settings["database_url"] = database_url
    config = write_config(tmp / "config.toml", data, model_dir, **settings)
    env = Env(data=data, config=config, model_dir=model_dir, database_url=database_url)
    started: list[Proc] = []
    try:  # whatever fails here, nothing this started is left running
        proc = None
        if daemon:
            proc = start_daemon(config)
            started.append(proc)
            proc.wait_for_event("ready", timeout=300)
        else:
            migrate(config)
        server = start_serve(config)
        started.append(server)
        ready = server.wait_for_event("api_ready", timeout=60)
    except BaseException:
        for p in started:
            p.stop(signal.SIGKILL)
        raise
    token = (data / "api-token").read_text().strip()
    return Api(env=env, url=ready["url"].rstrip("/"), token=token, server=server, daemon=proc)


def close_api(api: Api) -> None:
    for c in api.clients:
        c.close()
    codes: dict[str, int] = {}
    try:
        codes["serve"] = api.server.stop()
    finally:
        if api.daemon is not None:
            codes["run"] = api.daemon.stop()
    assert codes == {k: 0 for k in codes}, f"{codes}\nserve:\n{api.server.text[-2000:]}"
    exit_line = api.server.wait_for_event("launcher_exit")
    assert exit_line["heavy_modules"] == [], "serve imported PyTorch"


@pytest.fixture(scope="module", name="api")
def api_fixture(tmp_path_factory: pytest.TempPathFactory, tiny_i2vgen_dir: Path) -> Iterator[Api]:
    """`serve` beside a real `run` with the tiny model, on SQLite; one pair per test module."""
    a = open_api(tmp_path_factory.mktemp("api"), tiny_i2vgen_dir)
    yield a
    close_api(a)


# ---- the server process itself ------------------------------------------------------------------


def test_serve_makes_a_private_token_file_and_never_logs_the_token(api: Api):
    path = api.env.data / "api-token"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600
    assert len(api.token) >= 43 and all(c.isalnum() or c in "-_" for c in api.token)  # 32 bytes, URL-safe
    api.client().get("/?token=" + api.token)  # a query that holds the token: not logged either
    assert api.client().get("/api/v1/jobs").status_code == 200
    assert api.token not in api.server.text
    assert any(e.get("event") == "api_token_created" for e in api.server.events())


def test_healthz_is_open_and_every_api_route_needs_the_token(api: Api):
    anonymous = api.client(token="")
    assert anonymous.get("/healthz").json() == {"ok": True}
    for method, path in [("GET", "/api/v1/jobs"), ("GET", "/api/v1/jobs/1"), ("POST", "/api/v1/jobs/1/cancel"),
                         ("GET", "/api/v1/events"), ("GET", "/api/v1/jobs/1/video"), ("GET", "/api/v1/presets")]:
        for client in (anonymous, api.client(token="x" * 43)):
            r = client.request(method, path)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["type"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert "token" in anonymous.get("/api/v1/jobs").json()["error"]["message"]


def test_a_second_serve_on_the_same_port_exits_78_with_one_clear_line(api: Api):
    port = api.url.rsplit(":", 1)[1]
    second = start_serve(api.env.config, f"127.0.0.1:{port}")
    assert second.wait() == 78
    problem = [line for line in second.lines if line.startswith("i2v-daemon:")]
    assert len(problem) == 1 and "cannot listen" in problem[0] and "another port" in problem[0]


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:http", "::1:8765", "example.org:8765", "[::1]:99999"])
def test_a_bad_listen_address_exits_78_naming_the_setting(api: Api, listen: str):
    proc = start_serve(api.env.config, listen)
    assert proc.wait() == 78
    problem = [line for line in proc.lines if line.startswith("i2v-daemon:")]
    assert len(problem) == 1 and "api_listen / --listen" in problem[0], proc.text


def test_a_non_loopback_address_is_warned_about_before_anything_listens(api: Api):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the warning comes, then the bind fails.
    proc = start_serve(api.env.config, "192.0.2.1:8765")
    assert proc.wait() == 78
    warning = next(e for e in proc.events() if e.get("event") == "api_listen_not_loopback")
    assert warning["level"] == "warning" and "192.0.2.1" in warning["address"]


def test_ipv6_loopback_in_brackets_is_served(api: Api):
    probe = socket.socket(socket.AF_INET6)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    finally:
        probe.close()
    proc = start_serve(api.env.config, "[::1]:0")
    try:
        url = proc.wait_for_event("api_ready")["url"]
        assert url.startswith("http://[::1]:")
        assert httpx.get(url + "healthz", timeout=10).json() == {"ok": True}
    finally:
        assert proc.stop() == 0


def waiting_health(proc: Proc) -> tuple[str, dict[str, Any]]:
    """The URL of a `serve` that waits, and what its /healthz says (503) while it does."""
    url = proc.wait_for_event("api_waiting")["url"]
    health = httpx.get(url + "healthz", timeout=30)
    assert health.status_code == 503 and health.headers["retry-after"], health.text
    return url, health.json()


def test_serve_waits_for_the_daemon_to_make_the_database_and_says_so(tmp_path: Path, tiny_i2vgen_dir: Path):
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.toml", data, tiny_i2vgen_dir)
    proc = start_serve(config)
    try:
        url, health = waiting_health(proc)  # not an exit: under systemd it would stay down otherwise
        assert health["ok"] is False and health["waiting_for"] == f"the database {data / 'jobs.db'}"
        assert "`i2v-daemon run`" in health["cause"]
        assert not (data / "jobs.db").exists()  # serve never makes the database
        assert not data.exists()  # nor the folder, nor a token in it: a mistyped --data-dir leaves nothing
        migrate(config)  # what `run` does at its start
        wait_for_200(url + "healthz")
        assert httpx.get(url + "healthz", timeout=30).json() == {"ok": True}
        assert (data / "api-token").stat().st_mode & 0o777 == 0o600  # made once the database was there
    finally:
        assert proc.stop() == 0


def wait_for_200(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, f"{url} did not answer 200"
        time.sleep(0.2)


def test_serve_waits_for_an_older_schema_to_be_upgraded_and_refuses_a_newer_one_with_78(
    tmp_path: Path, tiny_i2vgen_dir: Path,
):
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.toml", data, tiny_i2vgen_dir)
    migrate(config)
    with sqlite3.connect(data / "jobs.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0003'")
    older = start_serve(config)
    try:
        url, health = waiting_health(older)  # the daemon upgrades it, then serve answers by itself
        assert "revision 0003" in health["cause"] and "`i2v-daemon run`" in health["cause"]
        with sqlite3.connect(data / "jobs.db") as db:  # as the daemon's upgrade leaves it
            db.execute("UPDATE alembic_version SET version_num = ?", (HEAD,))
        wait_for_200(url + "healthz")
    finally:
        assert older.stop() == 0
    with sqlite3.connect(data / "jobs.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    newer = start_serve(config)
    assert newer.wait() == 78  # newer: restarting cannot help
    problem = [line for line in newer.lines if line.startswith("i2v-daemon:")]
    assert len(problem) == 1 and "upgrade i2v-daemon on this host" in problem[0] and "9999" in problem[0]


def test_sigterm_ends_open_event_streams_and_serve_exits_0(tmp_path: Path, tiny_i2vgen_dir: Path):
    api = open_api(tmp_path, tiny_i2vgen_dir, daemon=False)
    with api.client() as client, client.stream("GET", "/api/v1/events") as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("retry:")  # the stream is open
        api.server.popen.send_signal(signal.SIGTERM)
        rest = list(lines)  # ends when the server closes it, not at the client's 30 s read timeout
    assert api.server.wait(30) == 0
    assert "event: summary" in rest
    assert api.server.wait_for_event("launcher_exit")["heavy_modules"] == []
