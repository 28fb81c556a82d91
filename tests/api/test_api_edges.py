"""The API's edges as a careless or hostile client meets them, on a real `serve` on a loopback port.

Malformed forms and requests are a JSON 4xx with one log line, never a 500 with a traceback (and a
seeded fuzz of the multipart parser keeps it so); connections that send nothing, half their headers
or a trickle of a body are closed; a crowd of silent connections under a 1,024-descriptor limit
leaves room for /healthz; an answer given before a body was read closes the connection; every
authenticated answer is same-origin only; X-Forwarded-For is believed only from configured proxies;
the page's session cookie expires and can be revoked without changing the token.

Every connection goes to 127.0.0.1, and every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_api import png, uploads_left
from tests.api.test_api_server import LAUNCH, Api, Proc, close_api, open_api
from tests.conftest import make_image, wait_for, write_config

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 1.0
READ_TIMEOUT = 1.0
BOUNDARY = "XyZ-b0undary"


@pytest.fixture(scope="module", name="api")
def serve_alone(tmp_path_factory: pytest.TempPathFactory, tiny_i2vgen_dir: Path) -> Iterator[Api]:
    """`serve` without a daemon (nothing runs the jobs sent here), with one-second header and body timeouts."""
    a = open_api(tmp_path_factory.mktemp("edges"), tiny_i2vgen_dir, daemon=False,
                 api_header_timeout_seconds=HEADER_TIMEOUT, api_read_timeout_seconds=READ_TIMEOUT)
    yield a
    close_api(a)


def address(api: Api) -> tuple[str, int]:
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def form(*parts: tuple[list[bytes], bytes], boundary: bytes = BOUNDARY.encode(), newline: bytes = b"\r\n",
         before: bytes = b"") -> bytes:
    """A multipart body from (header lines, content) pairs, written out by hand so it can be wrong."""
    out = before
    for headers, content in parts:
        out += b"--" + boundary + newline + newline.join(headers) + newline + newline + content + newline
    return out + b"--" + boundary + b"--" + newline


def image_part(data: bytes, *extra: bytes) -> tuple[list[bytes], bytes]:
    return [b'Content-Disposition: form-data; name="image"; filename="cat.png"', b"Content-Type: image/png",
            *extra], data


def params_part(value: bytes) -> tuple[list[bytes], bytes]:
    return [b'Content-Disposition: form-data; name="params"'], value


def post_form(api: Api, body: bytes, boundary: str = BOUNDARY) -> httpx.Response:
    return api.client().post("/api/v1/jobs", content=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def log_lines(api: Api, since: int) -> list[dict[str, Any]]:
    return [e for e in api.server.events()[since:]]


def assert_refused(r: httpx.Response, status: int, kind: str, words: str = "") -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == kind and words in error["message"], error


def assert_no_traceback(api: Api, since: int) -> None:
    later = log_lines(api, since)
    failed = [e for e in later if e.get("level") == "error" or "exception" in e or "Traceback" in json.dumps(e)]
    assert failed == [], json.dumps(failed)[:3000]


# ---- malformed forms: one error boundary --------------------------------------------------------------


@pytest.fixture(scope="module")
def cat_png(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return png(tmp_path_factory.mktemp("img"))


MALFORMED = {
    "params nested 10,000 levels": (
        lambda img: form(image_part(img), params_part(b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")),
        422, "invalid_input", "nested too deeply"),
    "a seed of 5,000 digits": (
        lambda img: form(image_part(img), params_part(b'{"prompt": "a cat", "seed": ' + b"9" * 5000 + b"}")),
        422, "invalid_input", "too many digits"),
    "a bogus part header line": (lambda img: form(image_part(img, b"bogus")), 400, "malformed", "multipart"),
    "LF-only line endings": (
        lambda img: form(image_part(img), params_part(b'{"prompt": "a cat"}'), newline=b"\n"), 400, "malformed",
        "multipart"),
    "garbage before the first boundary": (
        lambda img: form(image_part(img), params_part(b'{"prompt": "a cat"}'), before=b"garbage\r\n\x00\xff"),
        400, "malformed", "multipart"),
    "a space in a part header's name": (
        lambda img: form(image_part(img, b"Content Type: image/png")), 400, "malformed", "multipart"),
    "a part header over 8 KiB": (
        lambda img: form(image_part(img, b"X-Note: " + b"a" * 9000)), 400, "malformed", "8 KiB"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_form_is_a_json_4xx_with_one_log_line_and_no_traceback(api: Api, cat_png: bytes, case: str):
    make, status, kind, words = MALFORMED[case]
    since = len(api.server.events())
    r = post_form(api, make(cat_png))
    assert_refused(r, status, kind, words)
    wait_for(lambda: any(e.get("event") == "http_request" for e in log_lines(api, since)), timeout=10,
             what="the request's log line")
    lines = [e for e in log_lines(api, since) if e.get("path") == "/api/v1/jobs"]
    assert len(lines) == 1 and lines[0]["status"] == status and lines[0]["error"] == kind, lines
    assert_no_traceback(api, since)
    assert uploads_left(api) == []


def test_a_boundary_longer_than_rfc_2046_allows_is_400(api: Api, cat_png: bytes):
    boundary = "B" * 300
    since = len(api.server.events())
    r = post_form(api, form(image_part(cat_png), boundary=boundary.encode()), boundary=boundary)
    assert_refused(r, 400, "malformed", "70")
    assert_no_traceback(api, since)


def test_the_same_deep_json_is_refused_alike_as_a_field_and_as_a_sidecar_file(api: Api, cat_png: bytes):
    deep = b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    as_field = post_form(api, form(image_part(cat_png), params_part(deep)))
    sidecar = ([b'Content-Disposition: form-data; name="sidecar"; filename="cat.json"'], deep)
    as_file = post_form(api, form(image_part(cat_png), sidecar))
    assert as_field.status_code == as_file.status_code == 422
    assert "nested too deeply" in as_field.json()["error"]["message"]
    assert "nested too deeply" in as_file.json()["error"]["message"]


def test_a_body_that_is_not_a_form_is_415(api: Api):
    for content_type in ("application/x-www-form-urlencoded", "application/json", "multipart/form-data"):
        r = api.client().post("/api/v1/jobs", content=b"image=cat.png", headers={"Content-Type": content_type})
        assert_refused(r, 415, "unsupported_media_type", "multipart/form-data")


def test_seeded_byte_flips_of_a_valid_form_are_answered_with_json_and_never_a_500(api: Api, cat_png: bytes):
    """Fuzz: 300 copies of a valid submission, each with 1-4 bytes flipped (seeded, so a failure repeats)."""
    valid = form(image_part(cat_png[:600]), params_part(b'{"prompt": "a cat turns its head", "seed": 3}'))
    rng = random.Random(21)
    since = len(api.server.events())
    client = api.client()
    seen: dict[int, int] = {}
    for i in range(300):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        r = client.post("/api/v1/jobs", content=bytes(body),
                        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (202, 400, 415, 422), (i, r.status_code, r.text)
        if r.status_code != 202:
            assert r.json()["error"]["type"] in ("malformed", "unsupported_media_type", "invalid_input"), (i, r.text)
    assert seen.get(400, 0) > 0 and seen.get(422, 0) > 0, seen  # the flips did reach the parser and the checks
    wait_for(lambda: len([e for e in log_lines(api, since) if e.get("path") == "/api/v1/jobs"]) >= 300, timeout=30,
             what="a log line for each request")  # each comes after its answer: read them all before judging
    assert_no_traceback(api, since)
    assert uploads_left(api) == []


def raw_exchange(api: Api, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are; everything the server says until it closes (bounded by `timeout`)."""
    with socket.create_connection(address(api), timeout=timeout) as s:
        s.sendall(data)
        return read_until_closed(s, timeout)


