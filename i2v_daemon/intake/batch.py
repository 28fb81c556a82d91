"""Batch manifests: a `NAME.csv` or `NAME.jsonl` in the inbox (or a preset's folder), one job per row.

Each row names an `image` (relative to the manifest's folder, or absolute inside `batch_roots`; a
path that leads out of them is refused) and any sidecar key. A row becomes a job exactly as a
dropped pair does (the same schema, messages and staging); a bad row becomes a rejected job of its
own in failed/, its error naming the manifest's line. An image inside the inbox moves into its job
as a drop does; one outside is copied and never moved. Each row's intake key is the manifest's
content and the row's line, so the same manifest dropped again makes no job twice. The manifest
then goes to `output/NAME/` with `report.json` (row → job), or to `failed/NAME/` when no row was valid.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon.errors import InputError
from i2v_daemon.intake.images import IMAGE_SUFFIXES, inspect_image
from i2v_daemon.intake.inbox import MANIFEST_SUFFIXES
from i2v_daemon.intake.sidecar import parse_values
from i2v_daemon.params import FLOAT_RANGES, INT_RANGES
from i2v_daemon.queue.jobs import JobRequest

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store
    from i2v_daemon.settings import Settings

#: The most bytes of a manifest read (a longer one fails whole, saying so).
MAX_MANIFEST_BYTES = 64 << 20


@dataclass
class Row:
    """One row of a manifest, checked: its request, and the image to move or copy into the job."""

    line: int
    request: JobRequest
    image: Path | None  # None when the row is rejected before an image was found
    move: bool = False  # the image is in the inbox: moved into the job, not copied


@dataclass
class Batch:
    """A parsed manifest: its rows (valid or rejected), or the reason it failed whole."""

    path: Path
    digest: str
    rows: list[Row] = field(default_factory=list)
    error: str | None = None


def read_batch(path: Path, settings: Settings, *, folder: str = "", inbox: Path, source: str | None = None) -> Batch:
    """Parse and check a manifest; every problem becomes a rejected row or the manifest's own error."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as err:
        return Batch(path, "", error=f"{path.name}: cannot read it: {err.strerror}")
    digest = hashlib.sha256(b"i2v-batch-v1|" + data).hexdigest()
    batch = Batch(path, digest)
    if len(data) > MAX_MANIFEST_BYTES:
        batch.error = f"{path.name}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; split it into several manifests"
        return batch
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        batch.error = f"{path.name}: not UTF-8 text (byte {err.start}); save it as UTF-8"
        return batch
    try:
        records = list(_records(path, text))
    except InputError as err:
        batch.error = str(err)
        return batch
    if len(records) > settings.max_batch_rows:
        batch.error = (f"{path.name}: {len(records)} rows, more than max_batch_rows = {settings.max_batch_rows}; "
                       "split it, or raise max_batch_rows")
        return batch
    if not records:
        batch.error = f"{path.name}: no rows; give a header line with `image` (CSV) or one JSON object a line"
        return batch
    uses: dict[Path, int] = {}
    for line, values in records:
        batch.rows.append(_row(path, line, values, settings, digest, folder, inbox, source))
    for row in batch.rows:  # an inbox image named by several rows is copied for all but its last row
        if row.image is not None and row.move:
            uses[row.image] = uses.get(row.image, 0) + 1
    for row in reversed(batch.rows):
        if row.image is not None and row.move:
            uses[row.image] -= 1
            row.move = uses[row.image] == 0
    return batch


