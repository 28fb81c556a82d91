"""A batch through the API: the same manifest a drop takes, with its images in the same form; one job per row,
a bad row failed alone with its line number (by the daemon's housekeeper), the report in the answer, and the same
manifest again makes no job twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.test_api import finished, png, uploads_left
from tests.api.test_api_server import Api, api_fixture  # noqa: F401

pytestmark = pytest.mark.slow


def send(api: Api, manifest: bytes, images: dict[str, bytes], name: str = "shoot.csv"):  # type: ignore[no-untyped-def]
    files = [("manifest", (name, manifest, "text/csv"))]
    files += [("image", (n, data, "image/png")) for n, data in images.items()]
    return api.client().post("/api/v1/batches", files=files)


def test_a_batch_upload_makes_a_job_per_row_fails_a_bad_row_alone_and_is_not_made_twice(api: Api, tmp_path: Path):
    images = {"owl.png": png(tmp_path, "owl.png"), "elk.png": png(tmp_path, "elk.png", (64, 96))}
    manifest = b"image,prompt,seed\nowl.png,an owl blinks,1\nelk.png,an elk turns,2\nmissing.png,nothing,3\n"
    answer = send(api, manifest, images)
    assert answer.status_code == 202, answer.text
    report = answer.json()
    assert (report["jobs"], report["rejected"]) == (2, 1)
    rows = {r["line"]: r for r in report["rows"]}
    assert rows[4]["status"] == "rejected" and rows[4]["error"].startswith("shoot.csv line 4: missing.png")
    owl = finished(api, rows[2]["job_id"])
    bad = finished(api, rows[4]["job_id"])
    assert owl["status"] == "succeeded" and owl["source"] == "api" and owl["prompt"] == "an owl blinks"
    assert bad["status"] == "failed" and "line 4" in bad["error"]
    assert (api.env.output / "shoot" / "report.json").is_file()
    assert uploads_left(api) == []

    again = send(api, manifest, images).json()
    assert (again["jobs"], again["already_made"]) == (0, 3)


@pytest.mark.parametrize(("manifest", "name", "words"), [
    (b"picture,prompt\nowl.png,x\n", "shoot.csv", "one of them `image`"),
    (b"image,prompt\nowl.png,x\n", "shoot.txt", "a .csv or .jsonl file"),
])
def test_a_batch_the_api_cannot_take_is_422_saying_why(api: Api, tmp_path: Path, manifest: bytes, name: str,
                                                        words: str):
    answer = send(api, manifest, {"owl.png": png(tmp_path, "owl.png")}, name=name)
    assert answer.status_code == 422 and words in answer.json()["error"]["message"]
    assert uploads_left(api) == []
