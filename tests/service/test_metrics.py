"""Prometheus metrics: fed through the worker's hooks, read back with Prometheus's own text parser."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from i2v_daemon.queue.jobs import Job, JobRequest, JobStatus, Params
from i2v_daemon.queue.store import Store
from i2v_daemon.service.metrics import GIB, Metrics

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
PARAMS = Params(preset="standard", resolution=512, num_frames=16, steps=50, guidance_scale=9.0, fps=8)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    s.create_schema()
    yield s
    s.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from the exposition text, parsed the way Prometheus does."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def finished_job(job_id: int, status: JobStatus, seconds: float) -> Job:
    return Job(
        id=job_id, name=f"j{job_id}", status=status, priority=0, inputs=("a.png",), prompt="", negative_prompt="",
        params_data=PARAMS.as_dict(), attempts=1, max_attempts=3, created_at=T0, started_at=T0,
        finished_at=T0 + timedelta(seconds=seconds),
    )


def test_jobs_tries_steps_vram_and_queue_depth_are_exposed_in_a_registry_of_our_own(store: Store):
    for name in ("a", "b"):
        store.enqueue(JobRequest(name=name, inputs=(f"{name}.png",), intake_key=name, params=PARAMS))
    m = Metrics(store)
    job = finished_job(1, JobStatus.SUCCEEDED, 90)
    for step, t in ((1, 10.0), (2, 10.5), (3, 11.5)):  # the first step has no predecessor: not timed
        m.step(job, step, 3, now=t)
    m.step(job, 1, 3, now=20.0)  # a new try starts over: not a step of 8.5 s
    m.tried({"outcome": "out_of_memory", "peak_vram_bytes": 30 * GIB})
    m.tried({"outcome": "succeeded", "peak_vram_bytes": 12 * GIB})
    m.tried({"outcome": "succeeded", "peak_vram_bytes": None})  # a CPU try has no peak
    m.finished(job)
    m.finished(finished_job(2, JobStatus.FAILED, 5))

    got = samples(m.text())
    assert got[("i2v_jobs_total", (("outcome", "succeeded"),))] == 1
    assert got[("i2v_jobs_total", (("outcome", "failed"),))] == 1
    assert got[("i2v_jobs_total", (("outcome", "canceled"),))] == 0
    assert got[("i2v_job_duration_seconds_count", (("outcome", "succeeded"),))] == 1
    assert got[("i2v_job_duration_seconds_sum", (("outcome", "succeeded"),))] == 90
    assert got[("i2v_job_duration_seconds_bucket", (("le", "120.0"), ("outcome", "succeeded")))] == 1
    assert got[("i2v_step_duration_seconds_count", ())] == 2
    assert got[("i2v_step_duration_seconds_sum", ())] == pytest.approx(1.5)
    assert got[("i2v_oom_fallbacks_total", ())] == 1
    assert got[("i2v_tries_total", (("outcome", "succeeded"),))] == 2
    assert got[("i2v_try_peak_vram_bytes_count", ())] == 2
    assert got[("i2v_peak_vram_bytes", ())] == 30 * GIB
    assert got[("i2v_queue_jobs", (("status", "queued"),))] == 2
    assert got[("i2v_queue_jobs", (("status", "running"),))] == 0
    assert got[("i2v_paused", ())] == 0
    store.set_paused(True)
    assert samples(m.text())[("i2v_paused", ())] == 1  # read at scrape time
    # Not the process-wide default registry: two daemons in one test process never collide.
    assert "i2v_jobs_total" not in prometheus_client.generate_latest().decode()


def test_metrics_are_served_over_http_on_the_loopback_address(store: Store):
    m = Metrics(store)
    m.finished(finished_job(1, JobStatus.CANCELED, 3))
    server = m.serve("127.0.0.1", 0)  # 0: any free port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    finally:
        server.shutdown()
    assert samples(body)[("i2v_jobs_total", (("outcome", "canceled"),))] == 1


def test_the_textfile_is_replaced_whole_for_node_exporter(store: Store, tmp_path: Path):
    m = Metrics(store)
    path = tmp_path / "textfile" / "i2v-daemon.prom"
    assert m.write_textfile(path)
    m.finished(finished_job(1, JobStatus.SUCCEEDED, 3))
    assert m.write_textfile(path)
    assert samples(path.read_text())[("i2v_jobs_total", (("outcome", "succeeded"),))] == 1
    assert [p.name for p in path.parent.iterdir()] == ["i2v-daemon.prom"]  # no temp file left behind


def test_a_metrics_port_in_use_is_a_configuration_error(store: Store):
    from i2v_daemon.errors import ConfigError

    first = Metrics(store).serve("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="metrics_port"):
            Metrics(store).serve("127.0.0.1", first.server_port)
    finally:
        first.shutdown()
