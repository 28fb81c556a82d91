"""Shared fixtures: a tiny model folder, a data folder with a config, and the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from i2v_daemon.queue.store import Store
from i2v_daemon.views.jobs import job_summary
from tests.databases import BACKENDS, database
from tests.fixtures_models import (  # noqa: F401
    tiny_family_dirs,
    tiny_family_models,
    tiny_i2vgen_dir,
    tiny_lora_dir,
    tiny_model,
)

ROOT = Path(__file__).resolve().parents[1]

#: One torch thread: on two shared cores a second thread makes tiny jobs 10-50x slower, not faster.
SUBPROCESS_ENV = {"I2V_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

#: A preset small enough for two CPU cores: 4 frames at 64 px in 2 steps.
TINY_PRESET = {"resolution": 64, "num_frames": 4, "steps": 2, "guidance_scale": 2.0, "fps": 4}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup`, every `xdist_group` test must carry its group in its node id.

    pytest-xdist tags them there for its scheduler; where it cannot (pytest 9.2 with xdist 3.8), the
    groups were silently ignored: the compile tests ran on both workers, each compiling cold. Refuse that.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    untagged = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if untagged:
        raise pytest.UsageError(f"pytest-xdist did not tag {len(untagged)} xdist_group test(s) (e.g. {untagged[0]}); "
                                f"this pytest and pytest-xdist do not work together: see pyproject.toml's test extras")


def unprivileged_prefix() -> list[str]:
    """A command prefix that runs the daemon without privileges: as root, with every capability dropped.

    Root without CAP_DAC_OVERRIDE and CAP_FOWNER is held to file permissions and the sticky bit
    like any user (and, unlike another uid, can still run the interpreter under /root). Already
    unprivileged: nothing to drop.
    """
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--no-new-privs", "--"]


def make_image(path: Path, size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 80, 40)) -> Path:
    """A small gradient image (gradients survive JPEG and make frames differ from black)."""
    img = Image.new("RGB", size, color)
    px = img.load()
    for x in range(size[0]):
        for y in range(size[1]):
            px[x, y] = ((color[0] + x * 2) % 256, (color[1] + y * 3) % 256, color[2])
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    img.save(path, fmt)
    return path


def finishes(fn: Callable[[], object], seconds: float = 5.0) -> BaseException | None:
    """Run fn in a thread and return what it raised; fail the test if it is still running after `seconds`."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the call blocked"
    return outcome[0]


