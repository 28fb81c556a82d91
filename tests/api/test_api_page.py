"""The page in a real headless Chromium, as a person meets it: sign in, see results, send a job, watch it finish.

Set `I2V_PAGE_SCREENSHOT=docs/page.png` to keep the picture the README shows (otherwise it goes to
the test's temporary folder, so the step still runs).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from i2v_daemon.api.events import OVERLAP_US
from i2v_daemon.queue.clock import utcnow
from i2v_daemon.queue.jobs import JobStatus
from i2v_daemon.queue.store import Store
from i2v_daemon.views.jobs import job_summary
from tests.api.test_api import finished, png, submit
from tests.api.test_api_events import request as job_request
from tests.api.test_api_server import Api, api_fixture, close_api, open_api  # noqa: F401
from tests.browser import chromium, require_chromium
from tests.browser import wait_for as wait_in_page
from tests.conftest import age, make_image, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _chromium_present() -> None:
    require_chromium()  # skip (fail under CI) before a daemon is started for nothing


def drop(api: Api, stem: str, sidecar: tuple[str, str], size: tuple[int, int] = (96, 64)) -> None:
    image = make_image(api.env.inbox / f".{stem}.png", size).rename(api.env.inbox / f"{stem}.png")
    side = api.env.inbox / f"{stem}{sidecar[0]}"
    side.write_text(sidecar[1])
    age(image, side)


def job_named(api: Api, name: str, status: str) -> dict[str, Any] | None:
    jobs = api.client().get("/api/v1/jobs", params={"limit": 100}).json()["jobs"]
    return next((j for j in jobs if j["name"] == name and j["status"] == status), None)


def card(driver: Any, job_id: int, status: str | None = None) -> Any:
    from selenium.webdriver.common.by import By

    selector = f'.result[data-job="{job_id}"]' + (f'[data-status="{status}"]' if status else "")
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0] if found else None


def test_a_person_signs_in_sees_results_and_sends_a_job_that_finishes_without_a_reload(api: Api, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    drop(api, "heron", (".txt", "a heron lifts one foot"), size=(120, 80))
    done = wait_for(lambda: job_named(api, "heron", "succeeded"), timeout=180, what="the dropped heron")

    with chromium(tmp_path / "profile") as driver:
        # Without the cookie: only the token form, nothing from the API.
        driver.get(api.url + "/")
        assert driver.find_elements(By.NAME, "token") and not driver.find_elements(By.ID, "results")
        field = driver.find_element(By.NAME, "token")
        field.send_keys(api.token)
        field.submit()  # GET /?token=… → cookie → redirect to /
        wait_in_page(driver, lambda d: d.find_elements(By.ID, "results"), what="the page after signing in")
        assert "token=" not in driver.current_url
        assert driver.execute_script("return document.cookie") == ""  # HttpOnly: no script can read it
        loaded_at = driver.execute_script("return window.__i2vLoadedAt")

        # The finished job: its poster and an inline player that can play the video.
        result = wait_in_page(driver, lambda d: card(d, done["id"], "succeeded"), what="the heron's result card")
        video = result.find_element(By.TAG_NAME, "video")
        assert video.get_attribute("poster").endswith(f"/api/v1/jobs/{done['id']}/poster")
        poster_width = driver.execute_async_script(
            "const done = arguments[arguments.length - 1]; const img = new Image();"
            "img.onload = () => done(img.naturalWidth); img.onerror = () => done(-1); img.src = arguments[0];",
            video.get_attribute("poster"))
        assert poster_width > 0
        duration = driver.execute_async_script(
            "const [v, done] = arguments; v.addEventListener('loadedmetadata', () => done(v.duration));"
            "v.addEventListener('error', () => done(-1)); v.preload = 'metadata'; v.load();", video)
        assert duration > 0  # the browser read the mp4 through the API (with Range requests)
        assert "a heron lifts one foot" in result.text
        assert re.search(r"\d+ succeeded", driver.find_element(By.ID, "counts").text)

        # The paused banner follows `i2v-daemon pause` / `resume` on any host, without a reload.
        api.env.cli("pause", check=True)
        try:
            wait_in_page(driver, lambda d: d.find_element(By.ID, "paused").is_displayed(), what="the paused banner")
        finally:
            api.env.cli("resume", check=True)
        wait_in_page(driver, lambda d: not d.find_element(By.ID, "paused").is_displayed(), what="the banner to go")

        # Send a job with the form: it appears and finishes on this page, without a reload.
        image = make_image(tmp_path / "otter.png", (96, 64))
        driver.find_element(By.ID, "f-image").send_keys(str(image))
        driver.find_element(By.ID, "f-prompt").send_keys("an otter rolls over")
        Select(driver.find_element(By.ID, "f-preset")).select_by_value("tiny")
        driver.find_element(By.ID, "f-send").click()
        message = wait_in_page(driver, lambda d: re.search(r"Queued as #(\d+)", d.find_element(By.ID, "form-msg").text),
                           what="the form's answer")
        job_id = int(message.group(1))
        wait_in_page(driver, lambda d: card(d, job_id, "succeeded"), what=f"job {job_id} to finish on the page")
        assert driver.execute_script("return window.__i2vLoadedAt") == loaded_at
        wait_in_page(driver, lambda d: "an otter rolls over" in card(d, job_id).text, what="the otter's prompt")
        job = api.client().get(f"/api/v1/jobs/{job_id}").json()
        assert job["name"] == "otter" and job["requested"]["preset"] == "tiny"

        screenshot(api, driver, tmp_path)


def screenshot(api: Api, driver: Any, tmp_path: Path) -> None:
    """A busy page for the README: a running job with its progress, a queue, results, one failure."""
    from selenium.webdriver.common.by import By

    client = api.client()
    drop(api, "owl", (".json", json.dumps({"prompt": "an owl", "step": 4})))  # fails: did you mean 'steps'?
    wait_for(lambda: job_named(api, "owl", "failed"), timeout=120, what="the owl to fail")
    long = submit(client, png(tmp_path, "lighthouse.png", (128, 80)), name="lighthouse.png",
                  params={"prompt": "waves roll past a lighthouse at dusk", "steps": 400}).json()["id"]
    queued = [
        submit(client, png(tmp_path, f"{n}.png"), name=f"{n}.png", params={"prompt": p}).json()["id"]
        for n, p in (("cat", "the cat slowly turns its head"), ("harbour", "boats rock in the harbour"))
    ]
    try:
        def step(d: Any) -> int:
            found = re.search(r"step (\d+)/400", " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, ".running")))
            return int(found.group(1)) if found else 0

        wait_in_page(driver, lambda d: step(d) >= 40, what="the running job's steps")  # a bar with some length
        wait_in_page(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queue li")) >= 2, what="the queue")
        target = Path(os.environ.get("I2V_PAGE_SCREENSHOT") or tmp_path / "page.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(target))
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        for job_id in (*queued, long):
            client.post(f"/api/v1/jobs/{job_id}/cancel")
        for job_id in (*queued, long):
            finished(api, job_id)


# ---- a page opened on a database that already holds jobs in every state ------------------------------------

BIDI = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: "cat<RLO>gnp.exe" would show as "catexe.png"


@pytest.fixture(scope="module", name="quiet")
def serve_without_a_daemon(
    tmp_path_factory: pytest.TempPathFactory, tiny_i2vgen_dir: Path,
) -> Iterator[tuple[Api, Store]]:
    """`serve` with no daemon beside it: the jobs a test writes into the database stay in the states it wrote."""
    a = open_api(tmp_path_factory.mktemp("page-states"), tiny_i2vgen_dir, daemon=False)
    store = Store(a.env.db_url, create=False, describe=job_summary)
    yield a, store
    store.close()
    close_api(a)


def every_state(store: Store) -> dict[str, int]:
    """Jobs in every state a person can meet, as intake, workers and a killed worker leave them; name -> id."""
    ids: dict[str, int] = {}
    staged = store.stage([job_request("arriving")], owner="intake/1", lease_seconds=3600)  # files on their way
    ids["arriving"] = staged[0][0].id
    for name in ("waiting", f"cat{BIDI}gnp.exe"):
        ids[name] = store.enqueue(job_request(name))[0].id
    for name, status in (("fine", JobStatus.SUCCEEDED), ("broken", JobStatus.FAILED), ("stopped", JobStatus.CANCELED)):
        job = store.enqueue(job_request(name))[0]
        assert store.claim_next("w-done", lease_seconds=600, job_id=job.id) is not None
        error = None if status is JobStatus.SUCCEEDED else {"type": "generation", "message": f"{name} on purpose"}
        store.finish(job.id, "w-done", status, error=error)
        ids[name] = job.id
    working = store.enqueue(job_request("working"))[0]
    assert store.claim_next("w-alive", lease_seconds=3600, job_id=working.id) is not None
    ids["working"] = working.id
    # A worker killed with kill -9 a minute ago: its lease ran out 40 s ago and nobody has taken the job yet.
    orphan = store.enqueue(job_request("orphan"))[0]
    claimed = store.claim_next("w-gone", lease_seconds=20, job_id=orphan.id, now=utcnow() - timedelta(seconds=60))
    assert claimed is not None
    ids["orphan"] = orphan.id
    return ids


def signed_in(driver: Any, api: Api) -> None:
    from selenium.webdriver.common.by import By

    driver.get(api.url + "/?token=" + api.token)
    wait_in_page(driver, lambda d: d.find_elements(By.ID, "results"), what="the page after signing in")


def test_a_page_opened_on_a_busy_database_shows_every_job_in_every_state(quiet: tuple[Api, Store], tmp_path: Path):
    from selenium.webdriver.common.by import By

    api, store = quiet
    ids = every_state(store)
    # Older than what the event stream replays to a new client: only the page's own snapshot can show them.
    time.sleep(OVERLAP_US / 1e6 + 1)
    listed = api.client().get("/api/v1/jobs", params={"limit": 1000}).json()
    queued = [j["id"] for j in listed["jobs"] if j["status"] == "queued"]
    assert {ids["arriving"], ids["waiting"], ids[f"cat{BIDI}gnp.exe"]} <= set(queued)
    with chromium(tmp_path / "profile") as driver:
        signed_in(driver, api)

        def queue_ids(d: Any) -> list[int]:
            return [int(li.get_attribute("data-job")) for li in d.find_elements(By.CSS_SELECTOR, "#queue li")]

        wait_in_page(driver, lambda d: sorted(queue_ids(d)) == sorted(queued), what="every queued job in the queue")
        assert not driver.find_element(By.ID, "queue-empty").is_displayed()
        counts = driver.find_element(By.ID, "counts").text
        assert f"{listed['counts']['queued']} queued" in counts and len(queued) == listed["counts"]["queued"]
        running = {j["id"] for j in listed["jobs"] if j["status"] == "running"}
        assert {ids["working"], ids["orphan"]} <= running
        wait_in_page(driver, lambda d: {int(r.get_attribute("data-job"))
                                        for r in d.find_elements(By.CSS_SELECTOR, "#running .running")} == running,
                     what="every running job")
        for name in ("fine", "broken", "stopped"):
            wait_in_page(driver, lambda d, n=name: card(d, ids[n]), what=f"the {name} job's result card")
        assert not driver.find_element(By.ID, "results-empty").is_displayed()
        assert "broken on purpose" in card(driver, ids["broken"]).text


def test_a_running_job_whose_worker_is_gone_says_so_instead_of_an_eta(quiet: tuple[Api, Store], tmp_path: Path):
    from selenium.webdriver.common.by import By

    api, store = quiet
    orphan = store.enqueue(job_request("forsaken"))[0]
    assert store.claim_next("w-killed", lease_seconds=20, job_id=orphan.id, now=utcnow() - timedelta(seconds=50))
    late = api.client().get(f"/api/v1/jobs/{orphan.id}").json()["lease_expired_seconds"]
    assert late is not None and late >= 25
    with chromium(tmp_path / "profile") as driver:
        signed_in(driver, api)
        selector = f'#running .running[data-job="{orphan.id}"]'

        def shown(d: Any) -> str:
            return " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, selector))

        text = wait_in_page(driver, lambda d: "worker gone" in shown(d) and shown(d), what="the orphaned job's note")
        seconds = int(re.search(r"lease expired (\d+) s ago", text).group(1))
        assert seconds >= late - 1 and "it will be taken again" in text and "left" not in text


def test_a_name_with_a_bidi_override_is_shown_with_the_override_visible(quiet: tuple[Api, Store], tmp_path: Path):
    from selenium.webdriver.common.by import By

    api, store = quiet
    tricky = job_request(f"invoice{BIDI}fdp.exe")
    job = store.enqueue(tricky)[0]
    assert api.client().get(f"/api/v1/jobs/{job.id}").json()["name"] == f"invoice{BIDI}fdp.exe"  # kept as dropped
    with chromium(tmp_path / "profile") as driver:
        signed_in(driver, api)

        def row(d: Any) -> str:  # found again each time: the queue is rebuilt as details arrive
            return " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, f'#queue li[data-job="{job.id}"]'))

        text = wait_in_page(driver, lambda d: "moves" in row(d) and row(d), what="the job with its prompt")
        assert "invoice\\u202efdp.exe" in text  # escaped as `status` and `show` escape it
        body = driver.execute_script("return document.body.innerText")
        assert BIDI not in body