def _records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, values) of each row; raises InputError when the manifest as a whole cannot be read."""
    if path.suffix.lower() == ".jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                value = {"__error__": f"not JSON ({err.msg} at column {err.colno})"}
            if not isinstance(value, dict):
                value = {"__error__": "each line must be one JSON object such as {\"image\": \"cat.png\", ...}"}
            out.append((number, value))
        return out
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = reader.fieldnames or []
    if "image" not in fields:
        raise InputError(f"{path.name}: the first line must name the columns, one of them `image` "
                         f"(found {', '.join(repr(f) for f in fields) or 'none'})")
    rows = []
    for values in reader:
        extra = values.pop(None, None)  # type: ignore[call-overload]
        row: dict[str, Any] = {k: _cell(k, v) for k, v in values.items() if k and v not in (None, "")}
        if extra:
            row["__error__"] = f"{len(extra)} more cells than the header has columns"
        rows.append((reader.line_num, row))
    return rows


def _cell(key: str, value: str) -> Any:
    """A CSV cell as the type its key takes (a number stays text when it is not one: the schema says so)."""
    text = value.strip()
    try:
        if key in INT_RANGES and text.lstrip("-").isdigit():
            return int(text)
        if key in FLOAT_RANGES:
            return float(text)
    except ValueError:
        pass
    return value


def _row(path: Path, line: int, values: dict[str, Any], settings: Settings, digest: str, folder: str,
         inbox: Path, source: str | None) -> Row:
    from i2v_daemon.intake.staging import _request, display

    where = f"{path.name} line {line}"
    key = f"batch:{digest}:{line}"
    source = source or ("inbox/" + folder if folder else "inbox")
    raw = str(values.get("image") or "")
    stem = Path(raw).stem or f"{path.stem}-line{line}"
    try:
        if "__error__" in values:
            raise InputError(f"{where}: {values['__error__']}")
        if not raw:
            raise InputError(f"{where}: no `image`; give the image's path (relative to {path.name}'s folder)")
        image, move = resolve_image(raw, path.parent, settings, inbox, where)
        info = inspect_image(image, max_pixels=settings.max_image_pixels, name=image.name)
        side = parse_values({k: v for k, v in values.items() if k != "image"}, name=where)
        request = _request(stem, side, settings, key, (display(image.name),), folder, source, where,
                           [*info.notes, f"from {path.name}, line {line}"])
        return Row(line, request, image, move)
    except InputError as err:
        message = str(err) if str(err).startswith(path.name) else f"{where}: {err}"
        rejected = JobRequest(name=display(stem), inputs=(), intake_key=key,
                              rejection={"type": "invalid_input", "message": message}, source=source)
        return Row(line, rejected, None)


def resolve_image(raw: str, base: Path, settings: Settings, inbox: Path, where: str) -> tuple[Path, bool]:
    """The image a row names, and whether it is in the inbox (moved) rather than outside (copied).

    Relative paths are read from the manifest's folder and must stay inside it; absolute ones must
    be inside one of `batch_roots` (or the inbox). Links are never followed out of them.
    """
    given = Path(raw)
    if "\0" in raw:
        raise InputError(f"{where}: the image path contains a NUL character")
    roots = [Path(r) for r in settings.batch_roots] + [inbox]
    if given.is_absolute():
        candidate = given
        allowed = [r for r in roots if _inside(candidate, r)]
        if not allowed:
            shown = ", ".join(str(r) for r in settings.batch_roots) or "none set"
            raise InputError(f"{where}: {raw} is outside the folders a manifest may name (batch_roots: {shown}); "
                             "add its folder to batch_roots, or give a path relative to the manifest")
    else:
        candidate = base / given
        if not _inside(candidate, base):
            raise InputError(f"{where}: {raw} leads out of the manifest's folder; give a path inside it")
    if candidate.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{where}: {raw} is not a .png, .jpg, .jpeg or .webp image")
    try:
        st = os.lstat(candidate)
    except FileNotFoundError:
        raise InputError(f"{where}: {raw}: no such file") from None
    except OSError as err:
        raise InputError(f"{where}: {raw}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{where}: {raw} is not a regular file (links, folders and devices are never read)")
    return candidate, _inside(candidate, inbox)


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, its links resolved, lies inside `root` (also resolved)."""
    try:
        real = Path(os.path.realpath(path))
        top = Path(os.path.realpath(root))
    except (OSError, ValueError):
        return False
    return real == top or top in real.parents


def bring_in(row: Row, dest: Path) -> None:
    """Move (inbox) or copy (elsewhere) the row's image into the job's input folder."""
    from i2v_daemon import files as folders

    assert row.image is not None
    target = dest / row.image.name
    if row.move:
        folders.move_file(row.image, target, durable=False)
        return
    dest.mkdir(parents=True, exist_ok=True)
    temp = dest / f".{row.image.name}.part"
    shutil.copyfile(row.image, temp, follow_symlinks=False)
    os.replace(temp, target)


