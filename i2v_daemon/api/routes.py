"""The `/api/v1/` routes: submit, list, show, cancel, retry, a job's files, the presets and the events stream.

Every route asks the same code the command line asks (`intake.submit`, `ops.cancel`,
`ops.retry`, `views`), so a job sent here is an ordinary job and the answers match `status`
and `show`. Handlers that touch the database are plain `def`s: FastAPI runs them in its
thread pool, off the event loop that carries the uploads and the event streams.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from i2v_daemon.api import uploads
from i2v_daemon.api.auth import COOKIE
from i2v_daemon.api.context import ApiError, Context, authenticated, context
from i2v_daemon.errors import InputError
from i2v_daemon.logs import get_logger
from i2v_daemon.queue.jobs import Job, JobStatus
from i2v_daemon.views import asks as ops
from i2v_daemon.views import jobs as views

router = APIRouter(prefix="/api/v1", dependencies=[Depends(authenticated)])
Ctx = Annotated[Context, Depends(context)]
MAX_TEXT_FILE_BYTES = 16 * 2**20  # job.log and job.json are kilobytes; a bigger one is served from its end


@router.post("/jobs", status_code=202)
async def submit_job(
    request: Request, ctx: Ctx, idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Queue a job from a multipart form: `image`, and a `sidecar` file or a `params` JSON object."""
    key = _idempotency_key(idempotency_key)
    upload = await uploads.receive(request, Path(str(ctx.settings.work_dir)), ctx.settings.api_max_upload_bytes)
    try:
        if "image" not in upload.files:
            raise ApiError(422, "invalid_input", "the form has no 'image' file; send one, e.g. curl -F image=@cat.png")
        if "sidecar" in upload.files and "params" in upload.fields:
            raise ApiError(422, "invalid_input", "send either a 'sidecar' file or a 'params' field, not both")
        image, image_name = upload.files["image"]
        sidecar, sidecar_name = upload.files.get("sidecar", (None, None))
        params = _params(upload.fields["params"]) if "params" in upload.fields else None
        from i2v_daemon.intake import staging as intake  # on the first upload, not at start: `serve` answers sooner

        submit = partial(
            intake.submit, ctx.settings, ctx.store, image=image, image_name=image_name, sidecar=sidecar,
            sidecar_name=sidecar_name, params=params, idempotency_key=key,
        )
        try:
            job, created = await anyio.to_thread.run_sync(submit)
        except InputError as err:
            raise ApiError(422, *_kind_message(err.as_dict())) from None
    finally:
        await anyio.to_thread.run_sync(upload.discard)  # what intake moved into work/<id>/ is gone from here
    body = {"id": job.id, "name": job.name, "status": views.shown_status(job)}
    return JSONResponse(body, status_code=202 if created else 200)


@router.post("/batches", status_code=202)
async def submit_batch(request: Request, ctx: Ctx) -> dict[str, Any]:
    """A batch: a `manifest` file (.csv or .jsonl, one job per row) and the `image` files it names; its report."""
    upload = await uploads.receive(
        request, Path(str(ctx.settings.work_dir)), ctx.settings.api_max_upload_bytes,
        files=uploads.BATCH_FILE_FIELDS, texts=(), repeated=uploads.BATCH_REPEATED,
    )
    try:
        if "manifest" not in upload.files:
            raise ApiError(422, "invalid_input", "the form has no 'manifest' file; send one, e.g. "
                           "curl -F manifest=@batch.csv -F image=@cat.png -F image=@dog.png")
        manifest, manifest_name = upload.files["manifest"]
        images = {name: path for key, (path, name) in upload.files.items() if key.startswith("image/")}
        from i2v_daemon.intake import batch

        submit = partial(batch.submit_batch, ctx.settings, ctx.store, manifest=manifest, manifest_name=manifest_name,
                         images=images)
        try:
            report: dict[str, Any] = await anyio.to_thread.run_sync(submit)
        except InputError as err:
            raise ApiError(422, *_kind_message(err.as_dict())) from None
    finally:
        await anyio.to_thread.run_sync(upload.discard)
    if report.get("error"):
        raise ApiError(422, "invalid_input", str(report["error"]))
    return report


def _idempotency_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not (1 <= len(raw) <= 200) or not all(33 <= ord(c) <= 126 for c in raw):
        raise ApiError(
            422, "invalid_input", "Idempotency-Key must be 1 to 200 printable ASCII characters without spaces, "
            "e.g. a UUID",
        )
    return raw


