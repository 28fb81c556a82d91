"""A start into a world that is not ready yet waits it out; only a real configuration error stops it (78).

The real CLI in a subprocess against real parts: a PostgreSQL server of the test's own that is
stopped and started, a real read-only mount (as root; otherwise the documented seam that gives
the same errno), the GPU through the device seam (`I2V_TEST_GPU_STATE`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.test_api_server import start_serve
from tests.conftest import (
    ROOT,
    SUBPROCESS_ENV,
    Env,
    age,
    daemon_log,
    make_image,
    stop_daemon,
    wait_for,
    wait_ready,
    write_config,
)
from tests.databases import OwnPostgres, own_postgres, postgres_admin_url
from tests.service.test_service_daemon import NotifyListener

pytestmark = pytest.mark.slow


def events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def waits(proc: subprocess.Popen[str]) -> list[dict]:
    return [e for e in events(daemon_log(proc)) if e.get("event") == "waiting_for"]


def drop(env: Env, stem: str, prompt: str) -> None:
    make_image(env.inbox / f".{stem}.png").rename(env.inbox / f"{stem}.png")
    (env.inbox / f"{stem}.txt").write_text(prompt)
    age(env.inbox / f"{stem}.png", env.inbox / f"{stem}.txt")


def new_env(tmp_path: Path, model_dir: Path, **extra: object) -> Env:
    data = tmp_path / "data"
    (data / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "config.toml", data, model_dir, **extra)
    return Env(data=data, config=config, model_dir=model_dir, database_url=extra.get("database_url"))  # type: ignore[arg-type]


@pytest.fixture()
def pg() -> Iterator[OwnPostgres]:
    with own_postgres() as server:
        yield server


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    (tmp_path / "unused.log").touch()  # the listener keeps what it held when READY=1 came
    n = NotifyListener(tmp_path / "notify.sock", tmp_path / "unused.log")
    yield n
    n.close()


# ---- the database ---------------------------------------------------------------------------------


def test_run_started_before_its_database_waits_saying_so_then_makes_a_video_of_a_file_dropped_meanwhile(
    tmp_path: Path, tiny_i2vgen_dir: Path, pg: OwnPostgres, listener: NotifyListener,
):
    pg.stop()
    env = new_env(tmp_path, tiny_i2vgen_dir, database_url=pg.url)
    daemon = env.start(env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "4000000"})
    try:
        wait_for(lambda: waits(daemon), timeout=120, what="a waiting_for line")
        drop(env, "cat", "a cat turns its head")  # dropped while it waits: it must not be lost
        time.sleep(10)
        assert daemon.poll() is None, daemon_log(daemon)[-3000:]  # alive after 10 s, not exit 78
        said = waits(daemon)
        assert len(said) >= 2 and said[0]["what"] == f"the database at 127.0.0.1:{pg.port}"
        assert all(e["cause"] == "connection refused" for e in said)
        assert said[1]["next_try_in_seconds"] > said[0]["next_try_in_seconds"]  # it backs off
        told = listener.assignments()
        assert f"STATUS=waiting for the database at 127.0.0.1:{pg.port}: connection refused" in told
        assert any(a.startswith("EXTEND_TIMEOUT_USEC=") for a in told)  # systemd's start timeout is kept away
        assert "READY=1" not in told
        assert sorted(p.name for p in env.inbox_files()) == ["cat.png", "cat.txt"]  # nothing taken before ready

        pg.start()
        wait_ready(daemon, timeout=180)
        wait_for(lambda: (env.output / "cat" / "cat.mp4").exists(), timeout=240, what="output/cat/cat.mp4")
        assert "READY=1" in listener.assignments()
    finally:
        code = stop_daemon(daemon)
    assert code == 0, daemon_log(daemon)[-3000:]
    assert "waited" in [e.get("event") for e in events(daemon_log(daemon))]
    assert env.inbox_files() == [] and not any(env.failed.iterdir())


def test_serve_started_before_its_database_answers_503_naming_it_then_200_once_it_is_there(
    tmp_path: Path, tiny_i2vgen_dir: Path, pg: OwnPostgres,
):
    pg.stop()
    env = new_env(tmp_path, tiny_i2vgen_dir, database_url=pg.url)
    serve = start_serve(env.config)
    try:
        url = serve.wait_for_event("api_waiting", timeout=120)["url"]
        wait_for(lambda: [e for e in serve.events() if e.get("event") == "waiting_for"], what="waiting_for")
        time.sleep(3)
        assert serve.popen.poll() is None, serve.text[-3000:]  # up, not exit 1 or 78
        health = httpx.get(url + "healthz", timeout=30)
        assert health.status_code == 503
        assert health.json() == {"ok": False, "waiting_for": f"the database at 127.0.0.1:{pg.port}",
                                 "cause": "connection refused"}
        jobs = httpx.get(url + "api/v1/jobs", timeout=30)
        assert jobs.status_code == 503 and int(jobs.headers["retry-after"]) > 0
        assert jobs.json()["error"]["type"] == "not_ready" and "connection refused" in jobs.json()["error"]["message"]

        pg.start()  # up, but empty: serve waits on for the schema `run` (here `migrate`) makes
        wait_for(lambda: "schema" in httpx.get(url + "healthz", timeout=30).json().get("cause", ""), timeout=120,
                 what="the wait to move on to the schema")
        migrated = env.cli("migrate")
        assert migrated.returncode == 0, migrated.stderr
        wait_for(lambda: httpx.get(url + "healthz", timeout=30).status_code == 200, timeout=120, what="200")
        token = (env.data / "api-token").read_text().strip()
        ok = httpx.get(url + "api/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["counts"]["queued"] == 0
        serve.wait_for_event("api_ready")
    finally:
        code = serve.stop()
    assert code == 0, serve.text[-3000:]
    assert serve.wait_for_event("launcher_exit")["heavy_modules"] == []  # waiting pulled no PyTorch in


def test_run_once_does_not_wait_it_says_what_is_not_there_and_exits_75(
    tmp_path: Path, tiny_i2vgen_dir: Path, pg: OwnPostgres,
):
    pg.stop()
    env = new_env(tmp_path, tiny_i2vgen_dir, database_url=pg.url)
    proc = env.cli("run", "--once", timeout=120)
    assert proc.returncode == 75, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"i2v-daemon: the database at 127.0.0.1:{pg.port} is not there yet (connection refused); "
                    "try again later (`run` and `serve` wait for it)")


# ---- a read-only output folder --------------------------------------------------------------------


class ReadOnly:
    """A folder made read-only, then writable again: a real tmpfs mount remounted `ro` as root, else the seam.

    The seam (`I2V_TEST_READ_ONLY_FLAG`, see i2v_daemon/faults.py) gives the start-up check the same
    errno, EROFS, for a test that cannot mount anything.
    """

    def __init__(self, folder: Path, flag: Path) -> None:
        self.folder = folder
        self.flag = flag
        self.real = os.geteuid() == 0 and shutil.which("mount") is not None
        if self.real:
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "i2v-test", str(folder)],
                           check=True, capture_output=True)

    @property
    def env(self) -> dict[str, str]:
        return {} if self.real else {"I2V_TEST_READ_ONLY_FLAG": str(self.flag)}

    def read_only(self) -> None:
        if self.real:
            subprocess.run(["mount", "-o", "remount,ro", str(self.folder)], check=True, capture_output=True)
        else:
            self.flag.touch()

    def writable(self) -> None:
        if self.real:
            subprocess.run(["mount", "-o", "remount,rw", str(self.folder)], check=True, capture_output=True)
        else:
            self.flag.unlink(missing_ok=True)

    def close(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


def test_run_with_output_on_a_read_only_mount_waits_and_both_drops_become_videos_once_it_is_writable(
    tmp_path: Path, tiny_i2vgen_dir: Path,
):
    env = new_env(tmp_path, tiny_i2vgen_dir)
    mount = ReadOnly(env.output, tmp_path / "read-only")
    daemon = None
    try:
        mount.read_only()
        daemon = env.start(env=mount.env)
        wait_for(lambda: waits(daemon), timeout=120, what="a waiting_for line")
        drop(env, "before", "dropped while it waited")
        time.sleep(5)
        assert daemon.poll() is None, daemon_log(daemon)[-3000:]
        said = waits(daemon)
        assert said[0]["what"] == f"output_dir {env.output}" and said[0]["cause"] == "read-only file system"
        assert (env.inbox / "before.png").exists()

        mount.writable()
        wait_ready(daemon, timeout=180)
        drop(env, "after", "dropped once it was ready")
        for stem in ("before", "after"):
            wait_for(lambda stem=stem: (env.output / stem / f"{stem}.mp4").exists(), timeout=240,
                     what=f"output/{stem}/{stem}.mp4")
    finally:
        code = stop_daemon(daemon) if daemon is not None else 0
        mount.close()
    assert code == 0, daemon_log(daemon)[-3000:] if daemon else ""
    assert not env.failed.exists() or not any(env.failed.iterdir())
    assert env.inbox_files() == []


# ---- never right: 78 at once, one line ---------------------------------------------------------------


def never_right(tmp_path: Path, model_dir: Path, case: str) -> tuple[Path, dict[str, str]]:
    """A config (and environment) that can never work, the way a user gets it wrong."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    extra: dict[str, object] = {}
    environ: dict[str, str] = {}
    if case == "a value that fails validation":
        environ["I2V_MAX_ATTEMPTS"] = "three"
    elif case == "an unknown key":
        extra["max_attempt"] = 3
    elif case == "a URL scheme no driver handles":
        extra["database_url"] = "nosuchdb+nodriver://db.example/jobs"
    elif case == "a data folder that is a file":
        extra["data_dir"] = str(a_file)
    elif case == "an output folder that is a file":
        extra["output_dir"] = str(a_file)
    elif case == "a CPU-only torch for device cuda":
        extra["device"] = "cuda"
    elif case == "authentication refused":
        from sqlalchemy.engine import make_url

        url = make_url(postgres_admin_url()).set(password="not-the-password")
        extra["database_url"] = url.render_as_string(hide_password=False)
    config = write_config(tmp_path / "config.toml", tmp_path / "data", model_dir, **extra)
    return config, environ