def read_until_closed(s: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    out = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return out + b"<reset>"
        if not chunk:
            return out + b"<closed>"
        out += chunk
    return out + b"<still open>"


def response_of(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/1.1 ") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def test_a_request_that_is_not_http_is_a_json_400_too(api: Api):
    since = len(api.server.events())
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"):
        status, headers, body = response_of(raw_exchange(api, garbage))
        assert status == 400 and headers["content-type"].startswith("application/json"), body
        assert json.loads(body.removesuffix(b"<closed>"))["error"]["type"] == "malformed"
    ours = wait_for(lambda: len(found := [e for e in log_lines(api, since) if e.get("error") == "malformed"]) >= 2
                    and found, timeout=10, what="a log line for each")
    assert all(e["status"] == 400 for e in ours)
    assert not any("Invalid HTTP request" in json.dumps(e) for e in log_lines(api, since))  # ours, not uvicorn's


# ---- slow and silent clients ---------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(api: Api):
    with socket.create_connection(address(api), timeout=10) as s:
        started = time.monotonic()
        assert read_until_closed(s, 8) == b"<closed>"  # nothing said, nothing answered: closed
        assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9


def test_half_a_header_block_gets_408_and_is_closed(api: Api):
    with socket.create_connection(address(api), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        raw = read_until_closed(s, 8)
    status, _, body = response_of(raw)
    assert raw.endswith(b"<closed>") and status == 408, raw[:300]
    assert json.loads(body.removesuffix(b"<closed>"))["error"]["type"] == "timeout"


def test_headers_sent_a_byte_at_a_time_are_not_waited_on_past_the_header_timeout(api: Api):
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with socket.create_connection(address(api), timeout=10) as s:
        started = time.monotonic()
        try:
            for byte in request:  # 5 bytes a second: each byte alone would reset an idle timer
                s.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - started > 8:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = read_until_closed(s, 2)
    assert response_of(raw)[0] == 408, raw[:300]
    assert time.monotonic() - started < 8


def test_an_upload_trickling_in_at_a_byte_a_second_is_dropped_and_leaves_nothing(api: Api, cat_png: bytes):
    body = form(image_part(cat_png), params_part(b'{"prompt": "a cat"}'))
    head = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api.token}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    since = len(api.server.events())
    with socket.create_connection(address(api), timeout=10) as s:
        s.sendall(head)
        started = time.monotonic()
        closed = False
        for byte in body[:12]:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            s.settimeout(1.0)
            try:
                if s.recv(65536, socket.MSG_PEEK) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except ConnectionResetError:
                closed = True
                break
            else:
                raw = read_until_closed(s, 3)
                closed = raw.endswith((b"<closed>", b"<reset>"))
                assert response_of(raw)[0] == 408, raw[:300]
                break
    assert closed and time.monotonic() - started < 10
    timeouts = wait_for(lambda: [e for e in log_lines(api, since) if e.get("event") == "http_timeout"], timeout=10,
                        what="the timeout's log line")
    assert len(timeouts) == 1 and timeouts[0]["phase"] == "body", timeouts
    wait_for(lambda: uploads_left(api) == [], timeout=10, what="the partial upload to be removed")


def test_an_idle_keep_alive_connection_is_closed(api: Api):
    with socket.create_connection(address(api), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw = read_until_closed(s, 12)
    assert response_of(raw)[0] == 200 and raw.endswith(b"<closed>"), raw[-200:]


# ---- an answer before the body: close, do not read on ---------------------------------------------


def test_an_early_401_to_a_huge_declared_body_closes_instead_of_reading_it(api: Api):
    head = (b"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2147483648\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
    raw = raw_exchange(api, head + b"\0" * 1024)
    status, headers, _ = response_of(raw)
    assert status == 401 and headers.get("connection") == "close", raw[:400]
    assert raw.endswith((b"<closed>", b"<reset>"))

    sent = stream_until_refused(api, head, limit=256 * 2**20)
    assert sent < 64 * 2**20, f"the server read {sent:,} bytes of a body it had refused"


def test_an_early_413_closes_too(api: Api):
    head = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api.token}\r\n"
            f"Content-Length: 2147483648\r\nContent-Type: multipart/form-data; boundary=x\r\n\r\n").encode()
    status, headers, _ = response_of(raw_exchange(api, head))
    assert status == 413 and headers.get("connection") == "close"
    assert stream_until_refused(api, head, limit=256 * 2**20) < 64 * 2**20


def stream_until_refused(api: Api, head: bytes, limit: int) -> int:
    """Send `head`, then zeros as fast as the server takes them, up to `limit`; how many it took before closing."""
    chunk = b"\0" * 2**20
    sent = 0
    with socket.create_connection(address(api), timeout=5) as s:
        try:
            s.sendall(head)
            while sent < limit:
                sent += s.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return sent  # closed by the server
        except TimeoutError:
            raise AssertionError(f"the server stopped reading after {sent:,} bytes but kept the connection") from None
    return sent


# ---- many connections under a small descriptor limit ------------------------------------------------


def test_a_crowd_of_silent_connections_under_1024_descriptors_leaves_room_for_healthz(
    api: Api, tmp_path: Path, record_property: Any,
):
    """1,100 connections that say nothing, against a `serve` under `ulimit -n 1024`: /healthz still answers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        if hard != resource.RLIM_INFINITY and hard < 1400:
            pytest.skip(f"this test opens 1,100 sockets and may open only {hard} descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    # The same data folder and token; headers may take 60 s, so the header timeout is not what makes room.
    config = write_config(tmp_path / "crowd.toml", api.env.data, api.env.model_dir, api_header_timeout_seconds=60)
    launch = f"ulimit -n 1024 && exec {sys.executable} -c {_quote(LAUNCH)} serve --config {config} --listen 127.0.0.1:0"
    server = Proc(["/bin/sh", "-c", launch])
    silent: list[socket.socket] = []
    try:
        url = server.wait_for_event("api_ready", timeout=60)["url"].rstrip("/")
        host, port = url.removeprefix("http://").rsplit(":", 1)
        started = time.monotonic()
        for _ in range(1100):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, int(port)))  # in the kernel's queue at once; accepted as the server gets to it
            silent.append(s)
        latencies = []
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(20):
                t = time.monotonic()
                assert client.get("/healthz", headers={"Connection": "close"}).json() == {"ok": True}
                latencies.append(time.monotonic() - t)
                time.sleep(0.1)
        descriptors = len(os.listdir(f"/proc/{server.popen.pid}/fd"))
        shed = sum(1 for s in silent if _closed_by_peer(s))
        record_property("healthz_seconds_max", round(max(latencies), 3))
        record_property("healthz_seconds_median", round(statistics.median(latencies), 3))
        record_property("silent_connections_shed", shed)
        record_property("server_descriptors", descriptors)
        print(f"\n1,100 silent connections, ulimit -n 1024: /healthz max {max(latencies) * 1000:.0f} ms, median "
              f"{statistics.median(latencies) * 1000:.0f} ms over 20; {shed} silent ones shed; "
              f"{descriptors} descriptors open in serve; {time.monotonic() - started:.1f} s in all")
        assert descriptors < 1024
        assert shed > 0  # room was made by closing silent ones, not by running out of descriptors
        assert not any("out of system resource" in line for line in server.lines)
    finally:
        for s in silent:
            s.close()
        assert server.stop() == 0


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False  # open, and nothing said
    except ConnectionResetError:
        return True
    except OSError:
        return False  # not connected yet: still in the kernel's queue


# ---- what a browser may do with a visitor's cookie ---------------------------------------------------


def test_every_answer_forbids_other_sites_from_embedding_it(api: Api):
    client = api.client()
    for path in ("/api/v1/jobs", "/api/v1/presets", "/api/v1/jobs/999999/poster", "/api/v1/jobs/999999/video",
                 "/", "/healthz", "/static/app.js"):
        r = client.get(path)
        assert r.headers.get("cross-origin-resource-policy") == "same-origin", (path, r.status_code)
    with client.stream("GET", "/api/v1/events") as events:
        assert events.headers.get("cross-origin-resource-policy") == "same-origin"


def sign_in(api: Api) -> httpx.Client:
    browser = api.client(token="")
    r = browser.get("/", params={"token": api.token})
    assert r.status_code == 303
    return browser


def test_each_sign_in_gets_its_own_cookie_that_expires(api: Api):
    first, second = sign_in(api), sign_in(api)
    a, b = first.cookies["i2v_session"], second.cookies["i2v_session"]
    assert a != b  # not one fixed value derived from the token
    assert first.get("/api/v1/jobs").status_code == 200 and second.get("/api/v1/jobs").status_code == 200
    cookie = first.get("/", params={"token": api.token}).headers["set-cookie"]
    max_age = int(cookie.lower().split("max-age=")[1].split(";")[0])
    assert 0 < max_age <= 7 * 86400


def test_revoking_the_sessions_signs_every_browser_out_and_keeps_the_token(api: Api):
    browser = sign_in(api)
    assert browser.get("/api/v1/jobs").status_code == 200
    r = api.client().delete("/api/v1/sessions")
    assert r.status_code == 200, r.text
    assert browser.get("/api/v1/jobs").status_code == 401
    assert 'name="token"' in browser.get("/").text  # the page is the sign-in form again
    assert api.client().get("/api/v1/jobs").status_code == 200  # scripts' token unchanged
    again = sign_in(api)
    assert again.get("/api/v1/jobs").status_code == 200


def test_a_forwarded_for_header_is_not_believed_from_an_unconfigured_proxy(api: Api):
    since = len(api.server.events())
    api.client().get("/api/v1/presets", headers={"X-Forwarded-For": "203.0.113.9"})
    line = wait_for(lambda: next((e for e in log_lines(api, since) if e.get("path") == "/api/v1/presets"), None),
                    timeout=10, what="the request's log line")
    assert line["client"] == "127.0.0.1"


def test_a_configured_proxy_is_believed(api: Api, tmp_path: Path):
    config = write_config(tmp_path / "proxied.toml", api.env.data, api.env.model_dir,
                          api_trusted_proxies=["127.0.0.1"])
    server = Proc([sys.executable, "-c", LAUNCH, "serve", "--config", str(config), "--listen", "127.0.0.1:0"])
    try:
        url = server.wait_for_event("api_ready", timeout=60)["url"].rstrip("/")
        httpx.get(url + "/healthz", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
        line = wait_for(lambda: next((e for e in server.events() if e.get("path") == "/healthz"), None),
                        timeout=10, what="the request's log line")
        assert line["client"] == "203.0.113.9"
    finally:
        assert server.stop() == 0


def test_an_image_part_written_to_disk_is_cleaned_up_when_a_later_part_is_malformed(api: Api, tmp_path: Path):
    image = make_image(tmp_path / "big.png", (200, 200)).read_bytes()
    r = post_form(api, form(image_part(image), ([b"bogus"], b"x")))
    assert r.status_code == 400
    assert uploads_left(api) == []


def test_the_upload_limit_still_holds_for_a_body_without_a_length(api: Api, cat_png: bytes):
    def chunks() -> Iterator[bytes]:
        yield b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(300):
            yield b"\0" * 1024
        yield b"\r\n--" + BOUNDARY.encode() + b"--\r\n"

    r = api.client().post("/api/v1/jobs", content=chunks(),
                          headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert_refused(r, 413, "too_large", "api_max_upload_bytes")


def test_a_slow_but_steady_upload_still_arrives(api: Api, cat_png: bytes):
    """The body timeout is about silence and crawling, not about a client that sends in small steady steps."""
    body = form(image_part(cat_png), params_part(b'{"prompt": "a cat"}'))
    pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]

    def paced() -> Iterator[bytes]:
        for piece in pieces:
            time.sleep(READ_TIMEOUT / 3)
            yield piece

    r = api.client().post("/api/v1/jobs", content=paced(),
                          headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                                   "Content-Length": str(len(body))})
    assert r.status_code == 202, r.text

