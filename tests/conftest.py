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

from i2v_daemon.store import Store
from tests.databases import BACKENDS, database
from tests.fixtures_models import (  # noqa: F401
    tiny_family_dirs,
    tiny_family_models,
    tiny_i2vgen_dir,
    tiny_lora_dir,
    tiny_model,
)

#: One torch thread: on two shared cores a second thread makes tiny jobs 10-50x slower, not faster.
SUBPROCESS_ENV = {"I2V_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

#: A preset small enough for two CPU cores: 4 frames at 64 px in 2 steps.
TINY_PRESET = {"resolution": 64, "num_frames": 4, "steps": 2, "guidance_scale": 2.0, "fps": 4}


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

    @property
    def output(self) -> Path:
        return self.data / "output"

    @property
    def failed(self) -> Path:
        return self.data / "failed"

    def cli(self, *args: str, check: bool = False, timeout: float = 300, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
        full_env.pop("I2V_CONFIG", None)
        proc = subprocess.run(
            [sys.executable, "-m", "i2v_daemon.cli", args[0], "--config", str(self.config), *args[1:]],
            capture_output=True, text=True, timeout=timeout, env=full_env,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json", "--limit", "1000", check=True).stdout)


def write_config(path: Path, data: Path, model_dir: Path, **extra: Any) -> Path:
    lines = [
        f'data_dir = "{data}"',
        f'model = "{model_dir}"',
        'device = "cpu"',
        'default_preset = "tiny"',
        "stable_seconds = 0.5",
        "sidecar_wait_seconds = 1",
        "retry_backoff_seconds = 0",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines.append("[presets.tiny]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in TINY_PRESET.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


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
    s = Store(database_url)
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