def _params(raw: str) -> dict[str, Any]:
    """The `params` field as a JSON object, read as strictly as a `.json` sidecar (no NaN, no repeated keys).

    Whatever Python's parser refuses is a 422 in the sidecar's words: nesting past the recursion limit
    (RecursionError) and integers past 4,300 digits (ValueError) as much as a syntax error.
    """

    def no_constant(token: str) -> Any:
        raise ApiError(422, "invalid_input", f"params: {token} is not a number JSON allows; write a finite number")

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise ApiError(422, "invalid_input", f"params: the key '{k}' appears twice; keep one")
            seen[k] = v
        return seen

    try:
        value = json.loads(raw, parse_constant=no_constant, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as err:
        raise ApiError(
            422, "invalid_input", f"params: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except RecursionError:
        raise ApiError(422, "invalid_input", "params: values are nested too deeply; use one flat object") from None
    except ValueError:  # int_max_str_digits
        raise ApiError(422, "invalid_input", "params: a number in it has far too many digits; fix it") from None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_input", 'params must be a JSON object, e.g. {"prompt": "a cat turns its head"}')
    return value


def _kind_message(error: dict[str, str]) -> tuple[str, str]:
    return error.get("type", "invalid_input"), error.get("message", "")


@router.get("/jobs")
def list_jobs(
    ctx: Ctx, status: str | None = None, limit: Annotated[int, Query(ge=0, le=1000)] = 20,
) -> dict[str, Any]:
    """The same object as `status --json`: counts, and the newest `limit` jobs (of the given statuses)."""
    statuses = _statuses(status) if status else None
    jobs = ctx.store.list_jobs(limit, statuses=statuses)
    return {"counts": ctx.store.counts(), "jobs": [views.job_summary(j) for j in jobs]}


def _statuses(raw: str) -> list[JobStatus]:
    """The contract's five statuses; `queued` includes jobs whose files are still on their way (staging)."""
    shown = {s.value: s for s in JobStatus if s.shown is s}
    out: list[JobStatus] = []
    for name in (s.strip() for s in raw.split(",") if s.strip()):
        if name not in shown:
            raise ApiError(422, "invalid_input", f"status: {name!r} is not a status; use one of {', '.join(shown)}")
        out.append(shown[name])
        if shown[name] is JobStatus.QUEUED:
            out.append(JobStatus.STAGING)
    return out


@router.get("/jobs/{job_id}")
def show_job(job_id: int, ctx: Ctx) -> dict[str, Any]:
    """The same object as `show --json`, with `phase`, `position` and `eta_seconds`."""
    return views.describe(ctx.store, _job(ctx, job_id))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: int, ctx: Ctx) -> dict[str, Any]:
    """Cancel a queued job now, or a running one at its next step (as `i2v-daemon cancel`)."""
    return _outcome(ctx, ops.cancel(ctx.store, job_id))


@router.post("/jobs/{job_id}/retry")
def retry_job(job_id: int, ctx: Ctx) -> dict[str, Any]:
    """Queue a failed or canceled job again (as `i2v-daemon retry`)."""
    return _outcome(ctx, ops.retry(ctx.store, job_id))


def _outcome(ctx: Context, outcome: ops.Outcome) -> dict[str, Any]:
    if not outcome.ok or outcome.job is None:
        kind = {404: "not_found", 409: "conflict"}.get(outcome.status, "conflict")
        error = outcome.error or {"type": kind, "message": outcome.message}
        raise ApiError(outcome.status if outcome.status in (404, 409) else 409, *_kind_message(error))
    return {**views.describe(ctx.store, outcome.job), "message": outcome.message}


def _job(ctx: Context, job_id: int) -> Job:
    job = ctx.store.get(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"there is no job {job_id}; GET /api/v1/jobs lists them")
    return job


# ---- a job's files ---------------------------------------------------------------------------


@router.api_route("/jobs/{job_id}/video", methods=["GET", "HEAD"], response_model=None)
def video(job_id: int, ctx: Ctx, request: Request) -> FileResponse:
    """The job's mp4; `Range` requests get 206, so a `<video>` element can seek."""
    job = _job(ctx, job_id)
    path = ctx.inside_job(job, Path(job.output)) if job.output and job.final_dir else None
    if path is None:
        raise ApiError(404, "not_found", f"job {job_id} has no video ({_why_not(job)})")
    response = FileResponse(path, media_type="video/mp4", filename=path.name, content_disposition_type="inline",
                            stat_result=path.stat())
    _check_range(request, response)
    return response


def _check_range(request: Request, response: FileResponse) -> None:
    """A `Range` past the end is a JSON 416; one that cannot be parsed is ignored (RFC 9110 §14.2: the whole file).

    Starlette's FileResponse would answer both itself, in plain text (416, or 400 for a malformed one).
    An `If-Range` that no longer matches the file makes the Range moot: the whole file, as Starlette does.
    """
    from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

    raw = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if raw is None or (if_range is not None and not response._should_use_range(if_range)):
        return
    size = int(response.headers["content-length"])
    try:
        FileResponse._parse_range_header(raw, size)
    except RangeNotSatisfiable:
        raise ApiError(
            416, "range_not_satisfiable", f"the range {raw!r} starts past the end of the video ({size} bytes)",
            headers={"Content-Range": f"bytes */{size}"},
        ) from None
    except MalformedRangeHeader:
        request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"range"]