def report(batch: Batch, outcome: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """What `report.json` says: each row's line and the job it became (or why it did not)."""
    rows = [{"line": r.line, "image": str(r.image) if r.image else None, **outcome.get(r.line, {})}
            for r in batch.rows]
    return {
        "manifest": batch.path.name, "sha256": batch.digest, "error": batch.error,
        "jobs": sum(1 for r in rows if r.get("status") == "queued"),
        "rejected": sum(1 for r in rows if r.get("status") == "rejected"),
        "already_made": sum(1 for r in rows if r.get("status") == "already made"),
        "rows": rows,
    }


def take_batch(intake: Any, folder: str, path: Path, *, inbox: Path | None = None,
               source: str | None = None) -> dict[str, Any]:
    """Stage every row of one manifest (as Intake.take stages groups), then publish the manifest and its report.

    Safe to repeat after a crash at any line: rows already staged are found by their keys (and
    reported as "already made"); the manifest leaves the inbox only inside its finished folder.
    """
    from i2v_daemon import files as folders
    from i2v_daemon.logs import JobLog, get_logger

    log = get_logger()
    s = intake.s
    batch = read_batch(path, s, folder=folder, inbox=inbox or Path(s.inbox_dir), source=source)
    outcome: dict[int, dict[str, Any]] = {}
    if batch.error is None:
        staged = intake.store.stage([r.request for r in batch.rows], owner=intake.owner,
                                    lease_seconds=s.lease_seconds, host=intake.host)
        moved = []
        for row, (job, created) in zip(batch.rows, staged, strict=True):
            if not created:
                outcome[row.line] = {"job_id": job.id, "name": job.name, "status": "already made",
                                     "job_status": job.status.value,
                                     "note": "the same row of the same manifest made this job before"}
                continue
            try:
                if row.image is not None:
                    bring_in(row, folders.job_dir(s.work_dir, job.id) / "input")
            except OSError as err:
                intake.store.unstage(job.id, intake.owner)
                outcome[row.line] = {"job_id": None, "status": "not taken",
                                     "error": f"cannot bring {row.image} into the job: {err.strerror}; drop the "
                                              "manifest again once it can be read"}
                continue
            moved.append((row, job))
            error = row.request.rejection
            outcome[row.line] = {"job_id": job.id, "name": job.name, "status": "rejected" if error else "queued",
                                 "error": error["message"] if error else None}
        folders.sync_all([folders.job_dir(s.work_dir, job.id) / "input" for _, job in moved] + [path.parent])
        queued = set(intake.store.mark_staged([job.id for row, job in moved if not row.request.rejection],
                                              intake.owner))
        for row, job in moved:
            jlog = JobLog(folders.job_dir(s.work_dir, job.id) / "job.log", job.id, job.name)
            jlog.info("received", inputs=list(job.inputs), batch=path.name, line=row.line, folder=job.source)
            for note in row.request.notes:
                jlog.info("note", message=note)
            if row.request.rejection:
                jlog.warning("invalid_input", error=row.request.rejection["message"])
                intake.finish_rejected(job, intake.owner)
            elif job.id in queued:
                jlog.info("queued", **(job.params.as_dict() if job.params else {}))
        if queued:
            intake.on_queued()
    doc = report(batch, outcome)
    valid = doc["jobs"] + sum(1 for r in doc["rows"] if r.get("job_status") not in (None, "failed"))
    root = Path(s.output_dir if valid else s.failed_dir)
    wdir = Path(s.work_dir) / f"batch-{batch.digest[:16] or os.urandom(8).hex()}"
    wdir.mkdir(parents=True, exist_ok=True)
    folders.write_json(wdir / "report.json", doc)
    folders.move_file(path, wdir / path.name)
    dest = folders.free_name(root, path.stem)
    folders.publish(wdir, dest)
    log.info("batch_taken", manifest=path.name, folder=str(dest), jobs=doc["jobs"], rejected=doc["rejected"],
             already_made=doc["already_made"], error=batch.error)
    return {**doc, "folder": str(dest)}


def publish_leftovers(work_dir: Path, output_dir: Path, failed_dir: Path) -> None:
    """Finish publishing manifests a crash left in work/batch-*/ (their report written, the manifest moved in)."""
    from i2v_daemon import files as folders

    for wdir in sorted(Path(work_dir).glob("batch-*")):
        try:
            doc = json.loads((wdir / "report.json").read_text())
            manifest = wdir / str(doc.get("manifest"))
        except (OSError, ValueError):
            doc, manifest = {}, wdir / "-"
        if not manifest.is_file():  # the manifest is still in the inbox: the next pass does it all again
            shutil.rmtree(wdir, ignore_errors=True)
            continue
        valid = doc.get("jobs", 0) + doc.get("already_made", 0)
        folders.publish(wdir, folders.free_name(Path(output_dir if valid else failed_dir), manifest.stem))


def submit_batch(settings: Settings, store: Store, *, manifest: Path, manifest_name: str,
                 images: dict[str, Path]) -> dict[str, Any]:
    """The HTTP API's batch upload: a manifest and the images it names by file name → one job per row.

    The same rows, checks and report as a manifest dropped in the inbox; the uploaded images are
    moved into their jobs. A bad row is queued as a rejected job, which the daemon's housekeeper
    fails at once (`serve` finishes no job itself). Raises InputError when the upload is no manifest.
    """
    import socket

    from i2v_daemon.intake.staging import Intake

    if Path(manifest_name).suffix.lower() not in MANIFEST_SUFFIXES:
        raise InputError(f"{manifest_name}: a batch manifest is a .csv or .jsonl file")
    folder = manifest.parent / "batch"
    folder.mkdir()
    path = folder / manifest_name
    os.replace(manifest, path)
    for name, image in images.items():
        os.replace(image, folder / name)
    host = socket.gethostname()

    def queue_rejected(job: Any, owner: str) -> None:
        store.mark_staged([job.id], owner)

    intake = Intake(settings, store, owner=f"{host}/{os.getpid()}/api", host=host, finish_rejected=queue_rejected)
    return take_batch(intake, "", path, inbox=folder, source="api")
