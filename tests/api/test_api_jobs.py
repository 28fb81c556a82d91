"""Following jobs through the API: server-sent events from the database, files with `Range`, cancel and retry.

Runs on SQLite and on PostgreSQL (the events come from whichever database the daemon writes), each
time with a real `serve` beside a real `run` with the tiny model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_api import finished, png, submit
from tests.api.test_api_server import Api, close_api, open_api
from tests.conftest import age, make_image, wait_for
from tests.databases import BACKENDS, database

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=BACKENDS, name="api")
def api_on_each_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_i2vgen_dir: Path,
) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    with database(request.param, tmp) as url:
        a = open_api(tmp, tiny_i2vgen_dir, database_url=url)
        yield a
        close_api(a)


@dataclass
class Event:
    kind: str
    id: str | None
    data: Any


class EventStream:
    """`GET /api/v1/events` read in a thread; `wait` blocks until the events seen so far satisfy a condition."""

    def __init__(self, api: Api, last_event_id: str | None = None) -> None:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.client = api.client(timeout=httpx.Timeout(30, read=60))
        self.response = self.client.send(self.client.build_request("GET", "/api/v1/events", headers=headers),
                                         stream=True)
        assert self.response.status_code == 200
        assert self.response.headers["content-type"].startswith("text/event-stream")
        self.events: list[Event] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        kind, eid, data = "message", None, []
        try:
            for line in self.response.iter_lines():
                if line == "":
                    if data:
                        with self.changed:
                            self.events.append(Event(kind, eid, json.loads("\n".join(data))))
                            self.changed.notify_all()
                    kind, eid, data = "message", None, []
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("id:"):
                    eid = line[3:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
        except (httpx.HTTPError, RuntimeError):
            pass  # closed by `close()`

    def jobs(self, job_id: int) -> list[Event]:
        return [e for e in self.events if e.kind == "job" and e.data["id"] == job_id]

    def wait(self, done: Callable[[EventStream], bool], timeout: float = 180, what: str = "events") -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: done(self), timeout):
                raise AssertionError(f"timed out waiting for {what}; got {[(e.kind, e.data) for e in self.events]}")

    def close(self) -> None:
        self.response.close()
        self.thread.join(10)


def statuses(events: list[Event]) -> list[str]:
    return [e.data["status"] for e in events]


def test_events_follow_jobs_from_queued_through_progress_to_finished_and_resume_after_last_event_id(
    api: Api, tmp_path: Path,
):
    client = api.client()
    stream = EventStream(api)
    elk = None
    try:
        stream.wait(lambda s: any(e.kind == "summary" for e in s.events), what="the first summary")
        assert set(stream.events[0].data["counts"]) >= {"queued", "running", "succeeded"}
        api.env.cli("pause", check=True)
        # A thousand steps: long enough to report progress more than once on any machine, then canceled.
        r = submit(client, png(tmp_path, "elk.png"), name="elk.png", params={"prompt": "an elk", "steps": 1000})
        assert r.status_code == 202, r.text
        elk = r.json()["id"]
        stream.wait(lambda s: "queued" in statuses(s.jobs(elk)), what="the queued event")
        stream.wait(lambda s: any(e.kind == "summary" and e.data["paused"] for e in s.events), what="paused")
        api.env.cli("resume", check=True)
        stream.wait(lambda s: len({e.data["progress"] for e in s.jobs(elk) if e.data["status"] == "running"}) >= 3,
                    what="progress events")
        assert client.post(f"/api/v1/jobs/{elk}/cancel").status_code == 200
        stream.wait(lambda s: "canceled" in statuses(s.jobs(elk)), what="the canceled event")
        owl = submit(client, png(tmp_path, "owl.png"), name="owl.png", params={"prompt": "an owl"}).json()["id"]
        stream.wait(lambda s: "succeeded" in statuses(s.jobs(owl)), what="the succeeded event")
    finally:
        stream.close()
        api.env.cli("resume")  # whatever failed, the module's daemon goes on with the other tests' jobs
        if elk is not None:
            client.post(f"/api/v1/jobs/{elk}/cancel")
    seen = statuses(stream.jobs(elk))
    assert seen[0] in ("staging", "queued") and seen[-1] == "canceled"
    assert seen.index("queued") < seen.index("running") < seen.index("canceled")
    running = [e for e in stream.jobs(elk) if e.data["status"] == "running"]
    progress = [e.data["progress"] for e in running]
    assert progress == sorted(progress) and 0 < progress[-1] < 1  # steps, reported as they came
    done = stream.jobs(owl)[-1]
    assert done.data["status"] == "succeeded" and done.data["output"].endswith(".mp4") and done.data["progress"] == 1
    for job_id in (elk, owl):
        mine = stream.jobs(job_id)
        assert all(e.id and e.id.endswith(f"-{job_id}") for e in mine)
        assert len({e.id for e in mine}) == len(mine)  # no event twice
    summaries = [e.data["paused"] for e in stream.events if e.kind == "summary"]
    assert summaries.index(True) < len(summaries) - 1 - summaries[::-1].index(False)  # paused, then resumed

    # A client that lost the stream after the elk's first progress resumes with Last-Event-ID: it gets
    # the current state of each job changed since (the elk canceled, the owl succeeded), once each,
    # and none of the states it already had.
    resumed = EventStream(api, last_event_id=running[0].id)
    try:
        resumed.wait(lambda s: any(e.kind == "summary" for e in s.events), what="the summary after the catch-up")
    finally:
        resumed.close()
    assert statuses(resumed.jobs(elk)) == ["canceled"] and statuses(resumed.jobs(owl)) == ["succeeded"]
    first_summary = next(i for i, e in enumerate(resumed.events) if e.kind == "summary")
    assert all(resumed.events.index(e) < first_summary for e in resumed.jobs(elk) + resumed.jobs(owl))


def test_a_dropped_jobs_video_honours_range_and_its_poster_log_and_manifest_are_served(api: Api):
    # Dropped in the inbox, not sent: the API serves every job in the database, whoever took it in.
    made = make_image(api.env.inbox / ".fox.png").rename(api.env.inbox / "fox.png")
    (api.env.inbox / "fox.txt").write_text("a fox looks up")
    age(made, api.env.inbox / "fox.txt")
    client = api.client()

    def fox() -> dict | None:
        jobs = client.get("/api/v1/jobs", params={"limit": 50}).json()["jobs"]
        return next((j for j in jobs if j["name"] == "fox" and j["status"] == "succeeded"), None)

    job = wait_for(fox, timeout=180, what="the dropped fox to succeed")
    base = f"/api/v1/jobs/{job['id']}"
    on_disk = Path(job["output"]).read_bytes()
    whole = client.get(f"{base}/video")
    assert whole.status_code == 200 and whole.content == on_disk
    assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
    part = client.get(f"{base}/video", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == on_disk[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{len(on_disk)}"
    tail = client.get(f"{base}/video", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == on_disk[-10:]
    past = client.get(f"{base}/video", headers={"Range": f"bytes={len(on_disk) + 5}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(on_disk)}"
    assert past.json()["error"]["type"] == "range_not_satisfiable"
    stale = client.get(f"{base}/video", headers={"Range": f"bytes={len(on_disk) + 5}-", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == on_disk  # the file changed since: the whole of it
    for unreadable in ("items=0-1", "bytes=abc", "bytes=100-50"):  # RFC 9110: ignored, the whole video
        ignored = client.get(f"{base}/video", headers={"Range": unreadable})
        assert ignored.status_code == 200 and ignored.content == on_disk, unreadable
    head = client.head(f"{base}/video")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(on_disk) and head.content == b""
    poster = client.get(f"{base}/poster")
    assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
    assert poster.content[:2] == b"\xff\xd8" and poster.content == (Path(job["job_dir"]) / "poster.jpg").read_bytes()
    log = client.get(f"{base}/log")
    assert log.status_code == 200 and log.text == (Path(job["job_dir"]) / "job.log").read_text()
    manifest = client.get(f"{base}/manifest").json()
    assert manifest["job_id"] == job["id"] and manifest["status"] == "succeeded"
    assert manifest["poster"] == "poster.jpg"


def test_cancel_and_retry_answer_as_the_cli_does_with_200_409_and_404(api: Api, tmp_path: Path):
    client = api.client()
    image = png(tmp_path, "yak.png")
    long = submit(client, image, name="yak.png", params={"prompt": "a yak", "steps": 1000}).json()["id"]
    behind = submit(client, image, name="yak.png", params={"prompt": "another yak", "steps": 1000}).json()["id"]
    try:
        cancel_then_retry(api, client, long, behind)
    finally:  # a thousand steps each: never left running for the next test, whatever failed
        for job_id in (long, behind):
            client.post(f"/api/v1/jobs/{job_id}/cancel")


def cancel_then_retry(api: Api, client: httpx.Client, long: int, behind: int) -> None:
    wait_for(lambda: client.get(f"/api/v1/jobs/{long}").json()["step"] >= 1, what="the long job to step")
    running = client.get(f"/api/v1/jobs/{long}").json()
    assert running["status"] == "running" and running["phase"] and running["position"] is None
    waiting = client.get(f"/api/v1/jobs/{behind}").json()
    assert waiting["status"] == "queued" and waiting["position"] == 1
    assert client.get(f"/api/v1/jobs/{behind}/video").status_code == 404
    assert client.get(f"/api/v1/jobs/{behind}/manifest").json()["error"]["type"] == "not_found"

    queued = client.post(f"/api/v1/jobs/{behind}/cancel")
    assert queued.status_code == 200 and queued.json()["id"] == behind
    stop = client.post(f"/api/v1/jobs/{long}/cancel")
    assert stop.status_code == 200 and "next step" in stop.json()["message"]
    for job_id in (long, behind):
        assert finished(api, job_id)["status"] == "canceled"
    again = client.post(f"/api/v1/jobs/{long}/cancel")
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"
    assert client.get(f"/api/v1/jobs/{long}/video").status_code == 404  # canceled: no video
    assert "canceled" in client.get(f"/api/v1/jobs/{long}/log").text

    retried = client.post(f"/api/v1/jobs/{behind}/retry")
    assert retried.status_code == 200 and retried.json()["status"] in ("staging", "queued", "running")
    twice = client.post(f"/api/v1/jobs/{behind}/retry")
    assert twice.status_code == 409 and "only failed or canceled" in twice.json()["error"]["message"]
    assert client.post(f"/api/v1/jobs/{behind}/cancel").status_code == 200  # a thousand steps: stop it again
    assert finished(api, behind)["status"] == "canceled"
    assert api.env.status()["counts"]["running"] == 0
    assert client.post("/api/v1/jobs/999999/cancel").status_code == 404
