"""The housekeeper ends what needs no GPU at once, through the same closer as the worker, and never generates."""

from __future__ import annotations

import json
from pathlib import Path

from i2v_daemon.params import Params
from i2v_daemon.queue.jobs import Job, JobRequest, JobStatus
from i2v_daemon.queue.store import Store
from i2v_daemon.settings import load_settings
from i2v_daemon.work.closer import Closer
from i2v_daemon.work.finish import Finisher
from i2v_daemon.work.housekeeper import Housekeeper

PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)


def test_the_housekeeper_ends_a_canceled_job_and_leaves_one_that_must_generate_queued(
    store: Store, tmp_path: Path,
) -> None:
    settings = load_settings(None, data_dir=str(tmp_path / "data"))
    for folder in settings.folders().values():
        folder.mkdir(parents=True, exist_ok=True)
    finished: list[Job] = []
    closer = Closer(settings, store, Finisher(settings, store), on_finish=finished.append)
    housekeeper = Housekeeper(settings, store, closer, worker_id="host/1/housekeeping")
    waits, _ = store.enqueue(JobRequest(name="dog", inputs=("dog.png",), intake_key="a", params=PARAMS))
    canceled, _ = store.enqueue(JobRequest(name="cat", inputs=("cat.png",), intake_key="b", params=PARAMS))
    store.request_cancel(canceled.id)

    assert housekeeper.run_once() is True
    assert housekeeper.run_once() is False  # the other one needs the GPU: not the housekeeper's
    ended, queued = store.get(canceled.id), store.get(waits.id)
    assert ended is not None and ended.status is JobStatus.CANCELED
    assert queued is not None and queued.status is JobStatus.QUEUED and queued.attempts == 0
    assert [j.id for j in finished] == [canceled.id] and finished[0].status is JobStatus.CANCELED  # its final row
    manifest = json.loads((Path(ended.final_dir or "") / "job.json").read_text())
    assert manifest["status"] == "canceled" and manifest["error"]["message"].endswith("before it started")