@pytest.mark.parametrize(("command", "case"), [
    ("run", "a value that fails validation"), ("serve", "a value that fails validation"),
    ("run", "an unknown key"), ("serve", "an unknown key"),
    ("run", "a URL scheme no driver handles"), ("serve", "a URL scheme no driver handles"),
    ("run", "a data folder that is a file"), ("serve", "a data folder that is a file"),
    ("run", "an output folder that is a file"),
    ("run", "a CPU-only torch for device cuda"),
    ("run", "authentication refused"), ("serve", "authentication refused"),
])
def test_what_can_never_work_still_exits_78_at_once_in_one_line_without_a_traceback(
    tmp_path: Path, tiny_i2vgen_dir: Path, command: str, case: str,
):
    if case == "a CPU-only torch for device cuda":
        import torch

        if torch.version.cuda is not None:
            pytest.skip("this torch is a CUDA build")
    config, environ = never_right(tmp_path, tiny_i2vgen_dir, case)
    argv = [sys.executable, "-m", "i2v_daemon.cli", command, "--config", str(config)]
    if command == "serve":
        argv += ["--listen", "127.0.0.1:0"]
    full_env = {**os.environ, **SUBPROCESS_ENV, **environ}
    full_env.pop("I2V_CONFIG", None)
    full_env.pop("I2V_TEST_GPU_STATE", None)
    # A generous bound: a daemon that waited for it would still be waiting (backing off to 30 s) then.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=90, env=full_env, cwd=ROOT)
    assert proc.returncode == 78, proc.stderr[-3000:]
    problems = [line for line in proc.stderr.splitlines() if line.startswith("i2v-daemon:")]
    assert len(problems) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "waiting_for" not in proc.stderr
    key = {"a value that fails validation": "max_attempts", "an unknown key": "max_attempt",
           "a URL scheme no driver handles": "database_url", "a data folder that is a file": "is a file",
           "an output folder that is a file": "output_dir", "a CPU-only torch for device cuda": "device",
           "authentication refused": "database_url"}[case]
    assert key in problems[0], problems[0]
    assert "not-the-password" not in proc.stderr


