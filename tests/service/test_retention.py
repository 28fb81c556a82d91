"""Retention with an explicit `now`: old finished jobs are forgotten or archived; nothing else is touched."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from i2v_daemon.queue.jobs import JobRequest, JobStatus, Params
from i2v_daemon.queue.store import Store
from i2v_daemon.service.retention import apply_retention
from i2v_daemon.settings import load_settings

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
PARAMS = Params(preset="standard", resolution=512, num_frames=16, steps=50, guidance_scale=9.0, fps=8)


def finished(store: Store, root: Path, name: str, status: JobStatus, days_ago: float) -> int:
    """A job that ran and finished `days_ago` days before NOW, with its folder in output/ or failed/."""
    when = NOW - timedelta(days=days_ago)
    job, _ = store.enqueue(JobRequest(name=name, inputs=(f"{name}.png",), intake_key=name, params=PARAMS), now=when)
    store.claim_next("w", lease_seconds=60, now=when)
    folder = root / ("output" if status is JobStatus.SUCCEEDED else "failed") / name
    (folder / "input").mkdir(parents=True)
    (folder / "job.json").write_text("{}")
    (folder / "input" / f"{name}.png").write_bytes(b"png")
    store.update_running(job.id, "w", final_dir=str(folder))
    store.finish(job.id, "w", status, now=when + timedelta(minutes=1))
    return job.id


@pytest.fixture()
def jobs(store: Store, tmp_path: Path) -> dict[str, int]:
    data = tmp_path / "data"
    ids = {
        "cat": finished(store, data, "cat", JobStatus.SUCCEEDED, 40),
        "dog": finished(store, data, "dog", JobStatus.FAILED, 35),
        "owl": finished(store, data, "owl", JobStatus.CANCELED, 31),
        "new": finished(store, data, "new", JobStatus.SUCCEEDED, 29),  # inside the 30 days
    }
    old_queued, _ = store.enqueue(  # waiting since long ago: never touched, whatever its age
        JobRequest(name="waits", inputs=("waits.png",), intake_key="waits", params=PARAMS), now=NOW - timedelta(days=90)
    )
    ids["waits"] = old_queued.id
    return ids


def settings_for(tmp_path: Path, **kw):
    return load_settings(None, data_dir=str(tmp_path / "data"), **kw)


def test_retention_is_off_by_default(store: Store, jobs: dict[str, int], tmp_path: Path):
    result = apply_retention(store, settings_for(tmp_path), now=NOW)
    assert result.forgotten == [] and len(store.list_jobs(100)) == 5


def test_forget_deletes_old_finished_rows_and_never_a_folder(store: Store, jobs: dict[str, int], tmp_path: Path):
    s = settings_for(tmp_path, retention_days=30)
    dry = apply_retention(store, s, now=NOW, dry_run=True)
    assert sorted(dry.forgotten) == sorted([jobs["cat"], jobs["dog"], jobs["owl"]])
    assert len(store.list_jobs(100)) == 5  # a dry run changes nothing

    result = apply_retention(store, s, now=NOW)
    assert sorted(result.forgotten) == sorted([jobs["cat"], jobs["dog"], jobs["owl"]])
    assert sorted(j.name for j in store.list_jobs(100)) == ["new", "waits"]
    data = tmp_path / "data"
    for folder in ("output/cat", "failed/dog", "failed/owl", "output/new"):
        assert (data / folder / "job.json").exists()
    assert not (data / "archive").exists()
    assert apply_retention(store, s, now=NOW).forgotten == []  # idempotent


def test_archive_moves_folders_into_the_archive_then_forgets_the_rows(store: Store, jobs: dict[str, int],
                                                                      tmp_path: Path):
    data = tmp_path / "data"
    (data / "archive" / "output" / "cat").mkdir(parents=True)  # an earlier "cat" is already archived
    (data / "failed" / "owl").rename(tmp_path / "owl-moved-away")  # a person moved this one already
    s = settings_for(tmp_path, retention_days=30, retention_action="archive")

    result = apply_retention(store, s, now=NOW)

    assert sorted(result.forgotten) == sorted([jobs["cat"], jobs["dog"], jobs["owl"]])
    assert dict(result.archived) == {
        jobs["cat"]: str(data / "archive" / "output" / "cat-2"),
        jobs["dog"]: str(data / "archive" / "failed" / "dog"),
    }
    assert (data / "archive" / "output" / "cat-2" / "input" / "cat.png").read_bytes() == b"png"
    assert (data / "archive" / "failed" / "dog" / "job.json").exists()
    assert not (data / "output" / "cat").exists() and not (data / "failed" / "dog").exists()
    assert (data / "output" / "new" / "job.json").exists()  # too young
    assert sorted(j.name for j in store.list_jobs(100)) == ["new", "waits"]


def test_a_job_retried_meanwhile_is_not_forgotten(store: Store, jobs: dict[str, int], tmp_path: Path):
    assert store.retry(jobs["dog"])  # failed → staging (its files come back), then queued
    result = apply_retention(store, settings_for(tmp_path, retention_days=30), now=NOW)
    assert jobs["dog"] not in result.forgotten
    assert store.get(jobs["dog"]).status is JobStatus.STAGING  # type: ignore[union-attr]


def test_the_daemon_schedules_retention_daily_only_when_it_is_on(store: Store, tmp_path: Path):
    from apscheduler.schedulers.background import BackgroundScheduler

    from i2v_daemon.service.duties import Service

    for days, expected in ((0, None), (7, 86400.0)):
        scheduler = BackgroundScheduler()
        Service(settings_for(tmp_path, retention_days=days), store).schedule(scheduler)
        job = scheduler.get_job("retention")
        assert (job.trigger.interval.total_seconds() if job else None) == expected


def test_a_job_retried_while_its_folder_is_being_archived_gets_its_folder_back(store: Store, jobs: dict[str, int],
                                                                               tmp_path: Path):
    class RetryDuringArchive:
        """The store, with `i2v-daemon retry` of dog landing between the folder's move and the row's delete."""

        def finished_before(self, cutoff, *, limit):
            return store.finished_before(cutoff, limit=limit)

        def forget(self, job_id, *, finished_before):
            if job_id == jobs["dog"]:
                assert store.retry(job_id)
            return store.forget(job_id, finished_before=finished_before)

    data = tmp_path / "data"
    s = settings_for(tmp_path, retention_days=30, retention_action="archive")
    result = apply_retention(RetryDuringArchive(), s, now=NOW)
    assert jobs["dog"] not in result.forgotten and jobs["dog"] in dict(result.skipped)
    assert (data / "failed" / "dog" / "job.json").exists()  # where the retried job will look for it
    assert not (data / "archive" / "failed" / "dog").exists()
    assert store.get(jobs["dog"]).status is JobStatus.STAGING  # type: ignore[union-attr]