@router.api_route("/jobs/{job_id}/poster", methods=["GET", "HEAD"], response_model=None)
def poster(job_id: int, ctx: Ctx) -> FileResponse:
    """One frame of the video (the middle one), as JPEG."""
    job = _job(ctx, job_id)
    path = ctx.inside_job(job, Path(job.final_dir) / "poster.jpg") if job.final_dir else None
    if path is None or job.status is not JobStatus.SUCCEEDED:
        raise ApiError(404, "not_found", f"job {job_id} has no poster ({_why_not(job)})")
    return FileResponse(path, media_type="image/jpeg")


@router.get("/jobs/{job_id}/log", response_model=None)
def job_log(job_id: int, ctx: Ctx) -> Response:
    """The job's own log (`job.log`), in work/ while it runs and in its folder once finished."""
    job = _job(ctx, job_id)
    return _text_file(ctx, job, "job.log", "text/plain; charset=utf-8")


@router.get("/jobs/{job_id}/manifest", response_model=None)
def job_manifest(job_id: int, ctx: Ctx) -> Response:
    """The job's manifest (`job.json`), written when it finishes."""
    job = _job(ctx, job_id)
    return _text_file(ctx, job, "job.json", "application/json")


def _text_file(ctx: Context, job: Job, name: str, media_type: str) -> Response:
    for folder in ctx.job_folders(job):
        path = ctx.inside_job(job, folder / name)
        if path is None:
            continue
        with path.open("rb") as fh:  # read whole: a log still growing would break a declared length
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_TEXT_FILE_BYTES:
                fh.seek(size - MAX_TEXT_FILE_BYTES)
            return Response(fh.read(MAX_TEXT_FILE_BYTES), media_type=media_type)
    what = "manifest" if name == "job.json" else "log"
    raise ApiError(404, "not_found", f"job {job.id} has no {what} yet ({_why_not(job)})")


def _why_not(job: Job) -> str:
    if job.status is JobStatus.SUCCEEDED:
        return "its folder has no such file; it may have been moved or archived"
    if job.status.is_terminal:
        return f"it {job.status.value}"
    return f"it is {job.status.value}; it is written when the job finishes"


# ---- presets and events ------------------------------------------------------------------------


@router.get("/presets")
def presets(ctx: Ctx) -> dict[str, Any]:
    """The presets a job may name (built-in and from the config), and the default one."""
    return {
        "default": ctx.settings.default_preset,
        "presets": {name: p.model_dump(exclude_none=True) for name, p in sorted(ctx.settings.all_presets().items())},
    }


@router.delete("/sessions")
def end_sessions(ctx: Ctx) -> JSONResponse:
    """End every page session (each browser signs in again with the token); the token itself is unchanged."""
    ctx.sessions.revoke_all()
    get_logger().info("api_sessions_revoked")
    response = JSONResponse({"message": "every page session has ended; open /?token=<token> to sign in again"})
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/events", response_class=EventSourceResponse)
async def events(ctx: Ctx, last_event_id: Annotated[str | None, Header()] = None) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: `job` (a `status --json` entry) on every change, `summary` (counts, paused)."""
    async for item in ctx.hub.stream(last_event_id):
        yield item