# ---- the GPU, through the device seam -------------------------------------------------------------


def test_run_waits_for_a_gpu_the_driver_does_not_show_yet_and_goes_on_once_it_does(
    tmp_path: Path, tiny_i2vgen_dir: Path, listener: NotifyListener,
):
    env = new_env(tmp_path, tiny_i2vgen_dir, device="cuda")
    seam = tmp_path / "gpu.json"
    seam.write_text(json.dumps({"cuda_build": "12.8", "count": 0,
                                "error": "the NVIDIA driver cannot be initialised (cuInit: CUDA_ERROR_UNKNOWN)"}))
    daemon = env.start(env={"I2V_TEST_GPU_STATE": str(seam), "NOTIFY_SOCKET": str(listener.path)})
    try:
        wait_for(lambda: len(waits(daemon)) >= 2, timeout=120, what="two waiting_for lines")
        assert daemon.poll() is None
        said = waits(daemon)[0]
        assert said["what"] == "the GPU" and "cuInit" in said["cause"]
        assert "STATUS=waiting for the GPU: the NVIDIA driver cannot be initialised (cuInit: CUDA_ERROR_UNKNOWN)" \
            in listener.assignments()
        seam.write_text(json.dumps({"cuda_build": "12.8", "count": 1}))  # the driver is back
        wait_for(lambda: "waited" in [e.get("event") for e in events(daemon_log(daemon))], timeout=120,
                 what="the wait to end")
        code = daemon.wait(timeout=180)
    finally:
        stop_daemon(daemon)
    # It went on to load the model on the GPU by itself. This machine's torch has no CUDA, so the load
    # itself then says so (78): what matters here is that the wait ended without anyone's help.
    import torch

    if torch.version.cuda is None:
        assert code == 78 and "device" in daemon_log(daemon).strip().splitlines()[-1]


