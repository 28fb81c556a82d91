"""Metrics and sd_notify callbacks that fail: logged under their own name, and the job ends as it would have."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from i2v_daemon.params import Params
from i2v_daemon.queue.jobs import JobRequest, JobStatus
from i2v_daemon.queue.store import Store
from i2v_daemon.settings import load_settings
from i2v_daemon.work.closer import Closer
from i2v_daemon.work.finish import Finisher
from i2v_daemon.work.worker import Worker

PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)


def test_a_failing_metrics_callback_is_logged_as_metrics_hook_failed_and_the_job_still_ends(
    store: Store, tmp_path: Path,
) -> None:
    settings = load_settings(None, data_dir=str(tmp_path / "data"))
    for folder in settings.folders().values():
        folder.mkdir(parents=True, exist_ok=True)

    def on_finish(job: object) -> None:
        raise RuntimeError("the textfile's folder is gone")

    worker = Worker(settings, store, Closer(settings, store, Finisher(settings, store), on_finish=on_finish),
                    worker_id="w1")
    job, _ = store.enqueue(JobRequest(name="cat", inputs=("cat.png",), intake_key="k", params=PARAMS))
    store.request_cancel(job.id)
    with capture_logs() as logs:
        assert worker.run_once()
    ended = store.get(job.id)
    assert ended is not None and ended.status is JobStatus.CANCELED  # the job is not touched by it
    events = [e["event"] for e in logs]
    assert "metrics_hook_failed" in events
    assert "hook_failed" not in events  # that name is the on_finish command's (delivery/hook.py)
