"""Start-up dependencies judged by their real errors (not yet: wait; never right: 78), and the wait itself."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from i2v_daemon.errors import ConfigError, NotReady
from i2v_daemon.service import readiness
from i2v_daemon.service.readiness import Probe, Waiter, database_problem, folder_problem, gpu_problem, os_problem
from i2v_daemon.service.systemd import Notifier
from tests.databases import free_port


class Said(Notifier):
    """A Notifier that keeps what it would have told systemd."""

    def __init__(self) -> None:
        super().__init__("/nonexistent", watchdog=4.0)
        self.said: list[str] = []

    def send(self, *assignments: str) -> bool:
        self.said.extend(assignments)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def failing(times: int, err: Exception) -> Probe:
    """A probe that raises `err` `times` times, then passes."""
    left = [times]

    def check() -> None:
        if left[0] > 0:
            left[0] -= 1
            raise err

    return Probe("thing", check)


# ---- folders ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EROFS, errno.ESTALE, errno.EIO, errno.ENOTCONN, errno.ENOSPC])
def test_a_read_only_stale_failing_or_full_filesystem_is_not_there_yet(code: int, tmp_path: Path):
    judged = os_problem(OSError(code, "strerror text"), "output_dir", tmp_path)
    assert isinstance(judged, NotReady)
    assert judged.what == f"output_dir {tmp_path}" and judged.cause == "strerror text"


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ENAMETOOLONG])
def test_a_permission_or_a_path_through_a_file_is_never_right(code: int, tmp_path: Path):
    judged = os_problem(OSError(code, "nope"), "output_dir", tmp_path)
    assert isinstance(judged, ConfigError) and str(judged).startswith("output_dir / I2V_OUTPUT_DIR: ")


def test_a_folder_path_that_is_a_file_or_runs_through_one_is_a_configuration_error(tmp_path: Path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        folder_problem("output_dir", a_file)
    with pytest.raises(ConfigError, match="a part of that path is a file"):
        folder_problem("inbox_dir", a_file / "inbox")


def test_a_missing_folder_is_made_and_the_write_check_leaves_nothing_behind(tmp_path: Path):
    folder_problem("output_dir", tmp_path / "out" / "put")
    assert (tmp_path / "out" / "put").is_dir() and list((tmp_path / "out" / "put").iterdir()) == []


def test_the_read_only_seam_gives_the_errno_a_read_only_mount_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    flag = tmp_path / "read-only"
    monkeypatch.setenv("I2V_TEST_READ_ONLY_FLAG", str(flag))
    folder_problem("output_dir", tmp_path / "out")  # no flag: writable
    flag.touch()
    with pytest.raises(NotReady) as waiting:
        folder_problem("output_dir", tmp_path / "out")
    assert waiting.value.cause == "read-only file system"
    flag.unlink()
    folder_problem("output_dir", tmp_path / "out")


# ---- the database -------------------------------------------------------------------------------------


def opening(url: str) -> Exception:
    """What opening `url` the way `run` does raises (the test fails if it opens)."""
    from i2v_daemon.queue.store import Store

    try:
        store = Store(url)
        try:
            store.create_schema()
        finally:
            store.close()
    except Exception as err:
        return err
    raise AssertionError(f"{url} opened")


def test_a_postgresql_server_that_refuses_connections_is_not_there_yet():
    url = f"postgresql+psycopg://i2v:secret@127.0.0.1:{free_port()}/i2v"
    judged = database_problem(opening(url), url)
    assert isinstance(judged, NotReady)
    assert judged.what.startswith("the database at 127.0.0.1:") and judged.cause == "connection refused"
    assert "secret" not in str(judged)


def test_a_host_name_that_does_not_resolve_yet_and_a_socket_not_made_yet_are_waited_for(tmp_path: Path):
    for url in ("postgresql+psycopg://i2v@no-such-host.invalid:5432/i2v",
                f"postgresql+psycopg://i2v@/i2v?host={tmp_path}"):
        judged = database_problem(opening(url), url)
        assert isinstance(judged, NotReady), (url, judged)


@pytest.mark.parametrize("text", [
    "connection failed: connection to server at \"10.0.0.5\", port 5432 failed: FATAL:  the database system is "
    "starting up",
    "connection failed: connection to server at \"10.0.0.5\", port 5432 failed: FATAL:  the database system is "
    "shutting down",
    "connection failed: connection to server at \"10.0.0.5\", port 5432 failed: timeout expired",
])
def test_a_server_that_is_starting_stopping_or_silent_is_not_there_yet(text: str):
    import psycopg
    from sqlalchemy.exc import OperationalError

    url = "postgresql+psycopg://i2v@10.0.0.5/i2v"
    judged = database_problem(OperationalError("connect", {}, psycopg.OperationalError(text)), url)
    assert isinstance(judged, NotReady) and judged.what == "the database at 10.0.0.5:5432"
    assert judged.cause in ("the database system is starting up", "the database system is shutting down",
                            "timeout expired")


def shared_postgres() -> Any:
    from sqlalchemy.engine import make_url

    from tests.databases import postgres_admin_url

    return make_url(postgres_admin_url())


def test_refused_credentials_and_a_database_that_does_not_exist_are_never_right():
    admin = shared_postgres()
    for url in (admin.set(password="wrong-password"), admin.set(database="no_such_database_here")):
        text = url.render_as_string(hide_password=False)
        judged = database_problem(opening(text), text)
        assert isinstance(judged, ConfigError), judged
        assert str(judged).startswith("database_url / I2V_DATABASE_URL: cannot open ")
        assert "wrong-password" not in str(judged)


def test_a_url_no_driver_handles_is_never_right():
    url = "nosuchdb+nodriver://host/db"
    judged = database_problem(opening(url), url)
    assert isinstance(judged, ConfigError) and "nosuchdb" in str(judged)


def test_a_sqlite_file_that_is_not_a_database_is_never_right(tmp_path: Path):
    (tmp_path / "jobs.db").write_bytes(b"this is not a database, it is a text file " * 100)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    judged = database_problem(opening(url), url)
    assert isinstance(judged, ConfigError), judged


# ---- the GPU (through the device seam) ---------------------------------------------------------------


def gpu_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **state: Any) -> None:
    seam = tmp_path / "gpu.json"
    seam.write_text(json.dumps(state))
    monkeypatch.setenv("I2V_TEST_GPU_STATE", str(seam))


def test_a_cuda_torch_whose_driver_shows_no_gpu_yet_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    gpu_told(tmp_path, monkeypatch, cuda_build="12.8", count=0,
             error="the NVIDIA driver cannot be initialised (cuInit: CUDA_ERROR_UNKNOWN)")
    with pytest.raises(NotReady) as waiting:
        gpu_problem("cuda")
    assert waiting.value.what == "the GPU" and "cuInit" in waiting.value.cause
    gpu_told(tmp_path, monkeypatch, cuda_build="12.8", count=1)
    gpu_problem("cuda")
    gpu_problem("cuda:0")
    with pytest.raises(ConfigError, match="shows 1 GPU"):
        gpu_problem("cuda:3")


def test_a_cpu_only_torch_for_device_cuda_is_never_right_and_auto_or_cpu_are_not_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delenv("I2V_TEST_GPU_STATE", raising=False)
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    with pytest.raises(ConfigError, match="CPU-only build"):
        gpu_problem("cuda")  # the real torch of this machine, asked for real
    monkeypatch.setenv("I2V_TEST_GPU_STATE", str(tmp_path / "never-read.json"))
    gpu_problem("auto")
    gpu_problem("cpu")


# ---- waiting ------------------------------------------------------------------------------------------


def test_the_wait_backs_off_from_1_s_to_30_s_tells_systemd_each_try_and_goes_on_by_itself():
    clock, said = Clock(), Said()
    waiter = Waiter(said, clock=clock, sleep=clock.sleep)
    probe = failing(7, NotReady("the database at db:5432", "connection refused"))
    with capture_logs() as logs:
        assert waiter.wait([probe]) is True
    tries = [e for e in logs if e["event"] == "waiting_for"]
    assert [e["next_try_in_seconds"] for e in tries] == [1, 2, 4, 8, 16, 30, 30]
    assert all(e["what"] == "the database at db:5432" and e["cause"] == "connection refused" for e in tries)
    assert [e["event"] for e in logs][-1] == "waited"
    assert "STATUS=waiting for the database at db:5432: connection refused" in said.said
    assert "READY=1" not in said.said  # READY is the daemon's, once it is really ready
    extends = [int(a.split("=")[1]) for a in said.said if a.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extends and min(extends) >= 60e6  # the start timeout never runs out while it waits
    assert extends[-1] == readiness.AFTER_WAIT_SECONDS * 1e6  # the rest of the start gets a whole start's time
    assert "WATCHDOG=1" in said.said


def test_a_never_right_dependency_ends_the_first_look_at_once_even_while_another_is_not_there_yet():
    clock = Clock()
    waiter = Waiter(clock=clock, sleep=clock.sleep)
    database = failing(100, NotReady("the database at db:5432", "connection refused"))
    device = Probe("gpu", lambda: (_ for _ in ()).throw(ConfigError("device / I2V_DEVICE: a CPU-only build")))
    with pytest.raises(ConfigError, match="CPU-only"):
        waiter.wait([database, device])
    assert clock.now == 100.0  # not one second waited


def test_a_dependency_that_answers_at_last_with_a_refusal_ends_the_wait_with_the_configuration_error():
    clock = Clock()
    calls = [0]

    def check() -> None:
        calls[0] += 1
        if calls[0] < 3:
            raise NotReady("the database at db:5432", "connection refused")
        raise ConfigError("database_url / I2V_DATABASE_URL: password authentication failed")

    with pytest.raises(ConfigError, match="password"):
        Waiter(clock=clock, sleep=clock.sleep).wait([Probe("database", check)])


def test_a_stop_ends_the_wait_and_what_is_built_after_the_probes_meets_a_fault_again_waits_again():
    clock = Clock()
    stop = [False]
    waiter = Waiter(clock=clock, sleep=clock.sleep, stopping=lambda: stop[0])
    built = failing(1, NotReady("output_dir /out", "read-only file system"))
    looks: list[str] = []
    assert waiter.wait([Probe("db", lambda: looks.append("db"))], then=built) is True
    assert looks == ["db", "db"]  # the build met the fault: every probe was asked again before it was tried again
    never = failing(10**6, NotReady("the GPU", "no GPU"))

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        stop[0] = clock.now > 110

    waiter.sleep = sleep
    assert waiter.wait([never]) is False