# ---- chaos: faults while a supervisor restarts what is killed -----------------------------------------


class Supervisor:
    """Restarts whatever exits, one second later, as systemd does with Restart=on-failure, RestartSec=1 and
    RestartPreventExitStatus=78: a 78 (and a clean 0) stays down. Every process it started is killed at close."""

    def __init__(self, commands: dict[str, list[str]], env: dict[str, str], logs: Path) -> None:
        self.commands = commands
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exits: list[tuple[str, int]] = []
        self.starts: dict[str, int] = {}
        self._closing = False
        for name in commands:
            self._start(name)
        import threading

        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _start(self, name: str) -> None:
        self.starts[name] = self.starts.get(name, 0) + 1
        log = (self.logs / f"{name}-{self.starts[name]}.log").open("w")
        self.procs[name] = subprocess.Popen(self.commands[name], stdout=subprocess.DEVNULL, stderr=log,
                                            env=self.env, cwd=ROOT)
        log.close()

    def _watch(self) -> None:
        while not self._closing:
            for name, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or self._closing:
                    continue
                self.exits.append((name, code))
                if code in (0, 78):
                    continue  # down for good, as under the shipped units
                time.sleep(1)  # RestartSec
                if not self._closing:
                    self._start(name)
            time.sleep(0.2)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}-{self.starts[name]}.log").read_text()

    def up(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def close(self) -> dict[str, int]:
        self._closing = True
        self._thread.join(5)
        codes = {}
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
            try:
                codes[name] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


def test_chaos_database_restarts_and_a_read_only_output_while_killed_daemons_restart_lose_nothing(
    tmp_path: Path, tiny_i2vgen_dir: Path, pg: OwnPostgres,
):
    if os.geteuid() != 0:
        pytest.skip("the chaos test remounts output/ read-only: root only")
    env = new_env(tmp_path, tiny_i2vgen_dir, database_url=pg.url, retry_backoff_seconds=1)
    mount = ReadOnly(env.output, tmp_path / "unused-flag")
    full_env = env.environ()
    full_env.pop("I2V_TEST_GPU_STATE", None)
    cli = [sys.executable, "-m", "i2v_daemon.cli"]
    config = ["--config", str(env.config)]
    (tmp_path / "logs").mkdir()
    supervisor = Supervisor({
        "run-a": [*cli, "run", *config], "run-b": [*cli, "run", *config],
        "serve": [*cli, "serve", *config, "--listen", "127.0.0.1:0"],
    }, full_env, tmp_path / "logs")
    dropped: list[str] = []

    def ready(name: str) -> bool:
        return any(e.get("event") in ("ready", "api_ready") for e in events(supervisor.log(name)))

    def put(stem: str) -> None:
        drop(env, stem, f"chaos {stem}")
        dropped.append(stem)

    try:
        wait_for(lambda: all(ready(n) for n in ("run-a", "run-b", "serve")), timeout=300, what="all three ready")
        put("calm1")
        put("calm2")

        # The database goes away; a daemon and the API are killed meanwhile and start into it.
        pg.stop()
        supervisor.kill("run-a")
        supervisor.kill("serve")
        put("outage")
        wait_for(lambda: any(e.get("event") == "waiting_for" for e in events(supervisor.log("run-a"))),
                 timeout=120, what="the restarted daemon to wait for the database")
        wait_for(lambda: any(e.get("event") == "waiting_for" for e in events(supervisor.log("serve"))),
                 timeout=120, what="the restarted API to wait for the database")
        time.sleep(3)
        pg.start()

        # output/ turns read-only; the other daemon is killed and starts into it.
        wait_for(lambda: ready("run-a"), timeout=300, what="run-a ready again")
        mount.read_only()
        supervisor.kill("run-b")
        put("readonly")
        wait_for(lambda: any(e.get("event") == "waiting_for" and "output_dir" in e.get("what", "")
                             for e in events(supervisor.log("run-b"))), timeout=120, what="run-b to wait for output/")
        time.sleep(3)
        mount.writable()
        put("after")

        def all_done() -> bool:
            return all((env.output / s / f"{s}.mp4").exists() for s in dropped)

        wait_for(all_done, timeout=600, interval=1, what="every drop to become a video")
        wait_for(lambda: all(ready(n) for n in ("run-a", "run-b", "serve")), timeout=300, what="all ready at the end")
        assert sorted(supervisor.up()) == ["run-a", "run-b", "serve"], supervisor.exits
        assert all(code != 78 for _, code in supervisor.exits), supervisor.exits
        url = next(e["url"] for e in events(supervisor.log("serve")) if e.get("event") == "api_ready")
        assert httpx.get(url + "healthz", timeout=30).status_code == 200
    finally:
        codes = supervisor.close()
        mount.close()
    assert codes == {"run-a": 0, "run-b": 0, "serve": 0}, (codes, supervisor.exits)
    assert env.inbox_files() == []
    assert not any(env.failed.iterdir()) if env.failed.exists() else True
    counts = env.status()["counts"]
    assert counts["succeeded"] == len(dropped) and counts["failed"] == 0, counts
