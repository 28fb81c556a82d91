"""Batch manifests: a CSV or JSON Lines file in the inbox makes one job per row; bad rows fail alone with their
line numbers, paths never lead out of the allowed folders, outside images are copied (never moved), the manifest
ends in output/ with its report, and dropping it again makes no job twice."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from i2v_daemon.intake.staging import Intake
from i2v_daemon.queue.jobs import Job, JobStatus
from i2v_daemon.queue.store import Store
from i2v_daemon.settings import load_settings
from i2v_daemon.work.finish import Finisher
from tests.conftest import age, make_image


class World:
    def __init__(self, tmp_path: Path, **extra: Any) -> None:
        self.data = tmp_path / "data"
        (self.data / "inbox").mkdir(parents=True)
        self.settings = load_settings(None, data_dir=str(self.data), stable_seconds=0, sidecar_wait_seconds=3600,
                                      provenance="off", **extra)
        self.store = Store(f"sqlite:///{self.data / 'jobs.db'}")
        self.store.create_schema()
        finisher = Finisher(self.settings, self.store)

        def rejected(job: Job, owner: str) -> None:
            latest = self.store.get(job.id) or job
            finisher.finish(latest, JobStatus.FAILED, latest.rejection, worker_id=owner, frm=JobStatus.STAGING)

        self.intake = Intake(self.settings, self.store, owner="test/intake", host="test", finish_rejected=rejected)

    @property
    def inbox(self) -> Path:
        return self.data / "inbox"

    def drop(self, name: str, text: str) -> Path:
        tmp = self.inbox / f".{name}"
        tmp.write_text(text)
        path = tmp.rename(self.inbox / name)
        age(path)
        return path

    def jobs(self) -> list[Job]:
        return self.store.list_jobs(1000)

    def close(self) -> None:
        self.store.close()


@pytest.fixture()
def world(tmp_path: Path) -> Any:
    w = World(tmp_path)
    yield w
    w.close()


def _csv(rows: list[str]) -> str:
    return "image,prompt,seed,steps,preset\n" + "".join(r + "\n" for r in rows)


def test_a_csv_of_50_rows_with_3_bad_makes_47_jobs_and_3_failures_with_line_numbers_and_again_none(
    world: World,
) -> None:
    pics = world.inbox / "pics"  # a subfolder of the inbox: left alone by the scanner, read by the manifest
    pics.mkdir()
    rows = []
    for i in range(50):
        make_image(pics / f"p{i:02d}.png", color=(i * 5, 80, 40))
        rows.append(f"pics/p{i:02d}.png,a cat number {i},{i},2,fast")
    rows[9] = "pics/missing.png,no such image,1,2,fast"  # line 11
    rows[19] = "pics/p19.png,bad steps,1,0,fast"  # line 21
    rows[29] = "../../etc/passwd.png,escape,1,2,fast"  # line 31
    world.drop("cats.csv", _csv(rows))
    world.intake.pass_once(once=True)

    jobs = world.jobs()
    queued = [j for j in jobs if j.status is JobStatus.QUEUED]
    failed = [j for j in jobs if j.status is JobStatus.FAILED]
    assert len(queued) == 47 and len(failed) == 3
    errors = sorted(j.error["message"] for j in failed if j.error)
    assert errors[0].startswith("cats.csv line 11: pics/missing.png: no such file")
    assert errors[1].startswith("cats.csv line 21:") and "'steps' must be a whole number" in errors[1]
    assert errors[2].startswith("cats.csv line 31:") and "leads out of the manifest's folder" in errors[2]
    for job in failed:
        manifest = json.loads((Path(job.final_dir or "") / "job.json").read_text())
        assert manifest["status"] == "failed" and "cats.csv line" in manifest["error"]["message"]
    cat3 = next(j for j in queued if j.name == "p03")
    assert (cat3.prompt, cat3.params.seed, cat3.params.steps, cat3.params.preset) == ("a cat number 3", 3, 2, "fast")
    assert (world.settings.work_dir / str(cat3.id) / "input" / "p03.png").is_file()
    assert not (pics / "p03.png").exists()  # in the inbox: moved into its job, as a drop is

    report = json.loads((world.settings.output_dir / "cats" / "report.json").read_text())
    assert (report["jobs"], report["rejected"], report["already_made"]) == (47, 3, 0)
    assert {r["line"]: r["status"] for r in report["rows"]}[11] == "rejected"
    assert {r["line"]: r["job_id"] for r in report["rows"]}[5] == next(j.id for j in queued if j.name == "p03")
    assert (world.settings.output_dir / "cats" / "cats.csv").is_file()
    assert not (world.inbox / "cats.csv").exists()

    world.drop("cats.csv", _csv(rows))  # the same manifest again
    world.intake.pass_once(once=True)
    assert len(world.jobs()) == 50
    again = json.loads((world.settings.output_dir / "cats-2" / "report.json").read_text())
    assert (again["jobs"], again["already_made"]) == (0, 50)
    assert sorted(r["job_status"] for r in again["rows"]).count("failed") == 3


def test_images_outside_the_inbox_are_copied_never_moved_and_only_inside_batch_roots(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    make_image(photos / "dog.png")
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    make_image(secret / "private.png")
    world = World(tmp_path, batch_roots=[str(photos)])
    try:
        lines = [{"image": str(photos / "dog.png"), "prompt": "a dog", "seed": 4},
                 {"image": str(secret / "private.png"), "prompt": "not allowed"},
                 {"image": "dog.png", "prompt": "relative, but not in the inbox"}]
        world.drop("pets.jsonl", "\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
        world.intake.pass_once(once=True)
        jobs = world.jobs()
        dog = next(j for j in jobs if j.status is JobStatus.QUEUED)
        assert dog.name == "dog" and dog.params.seed == 4
        assert (photos / "dog.png").is_file()  # copied, never moved
        assert (world.settings.work_dir / str(dog.id) / "input" / "dog.png").read_bytes() == \
            (photos / "dog.png").read_bytes()
        errors = sorted(j.error["message"] for j in jobs if j.status is JobStatus.FAILED and j.error)
        assert len(errors) == 3
        assert any("line 2:" in e and "outside the folders a manifest may name" in e for e in errors)
        assert any("line 3:" in e and "no such file" in e for e in errors)
        assert any("line 4:" in e and "not JSON" in e for e in errors)
        assert (secret / "private.png").is_file()
    finally:
        world.close()


def test_a_link_that_leads_out_of_the_manifests_folder_is_refused(world: World, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    make_image(outside)
    os.symlink(outside, world.inbox / "sneaky.png")
    world.drop("one.csv", "image,prompt\nsneaky.png,x\n")
    world.intake.pass_once(once=True)
    [job] = world.jobs()
    assert job.status is JobStatus.FAILED and job.error and "leads out of the manifest's folder" in job.error["message"]
    assert outside.is_file()


def test_a_manifest_without_an_image_column_fails_whole_into_failed_with_its_report(world: World) -> None:
    world.drop("oops.csv", "picture,prompt\ncat.png,a cat\n")
    world.intake.pass_once(once=True)
    assert world.jobs() == []
    report = json.loads((world.settings.failed_dir / "oops" / "report.json").read_text())
    assert "must name the columns, one of them `image`" in report["error"]
    assert (world.settings.failed_dir / "oops" / "oops.csv").is_file()


def test_a_manifest_longer_than_max_batch_rows_fails_whole(tmp_path: Path) -> None:
    world = World(tmp_path, max_batch_rows=2)
    try:
        world.drop("big.csv", "image,prompt\na.png,x\nb.png,y\nc.png,z\n")
        world.intake.pass_once(once=True)
        assert world.jobs() == []
        report = json.loads((world.settings.failed_dir / "big" / "report.json").read_text())
        assert "more than max_batch_rows = 2" in report["error"]
    finally:
        world.close()


def test_validate_checks_a_manifests_rows_without_moving_its_images(world: World, capsys: Any) -> None:
    from i2v_daemon.intake.validate import validate

    pics = world.inbox / "pics"
    pics.mkdir()
    make_image(pics / "a.png")
    bad = world.inbox.parent / "bad.csv"
    bad.write_text("image,prompt,steps\npics/a.png,x,2\npics/b.png,y,2\n")
    good = world.inbox / "good.csv"
    good.write_text("image,prompt\npics/a.png,x\n")
    (world.inbox.parent / "pics").mkdir()
    make_image(world.inbox.parent / "pics" / "a.png")
    assert validate(world.settings, [str(bad), str(good)]) == 1
    out = capsys.readouterr().out
    assert "1 of 2 rows would fail: bad.csv line 3: pics/b.png: no such file" in out
    assert f"ok {good} (1 rows, each a valid job)" in out
    assert (pics / "a.png").is_file() and world.jobs() == []
