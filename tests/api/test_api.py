"""Submitting through the API as an integrator meets it: real `serve`, real `run`, real files, real SQLite.

Authentication and the page's cookie, every refusal (401, 403, 404, 413, 422) with its message,
idempotency, and what a refused upload leaves behind: nothing.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.test_api_server import Api, api_fixture  # noqa: F401
from tests.conftest import make_image, wait_for

pytestmark = pytest.mark.slow


def png(tmp: Path, name: str = "cat.png", size: tuple[int, int] = (96, 64)) -> bytes:
    return make_image(tmp / name, size).read_bytes()


def submit(client: httpx.Client, image: bytes, *, name: str = "cat.png", params: dict | None = None,
           sidecar: tuple[str, bytes] | None = None, headers: dict | None = None) -> httpx.Response:
    files: dict = {"image": (name, image, "image/png")}
    data = {"params": json.dumps(params)} if params is not None else None
    if sidecar is not None:
        files["sidecar"] = (sidecar[0], sidecar[1], "application/octet-stream")
    return client.post("/api/v1/jobs", files=files, data=data, headers=headers)


def uploads_left(api: Api) -> list[str]:
    return [p.name for p in (api.env.data / "work").glob(".upload-*")]


def job_count(api: Api) -> int:
    return sum(api.client().get("/api/v1/jobs", params={"limit": 0}).json()["counts"].values())


def finished(api: Api, job_id: int, timeout: float = 180) -> dict:
    client = api.client()
    return wait_for(
        lambda: (j := client.get(f"/api/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed", "canceled")
        and j, timeout=timeout, what=f"job {job_id} to finish",
    )


# ---- the page's cookie, and where a cookie is not enough -----------------------------------------


def test_a_token_link_sets_a_strict_httponly_cookie_that_opens_the_page_and_the_api(api: Api):
    browser = api.client(token="")
    r = browser.get("/", params={"token": api.token})
    assert r.status_code == 303 and r.headers["location"] == "./"
    cookie = r.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "Path=/" in cookie
    assert api.token not in cookie  # the browser keeps a value derived from the token, not the token
    page = browser.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text
    assert browser.get("/api/v1/jobs").status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_without_a_valid_cookie_the_page_is_only_a_token_form(api: Api):
    for client in (api.client(token=""), api.client(token="", cookies={"i2v_session": "forged"})):
        page = client.get("/")
        assert page.status_code == 200 and 'name="token"' in page.text
        assert "app.js" not in page.text and "/api/" not in page.text
    wrong = api.client(token="").get("/", params={"token": "not-the-token"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers and 'name="token"' in wrong.text


def test_a_cookie_authenticated_post_must_come_from_the_page_itself(api: Api):
    browser = api.client(token="")
    browser.get("/", params={"token": api.token})
    path = "/api/v1/jobs/999999/cancel"  # no such job: 404 means the request got past authentication
    for headers in ({}, {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site", "Origin": api.url}):
        r = browser.post(path, headers=headers)
        assert r.status_code == 403, headers
        assert r.json()["error"]["type"] == "forbidden" and "Bearer" in r.json()["error"]["message"]
    assert browser.post(path, headers={"Origin": api.url}).status_code == 404
    assert browser.post(path, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 404
    assert api.client().post(path).status_code == 404  # a bearer token needs no origin check
    assert browser.get("/api/v1/jobs/999999").status_code == 404  # reading needs none either


def test_no_cross_origin_reads_are_allowed(api: Api):
    evil = {"Origin": "http://evil.example"}
    r = api.client().get("/api/v1/jobs", headers=evil)
    assert "access-control-allow-origin" not in r.headers
    preflight = api.client(token="").options(
        "/api/v1/jobs", headers={**evil, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


# ---- submitting --------------------------------------------------------------------------------


def test_an_image_with_params_becomes_an_ordinary_job_with_its_folder_manifest_and_log(api: Api, tmp_path: Path):
    r = submit(api.client(), png(tmp_path, "owl.png"), name="owl.png", params={"prompt": "an owl blinks", "seed": 7})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["name"] == "owl" and body["status"] == "queued" and isinstance(body["id"], int)
    job = finished(api, body["id"])
    assert job["status"] == "succeeded", job
    folder = Path(job["job_dir"])
    assert folder.parent == api.env.output and folder.name.startswith("owl")
    assert (folder / "input" / "owl.png").read_bytes() == (tmp_path / "owl.png").read_bytes()
    manifest = json.loads((folder / "job.json").read_text())
    assert manifest["job_id"] == body["id"] and manifest["prompt"] == "an owl blinks"
    assert manifest["effective"]["seed"] == 7
    status = api.env.status()  # the CLI sees it like any other job
    assert any(j["id"] == body["id"] and j["status"] == "succeeded" for j in status["jobs"])
    assert uploads_left(api) == []


def test_a_sidecar_file_is_checked_exactly_as_a_dropped_one(api: Api, tmp_path: Path):
    side = tmp_path / "fox.json"
    side.write_text(json.dumps({"prompt": "a fox", "step": 3}))
    before = job_count(api)
    r = submit(api.client(), png(tmp_path), name="fox.png", sidecar=("fox.json", side.read_bytes()))
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["type"] == "invalid_input" and "did you mean 'steps'" in error["message"]
    validate = api.env.cli("validate", str(side))
    assert error["message"] in validate.stdout  # the same words `validate` (and a drop's job.json) use
    assert job_count(api) == before and uploads_left(api) == []


def test_params_with_a_misspelt_key_are_refused_with_the_did_you_mean(api: Api, tmp_path: Path):
    before = job_count(api)
    r = submit(api.client(), png(tmp_path), params={"prompt": "x", "stepz": 2})
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "invalid_input"
    assert "did you mean 'steps'" in r.json()["error"]["message"]
    assert job_count(api) == before and uploads_left(api) == []


@pytest.mark.parametrize(("form", "words"), [
    ({"files": {"params": (None, "{}")}}, "no 'image' file"),
    ({"files": {"image": ("a.png", b"x"), "sidecar": ("a.txt", b"hi")}, "data": {"params": "{}"}}, "not both"),
    ({"files": {"image": ("a.png", b"x")}, "data": {"params": "{not json"}}, "not valid JSON"),
    ({"files": {"image": ("a.png", b"x")}, "data": {"params": "[1, 2]"}}, "must be a JSON object"),
    ({"files": {"image": ("a.png", b"x")}, "data": {"params": '{"prompt": "a", "prompt": "b"}'}}, "appears twice"),
    ({"files": {"image": ("a.png", b"x")}, "data": {"params": '{"steps": NaN}'}}, "finite number"),
    ({"files": {"imgae": ("a.png", b"x")}}, "did you mean 'image'"),
    ({"files": {"image": ("../../etc/.hidden.png", b"x")}}, "cannot name a job folder"),
    ({"files": {"image": ("a.png", b"x"), "params": ("p.json", b"{}")}}, "not a file"),
])  # a body that is no form at all is 415 (test_api_edges)
def test_forms_the_api_cannot_take_are_422_saying_what_to_send(api: Api, form: dict, words: str):
    before = job_count(api)
    r = api.client().post("/api/v1/jobs", **form)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_input" and words in r.json()["error"]["message"]
    assert job_count(api) == before and uploads_left(api) == []


def test_a_damaged_image_is_422_with_the_drops_message(api: Api):
    r = submit(api.client(), b"\x89PNG\r\n\x1a\n" + b"\0" * 40, name="broken.png", params={"prompt": "x"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_input"
    assert "broken.png" in r.json()["error"]["message"]
    assert uploads_left(api) == []


def test_an_upload_over_the_limit_is_413_and_leaves_nothing_behind(api: Api, tmp_path: Path):
    limit = 262144  # api_max_upload_bytes in this config
    before = job_count(api)
    big = png(tmp_path) + b"\0" * (limit + 1)
    declared = submit(api.client(), big, params={"prompt": "too big"})  # Content-Length says so: refused unread
    assert declared.status_code == 413
    error = declared.json()["error"]
    assert error["type"] == "too_large" and "api_max_upload_bytes" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in, stopped past the limit
        boundary = b"b0undary"
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
        stream = io.BytesIO(big)
        while chunk := stream.read(32768):
            yield chunk
        yield b"\r\n--" + boundary + b"--\r\n"

    streamed = api.client().post(
        "/api/v1/jobs", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert streamed.status_code == 413 and streamed.json()["error"]["type"] == "too_large"
    assert job_count(api) == before and uploads_left(api) == []


def test_the_same_idempotency_key_returns_the_first_job_instead_of_a_second(api: Api, tmp_path: Path):
    image = png(tmp_path, "hen.png")
    key = {"Idempotency-Key": "order-4711-hen"}
    first = submit(api.client(), image, name="hen.png", params={"prompt": "a hen pecks"}, headers=key)
    assert first.status_code == 202, first.text
    before = job_count(api)
    again = submit(api.client(), image, name="hen.png", params={"prompt": "a hen pecks"}, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert job_count(api) == before and uploads_left(api) == []
    other = submit(api.client(), image, name="hen.png", params={"prompt": "a hen pecks"},
                   headers={"Idempotency-Key": "order-4712-hen"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    bad = submit(api.client(), image, params={"prompt": "x"}, headers={"Idempotency-Key": "with space"})
    assert bad.status_code == 422 and "Idempotency-Key" in bad.json()["error"]["message"]
    for job_id in (first.json()["id"], other.json()["id"]):
        assert finished(api, job_id)["status"] == "succeeded"


# ---- reading --------------------------------------------------------------------------------------


def test_unknown_jobs_and_paths_are_404_in_json(api: Api):
    client = api.client()
    huge = 2**70  # past any 64-bit id: names no job (the database driver could not even bind it)
    for path in ("/api/v1/jobs/999999", "/api/v1/jobs/999999/video", "/api/v1/jobs/999999/poster",
                 "/api/v1/jobs/999999/log", "/api/v1/jobs/999999/manifest", "/api/v1/jobs/999999/retry",
                 f"/api/v1/jobs/{huge}", f"/api/v1/jobs/{huge}/video", f"/api/v1/jobs/{huge}/cancel",
                 f"/api/v1/jobs/{2**63}/retry", f"/api/v1/jobs/{2**31}/video", "/api/v1/jobs/0", "/api/v1/jobs/-1",
                 "/api/v1/nothing-here"):
        method = "POST" if path.endswith(("retry", "cancel")) else "GET"
        r = client.request(method, path)
        assert r.status_code == 404, path
        assert r.json()["error"]["type"] == "not_found" and r.json()["error"]["message"]


def test_the_job_list_is_the_status_json_object_and_checks_its_query(api: Api):
    client = api.client()
    listed = client.get("/api/v1/jobs", params={"limit": 3}).json()
    assert set(listed) == {"counts", "jobs"} and len(listed["jobs"]) <= 3
    assert {"queued", "running", "succeeded", "failed", "canceled"} <= set(listed["counts"])
    assert set(listed["counts"]) == set(api.env.status()["counts"])
    done = client.get("/api/v1/jobs", params={"status": "succeeded,failed"}).json()["jobs"]
    assert all(j["status"] in ("succeeded", "failed") for j in done)
    bad = client.get("/api/v1/jobs", params={"status": "finished"})
    assert bad.status_code == 422 and "succeeded" in bad.json()["error"]["message"]
    internal = client.get("/api/v1/jobs", params={"status": "staging"})  # ours, not one of the contract's five
    assert internal.status_code == 422 and "staging" not in internal.json()["error"]["message"].split("use one of")[1]
    assert client.get("/api/v1/jobs", params={"limit": 5000}).status_code == 422
    presets = client.get("/api/v1/presets").json()
    assert presets["default"] == "tiny" and presets["presets"]["tiny"]["steps"] == 2
