"""The page in a real headless Chromium, as a person meets it: sign in, see results, send a job, watch it finish.

Set `I2V_PAGE_SCREENSHOT=docs/page.png` to keep the picture the README shows (otherwise it goes to
the test's temporary folder, so the step still runs).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_api import finished, png, submit
from tests.api.test_api_server import Api, api_fixture  # noqa: F401
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