def age(*paths: Path, seconds: float = 60) -> None:
    """Backdate files so `run --once` counts them as stable without waiting."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


@dataclass
class Env:
    data: Path
    config: Path
    model_dir: Path
    database_url: str | None = None  # None: the default SQLite file in the data folder

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data / 'jobs.db'}"

    @property
    def inbox(self) -> Path:
        return self.data / "inbox"

    def inbox_files(self) -> list[Path]:
        """What is still in the inbox, its presets' folders included (the empty folders themselves are not)."""
        return sorted(p for p in self.inbox.rglob("*") if p.is_symlink() or not p.is_dir())

    @property
    def output(self) -> Path:
        return self.data / "output"

    @property
    def failed(self) -> Path:
        return self.data / "failed"

    def command(self, *args: str, unprivileged: bool = False) -> list[str]:
        prefix = unprivileged_prefix() if unprivileged else []
        return [*prefix, sys.executable, "-m", "i2v_daemon.cli", args[0], "--config", str(self.config), *args[1:]]

    def environ(self, env: dict[str, str] | None = None) -> dict[str, str]:
        full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
        full_env.pop("I2V_CONFIG", None)
        return full_env

    def cli(self, *args: str, check: bool = False, timeout: float = 300, env: dict[str, str] | None = None,
            unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.command(*args, unprivileged=unprivileged), capture_output=True, text=True, timeout=timeout,
            env=self.environ(env), cwd=ROOT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json", "--limit", "1000", check=True).stdout)

    def start(self, *args: str, env: dict[str, str] | None = None, unprivileged: bool = False,
              ) -> subprocess.Popen[str]:
        """The long-running daemon (`run`, or `run --once` with args) in a subprocess; stderr to a file."""
        log = open(self.data.parent / f"daemon-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 (read back later)
        proc = subprocess.Popen(
            self.command("run", *args, unprivileged=unprivileged), stdout=subprocess.DEVNULL, stderr=log, text=True,
            env=self.environ(env), cwd=ROOT,
        )
        proc.log = log  # type: ignore[attr-defined]
        return proc


def daemon_log(proc: subprocess.Popen[str]) -> str:
    """Everything the daemon started with `Env.start` wrote to stderr so far."""
    log = proc.log  # type: ignore[attr-defined]
    log.flush()
    return Path(log.name).read_text()


def wait_ready(proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until the daemon said `ready` (its model loaded and its inbox watched); its log in the failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = daemon_log(proc)
        if '"event": "ready"' in text or '"ready"' in text:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"the daemon did not get ready:\n{daemon_log(proc)[-3000:]}")


def wait_for(predicate: Callable[[], Any], timeout: float = 120, what: str = "condition",
             interval: float = 0.1) -> Any:
    """The predicate's first true value, polled every `interval`; a test failure naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def stop_daemon(proc: subprocess.Popen[str], sig: int = 15, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def write_config(path: Path, data: Path, model_dir: Path, presets_extra: dict[str, dict[str, Any]] | None = None,
                 **extra: Any) -> Path:
    values: dict[str, Any] = {
        "data_dir": str(data), "model": str(model_dir), "device": "cpu", "default_preset": "tiny",
        "stable_seconds": 0.5, "sidecar_wait_seconds": 1, "retry_backoff_seconds": 0, **extra,
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    lines.append("[presets.tiny]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in TINY_PRESET.items()]
    for name, values in (presets_extra or {}).items():
        lines.append(f"[presets.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def _replay_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Kept meta-device replays (models/replay_cache.py) in this run's own folder, shared by its workers
    and their subprocesses: never the user's ~/.cache, and a model planned once is not replayed again."""
    base = tmp_path_factory.getbasetemp()
    os.environ["I2V_REPLAY_CACHE"] = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "replays")


@pytest.fixture(autouse=True)
def _environment_put_back() -> Iterator[None]:
    """The process environment as it was before each test.

    A daemon built in-process points Inductor and Triton at its data folder's compile cache
    (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR); left set, a later test on the same worker reads that
    folder as one a person chose. Whatever a test (or the code under test) sets, it sets for itself only.
    """
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture()
def env(tmp_path: Path, tiny_i2vgen_dir: Path) -> Env:  # noqa: F811
    data = tmp_path / "data"
    (data / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "config.toml", data, tiny_i2vgen_dir)
    return Env(data=data, config=config, model_dir=tiny_i2vgen_dir)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty job database: each test runs once on SQLite and once on a fresh PostgreSQL database."""
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture()
def store(database_url: str) -> Iterator[Store]:
    """A migrated Store on `database_url` (SQLite, and PostgreSQL when a server is configured)."""
    s = Store(database_url, describe=job_summary)
    s.create_schema()
    yield s
    s.close()


@pytest.fixture()
def db_env(env: Env, database_url: str) -> Env:
    """`env` with its job database at `database_url` (in its config file, so the CLI uses it too)."""
    write_config(env.config, env.data, env.model_dir, database_url=database_url)
    env.database_url = database_url
    return env


@pytest.fixture()
def drop(env: Env) -> Callable[..., list[Path]]:
    """Drop an image and optional sidecar into the inbox the safe way (write, then rename), aged."""

    def _drop(stem: str, sidecar: tuple[str, str | bytes] | None = None, image_suffix: str = ".png",
              size: tuple[int, int] = (96, 64)) -> list[Path]:
        made = []
        tmp = make_image(env.inbox / f".{stem}{image_suffix}", size)
        made.append(tmp.rename(env.inbox / f"{stem}{image_suffix}"))
        if sidecar is not None:
            suffix, body = sidecar
            side = env.inbox / f"{stem}{suffix}"
            side.write_bytes(body if isinstance(body, bytes) else body.encode())
            made.append(side)
        age(*made)
        return made

    return _drop
