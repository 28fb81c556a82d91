"""Claims that fit the card: each worker advertises what its card offers, claims only jobs whose need fits it,
leaves the others to a larger card with the reason in `status`, and intake refuses what no card here could take.

The cards are pretend ones on this CPU: I2V_TEST_DEVICE_BUDGET_GIB says how big a card each daemon has
(docs/development.md), and `vram_budget_gib` caps it as on a GPU. A tiny job's need is about 0.3 GiB
(its leanest placement's predicted peak plus the margin).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from i2v_daemon.errors import CardTooSmall
from i2v_daemon.models.holder import ModelHolder
from i2v_daemon.queue.jobs import Job, JobRequest, JobStatus, Params
from i2v_daemon.queue.store import Store
from i2v_daemon.settings import load_settings
from i2v_daemon.work.cards import GIB, Cards
from i2v_daemon.work.policy import Action, decide
from tests.conftest import Env, make_image, stop_daemon, wait_for, wait_ready, write_config

pytestmark = pytest.mark.slow
CARD = {"I2V_TEST_DEVICE_BUDGET_GIB": "2"}  # every daemon here "has" a 2 GiB card …
SMALL = 0.1  # … which the small one caps at 0.1 GiB with vram_budget_gib


def _job(store: Store, name: str) -> Job | None:
    return next((j for j in store.list_jobs(50) if j.name == name), None)


def _started(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    wait_ready(proc)
    return proc


def test_a_small_card_leaves_a_job_to_a_larger_one_and_says_why_while_none_is_live(db_env: Env, drop) -> None:
    env = db_env  # SQLite and PostgreSQL
    small_config = write_config(env.config.with_name("small.toml"), env.data, env.model_dir,
                                database_url=env.database_url, vram_budget_gib=SMALL)
    small_env = Env(data=env.data, config=small_config, model_dir=env.model_dir, database_url=env.database_url)
    small = _started(small_env.start(env=CARD))
    large = _started(env.start(env=CARD))
    store = Store(env.db_url)
    try:
        drop("cat", (".txt", "a cat"))
        done = wait_for(lambda: (j := _job(store, "cat")) and j.status is JobStatus.SUCCEEDED and j,
                        what="cat to finish")
        assert done.worker_id is not None and done.worker_id.split("/")[1] == str(large.pid)
        assert 0.1 * GIB < (done.need_bytes or 0) <= 2 * GIB
        log = (env.output / "cat" / "job.log").read_text()
        assert log.count(" started ") == 1 and "needs a card" not in log  # the small card never claimed it

        # The large worker goes away: a new job waits, and says for what, on the small one's watch.
        assert stop_daemon(large) == 0
        drop("dog", (".txt", "a dog"))
        waiting = wait_for(lambda: (j := _job(store, "dog")) and j.error and j, what="dog to say why it waits")
        assert waiting.status is JobStatus.QUEUED and waiting.attempts == 0
        message = waiting.error["message"]
        assert message.startswith("needs a card offering at least 0.3 GiB: it waits for a worker with a larger card")
        assert f"(the largest live card: 0.1 GiB, {socket.gethostname()}/{small.pid}/cpu)" in message
        [shown] = [j for j in env.status()["jobs"] if j["name"] == "dog"]
        assert shown["status"] == "queued" and shown["error"] == message and shown["need_bytes"] == waiting.need_bytes

        large = _started(env.start(env=CARD))  # back: it takes the job
        finished = wait_for(lambda: (j := _job(store, "dog")) and j.status is JobStatus.SUCCEEDED and j,
                            what="dog to finish on the large card")
        assert finished.worker_id is not None and finished.worker_id.split("/")[1] == str(large.pid)
        assert finished.attempts == 1  # the small card never claimed it
        assert (env.output / "dog" / "job.log").read_text().count(" started ") == 1
    finally:
        store.close()
        stop_daemon(small, signal.SIGKILL)
        stop_daemon(large, signal.SIGKILL)


def test_intake_refuses_a_job_no_card_seen_here_could_take_with_the_numbers(env: Env, drop) -> None:
    store = Store(env.db_url)
    store.create_schema()
    # A worker with a 0.1 GiB card once served this queue (another host, gone now).
    store.control.advertise_card("gpu-box/4242/cuda:0", host="gpu-box", device="cuda:0", budget_bytes=int(0.1 * GIB))
    store.close()
    drop("owl", (".txt", "an owl"))
    env.cli("run", "--once", check=True, env=CARD)
    manifest = json.loads((env.failed / "owl" / "job.json").read_text())
    message = manifest["error"]["message"]
    assert manifest["status"] == "failed" and manifest["error"]["type"] == "needs_larger_card"
    assert message.startswith("needs a card offering at least 0.3 GiB (")
    assert "the largest card that has worked for this queue offers 0.1 GiB (gpu-box/4242/cuda:0)" in message
    assert "ask for a lower resolution or fewer frames" in message
    assert sorted(p.name for p in (env.failed / "owl" / "input").iterdir()) == ["owl.png", "owl.txt"]
    assert not (env.output / "owl").exists()


def test_a_worker_that_claims_a_job_of_unknown_need_works_it_out_and_gives_it_back(
    tmp_path: Path, tiny_i2vgen_dir: Path, monkeypatch: pytest.MonkeyPatch, database_url: str,
) -> None:
    monkeypatch.setenv("I2V_TEST_DEVICE_BUDGET_GIB", str(SMALL))
    config = write_config(tmp_path / "config.toml", tmp_path / "data", tiny_i2vgen_dir, database_url=database_url)
    settings = load_settings(config)
    store = Store(database_url)
    store.create_schema()
    params = Params(preset="tiny", resolution=64, num_frames=4, steps=2, guidance_scale=2.0, fps=4)
    job, _ = store.enqueue(JobRequest("cat", ("cat.png",), "key-cat", "a cat", "", params))  # as `serve` queues one
    image = make_image(tmp_path / "cat.png")
    holder = ModelHolder(str(tiny_i2vgen_dir), "cpu", "float32")
    cards = Cards(settings, store, holder, worker_id="box/1/cpu", host="box", device="cpu")
    assert cards.budget_bytes == int(SMALL * GIB)

    claimed = store.claim_next("box/1/cpu", lease_seconds=60, budget_bytes=cards.budget_bytes)
    assert claimed is not None and claimed.id == job.id and claimed.need_bytes is None  # unknown: may be claimed
    with pytest.raises(CardTooSmall) as err:
        cards.check_claimed(claimed, image)
    assert "needs a card offering at least 0.3 GiB (" in str(err.value)
    assert "this worker's card offers 0.1 GiB (box/1/cpu): it waits for a worker with a larger card" in str(err.value)
    verdict = decide(err.value, attempts=1, max_attempts=3, backoff_seconds=30)
    assert verdict.action is Action.WAIT and verdict.refund and verdict.delay == 0

    store.requeue(job.id, "box/1/cpu", error=verdict.error, refund_attempt=True)
    back = store.get(job.id)
    assert back is not None and back.status is JobStatus.QUEUED and back.attempts == 0
    assert 0.1 * GIB < (back.need_bytes or 0) < GIB
    # Its need is known now: this card does not claim it again, a larger one does.
    assert store.claim_next("box/1/cpu", lease_seconds=60, budget_bytes=cards.budget_bytes) is None
    assert store.claim_next("big/2/cuda:0", lease_seconds=60, budget_bytes=GIB) is not None
    store.close()


def test_a_worker_whose_device_auto_resolved_records_the_need_under_the_name_it_claims_with(
    tmp_path: Path, tiny_i2vgen_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from i2v_daemon.daemon import Daemon
    from i2v_daemon.files import job_dir

    monkeypatch.setenv("I2V_TEST_DEVICE_BUDGET_GIB", str(SMALL))
    settings = load_settings(write_config(tmp_path / "config.toml", tmp_path / "data", tiny_i2vgen_dir,
                                          device="auto"))
    daemon = Daemon(settings)
    try:
        assert daemon.worker.worker_id.endswith("/auto")
        params = Params(preset="tiny", resolution=64, num_frames=4, steps=2, guidance_scale=2.0, fps=4)
        job, _ = daemon.store.enqueue(JobRequest("cat", ("cat.png",), "key-cat", "a cat", "", params))
        inputs = job_dir(settings.filled("work_dir"), job.id) / "input"
        inputs.mkdir(parents=True)
        make_image(inputs / "cat.png")
        assert daemon._load_model()  # `auto` is the CPU here: the worker is named after it before its first claim
        assert daemon.worker.worker_id.endswith("/cpu") and daemon.worker.cards.worker_id == daemon.worker.worker_id
        assert daemon.worker.run_once()
        back = daemon.store.get(job.id)
        assert back is not None and back.status is JobStatus.QUEUED and back.attempts == 0  # not dropped, not counted
        assert back.error is not None and back.error["type"] == "needs_larger_card" and back.need_bytes
    finally:
        daemon.models.unload()
        daemon.store.close()
