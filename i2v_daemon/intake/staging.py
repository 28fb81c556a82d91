"""Intake owns staging: a drop (or an API upload, or a retry) becomes a job row no worker may take,
its files move into work/<id>/input/, and only then is it queued. Nothing else moves a user's files in.

One intake pass takes every ready group: the rows are inserted in one transaction, the files
moved, the filesystem synced once for the whole pass (not once per file), and the jobs queued in
one more transaction. A crash anywhere in between leaves staging rows that the next pass (of
this or any daemon) finishes from wherever the files are. Each group is isolated: a file that
cannot be read becomes a rejected job in failed/; a file that cannot even be moved stays where
it is, with one log line and one `status` line (not one per scan) until it can.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon import files as folders
from i2v_daemon.errors import InputError
from i2v_daemon.faults import crashpoint
from i2v_daemon.intake.choices import check_choices
from i2v_daemon.intake.images import IMAGE_SUFFIXES, inspect_image
from i2v_daemon.intake.inbox import Group, InboxScanner, ScanResult
from i2v_daemon.intake.sidecar import SIDECAR_SUFFIXES, parse_sidecar, parse_sidecar_bytes, parse_values
from i2v_daemon.logs import JobLog, get_logger
from i2v_daemon.params import merge
from i2v_daemon.queue.jobs import Job, JobRequest

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store
    from i2v_daemon.settings import Settings

log = get_logger()

#: File names are at most 255 bytes; the longest name a job's folder holds is `S.generated.mp4`.
NAME_MAX = 255
LONGEST_SUFFIX = len(".generated.mp4")


def display(name: str) -> str:
    """A file name as text that any database can store: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def intake_key(inbox: Path, files: list[Path]) -> str:
    """Identifies these exact file instances: the same files seen twice, from any host, give the same key.

    Several hosts may scan one shared inbox, and each must compute the same key for the same file,
    or two of them would each queue it. So the key holds only what every NFS/SMB client sees alike:
    the name, size, mtime (ns) and inode number. Not `st_dev`, which every client numbers on its own,
    nor the inbox's path, which may be mounted elsewhere on each host. The inode is what tells a
    second drop of identical bytes (a new file, a new inode) from the same file seen again.
    """
    h = hashlib.sha256(b"i2v-intake-v2")
    for f in sorted(files, key=lambda p: p.name):
        st = os.lstat(f)
        h.update(f"|{display(f.name)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode())
    return h.hexdigest()


def build_request(
    stem: str, images: list[Path], sidecars: list[Path], settings: Settings, key: str, *, folder: str = "",
    source: str | None = None,
) -> JobRequest:
    """Validate and merge; any problem becomes a rejected request (its files still travel with it)."""
    inputs = tuple(display(p.name) for p in sorted(images) + sorted(sidecars))
    source = source or ("inbox/" + folder if folder else "inbox")
    try:
        return _valid_request(stem, images, sidecars, settings, key, inputs, folder, source)
    except InputError as err:
        return JobRequest(name=display(stem), inputs=inputs, intake_key=key, rejection=err.as_dict(), source=source)


def group_problem(stem: str, images: list[str], sidecars: list[str]) -> str | None:
    """What is wrong with the files that share one name (one image, at most one sidecar), or None."""
    if len(images) > 1:
        return f"{', '.join(sorted(images))}: several images share the name {stem!r}; keep one, or rename the others"
    if len(sidecars) > 1:
        owner = images[0] if images else repr(stem)
        return (f"{', '.join(sorted(sidecars))}: more than one sidecar for {owner}; keep exactly one of .txt, "
                ".json or .toml")
    return None


def _valid_request(
    stem: str, images: list[Path], sidecars: list[Path], settings: Settings, key: str, inputs: tuple[str, ...],
    folder: str, source: str,
) -> JobRequest:
    for p in (*images, *sidecars):
        if display(p.name) != p.name:
            raise InputError(
                f"{display(p.name)}: the file name is not valid UTF-8 (it was written in another encoding); "
                "rename it, e.g. with `convmv -f latin1 -t utf-8`, and drop it again"
            )
    problem = group_problem(stem, [p.name for p in images], [p.name for p in sidecars])
    if problem:
        raise InputError(problem)
    info = inspect_image(images[0], max_pixels=settings.max_image_pixels)
    notes = list(info.notes)
    if sidecars:
        side = parse_sidecar(sidecars[0], max_bytes=settings.max_sidecar_bytes)
        where = sidecars[0].name
    else:
        side = None
        where = images[0].name
        notes.append(
            f"no sidecar arrived within {settings.sidecar_wait_seconds:g} s: "
            f"running with the {folder or settings.default_preset!r} preset and an empty prompt"
        )
    return _request(stem, side, settings, key, inputs, folder, source, where, notes)


def _request(
    stem: str, side: Any, settings: Settings, key: str, inputs: tuple[str, ...], folder: str, source: str, where: str,
    notes: list[str], idempotency_key: str | None = None,
) -> JobRequest:
    """The request from a checked sidecar (or none), merged over the folder's preset and the config."""
    values = dict(side.values) if side else {}
    params = merge(
        values, presets=settings.all_presets(), default_preset=folder or settings.default_preset,
        defaults=settings.job_defaults(), rife_model=settings.rife_model, where=where,
    )
    check_choices({**values, "lora": params.lora}, settings, where)  # a model the config allows, a LoRA that exists
    _check_name_length(stem, interpolating=params.output_fps is not None)
    if side:
        notes.extend(side.notes)
    return JobRequest(
        name=stem, inputs=inputs, intake_key=key, prompt=side.prompt if side else "",
        negative_prompt=values.get("negative_prompt", ""), params=params, priority=values.get("priority", 0),
        notes=tuple(notes), source=source, idempotency_key=idempotency_key,
    )


def _check_name_length(stem: str, *, interpolating: bool) -> None:
    longest = LONGEST_SUFFIX if interpolating else len(".mp4")
    size = len(os.fsencode(stem))
    if size + longest > NAME_MAX:
        video = f"{stem[:20]}….{'generated.mp4' if interpolating else 'mp4'}"
        raise InputError(
            f"the name {stem[:40]!r}… is {size} bytes; its video ({video}) would be longer than the "
            f"{NAME_MAX}-byte limit of a file name; rename the image to at most {NAME_MAX - longest} bytes"
        )


@dataclass
class _Taken:
    group: Group
    files: list[Path]
    request: JobRequest


class Intake:
    """The one owner of staging. `pass_once()` is one unit of work (one scan, every ready group taken)."""

    def __init__(
        self, settings: Settings, store: Store, *, owner: str, host: str, finish_rejected: Callable[[Job, str], None],
        scanner: InboxScanner | None = None, on_queued: Callable[[], None] = lambda: None,
        fit: Callable[[JobRequest, Path], JobRequest] | None = None,
    ) -> None:
        self.s = settings
        self.store = store
        self.owner = owner  # the worker id intake's staging rows are held under
        self.host = host
        self.finish_rejected = finish_rejected  # (job, owner) → published into failed/ (see finish.py)
        self.on_queued = on_queued
        self.fit = fit  # (request, image) → the request with its need, or refused: no card could take it
        self.scanner = scanner or InboxScanner(
            settings.filled("inbox_dir"), stable_seconds=settings.stable_seconds,
            sidecar_wait_seconds=settings.sidecar_wait_seconds, preset_folders=tuple(settings.all_presets()),
            on_skip=lambda name, why: log.info("inbox_file_skipped", file=display(name), reason=why),
        )
        self._problems: dict[str, str] = {}  # file key → the problem reported for it (once)

    def source_folder(self, source: str | None) -> Path:
        """Where a job's files were dropped: the inbox or a preset's subfolder."""
        inbox = self.s.filled("inbox_dir")
        if source and source.startswith("inbox/"):
            return inbox / source.removeprefix("inbox/")
        return inbox

    # ---- one pass ---------------------------------------------------------------------------------

    def pass_once(self, *, once: bool = False) -> ScanResult:
        """Finish staging left by others (retries, crashed intakes), then scan and take what is ready."""
        self.recover()
        result = self.scanner.scan(once=once)
        self.take_batches(result.manifests)  # first: an inbox image a manifest names goes with its row
        self.take(result.ready)
        return result

    def take_batches(self, manifests: Sequence[tuple[str, Path]]) -> None:
        """One job per row of each batch manifest (intake/batch.py); a manifest's trouble never stops the others."""
        from i2v_daemon.intake import batch

        batch.publish_leftovers(self.s.filled("work_dir"), self.s.filled("output_dir"), self.s.filled("failed_dir"))
        for folder, path in manifests:
            key = f"{folder}/{path.name}" if folder else path.name
            try:
                batch.take_batch(self, folder, path)
            except FileNotFoundError:
                continue  # moved away between the scan and now
            except Exception as err:
                self._problem(key, f"cannot take the batch manifest {display(path.name)}: {type(err).__name__}: {err}")
            else:
                self._resolved(key)
            self.scanner.forget([key])

    def take(self, groups: Sequence[Group]) -> list[Job]:
        """Stage every group in one batch; returns the jobs queued or rejected."""
        taken: list[_Taken] = []
        for group in groups:
            item = self._prepare(group)
            if item is not None:
                taken.append(item)
        if not taken:
            return []
        staged = self.store.stage(
            [t.request for t in taken], owner=self.owner, lease_seconds=self.s.lease_seconds, host=self.host,
        )
        crashpoint("rows_staged")
        moved: list[tuple[_Taken, Job]] = []
        for item, (job, created) in zip(taken, staged, strict=True):
            self.scanner.forget([self._key(item.group, p) for p in item.files])
            if created and self._move_in(item, job):
                moved.append((item, job))
        crashpoint("files_moved")
        touched = [folders.job_dir(self.s.filled("work_dir"), job.id) / "input" for _, job in moved]
        folders.sync_all(touched + [self.source_folder(job.source) for _, job in moved])
        queued = set(self.store.mark_staged([job.id for item, job in moved if not item.request.rejection], self.owner))
        crashpoint("jobs_queued")
        out: list[Job] = []
        for item, job in moved:
            jlog = JobLog(folders.job_dir(self.s.filled("work_dir"), job.id) / "job.log", job.id, job.name)
            jlog.info("received", inputs=list(job.inputs), priority=job.priority, folder=job.source)
            for note in item.request.notes:
                jlog.info("note", message=note)
            if item.request.rejection:
                jlog.warning("invalid_input", error=item.request.rejection["message"])
                self.finish_rejected(job, self.owner)
            elif job.id in queued:
                jlog.info("queued", **(job.params.as_dict() if job.params else {}))
            out.append(job)
        if queued:
            self.on_queued()
        return out

    def _prepare(self, group: Group) -> _Taken | None:
        files = group.images + group.sidecars
        keys = [self._key(group, p) for p in files]
        try:
            stuck = next(((p, why) for p in files if (why := cannot_move(p))), None)
            if stuck is not None:
                self._problem(keys[0], f"cannot take {display(str(stuck[0]))}: {stuck[1]}")
                return None
            key = intake_key(self.source_folder("inbox/" + group.folder if group.folder else None), files)
            request = build_request(group.stem, group.images, group.sidecars, self.s, key, folder=group.folder)
            request = self._fitted(request, group.images[0])
        except FileNotFoundError:
            return None  # moved away between the scan and now; the next scan decides again
        except Exception as err:  # one group's trouble never stops the others
            self._problem(keys[0], f"cannot take {display(group.stem)}: {type(err).__name__}: {err}")
            return None
        self._resolved(keys[0])
        return _Taken(group, files, request)

    def _fitted(self, request: JobRequest, image: Path) -> JobRequest:
        """`fit`'s answer; a need that cannot be worked out now is left to the first worker that claims the job."""
        if self.fit is None or request.rejection is not None:
            return request
        try:
            return self.fit(request, image)
        except Exception as err:
            log.warning("need_not_planned", file=display(image.name), error=f"{type(err).__name__}: {err}")
            return request

    def _move_in(self, item: _Taken, job: Job) -> bool:
        """Move the group's files into work/<id>/input/; on failure put back what moved and forget the row."""
        dest = folders.job_dir(self.s.filled("work_dir"), job.id) / "input"
        done: list[tuple[Path, Path]] = []
        try:
            for src in item.files:
                target = dest / src.name
                folders.move_file(src, target, durable=False)
                done.append((src, target))
        except OSError as err:
            for src, target in reversed(done):
                try:
                    folders.move_file(target, src)
                except OSError:  # still in work/<id>/input/: the staging row stays, a later pass retries
                    log.exception("intake_rollback_failed", job_id=job.id, file=display(src.name))
                    return False
            self.store.unstage(job.id, self.owner)
            self._problem(self._key(item.group, item.files[0]), f"cannot move {display(str(err.filename or ''))} "
                          f"into {dest}: {err.strerror}")
            return False
        return True

    # ---- staging someone else left: retries, an intake that died midway ---------------------------

    def recover(self) -> None:
        """Finish staging rows nobody holds: bring their files into work/<id>/input/, then queue them."""
        for job in self.store.claim_staging(self.owner, lease_seconds=self.s.lease_seconds):
            try:
                self._restage(job)
            except Exception:  # stays staging under our lease; it is released and tried again later
                log.exception("staging_failed", job_id=job.id)

    def _restage(self, job: Job) -> None:
        previous = Path(job.extra["previous_dir"]) if job.extra.get("previous_dir") else None
        jdir = folders.job_dir(self.s.filled("work_dir"), job.id)
        missing = folders.stage_inputs(
            [_actual(self.source_folder(job.source), n) for n in job.inputs], self.source_folder(job.source), jdir,
            previous,
        )
        folders.sync_all([jdir / "input", self.source_folder(job.source)])
        jlog = JobLog(jdir / "job.log", job.id, job.name)
        if missing:
            err = InputError(
                f"{', '.join(display(m) for m in missing)}: no longer in the inbox nor in work/ (moved or deleted "
                "before the job could take it); drop the files again"
            )
            jlog.warning("inputs_missing", error=str(err))
            self.store.update_running(job.id, self.owner, error=err.as_dict())
            self.finish_rejected(job, self.owner)
            return
        if job.rejection and previous is not None and job.inputs:
            job = self._read_again(job, jdir, jlog)
        if job.rejection:
            self.finish_rejected(job, self.owner)
            return
        if self.store.mark_staged([job.id], self.owner):
            jlog.info("queued", retried=previous is not None)
            self.on_queued()

    def _read_again(self, job: Job, jdir: Path, jlog: JobLog) -> Job:
        """A rejected job retried: its inputs (perhaps fixed in place in failed/) checked again as a drop's are."""
        files = [jdir / "input" / name for name in job.inputs]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        sidecars = [p for p in files if p.suffix.lower() in SIDECAR_SUFFIXES]
        if not images:
            return job
        source = job.source or "inbox"
        folder = source.removeprefix("inbox/") if source.startswith("inbox/") else ""
        request = build_request(job.name, images, sidecars, self.s, "", folder=folder, source=source)
        if request.rejection:
            jlog.warning("invalid_input", error=request.rejection["message"], read="again, after a retry")
            self.store.update_running(job.id, self.owner, rejection=request.rejection)
        else:
            jlog.info("inputs_valid_now", read="again, after a retry")
            for note in request.notes:
                jlog.info("note", message=note)
            self.store.update_running(
                job.id, self.owner, rejection=None, params=request.params.as_dict() if request.params else None,
                prompt=request.prompt, negative_prompt=request.negative_prompt, priority=request.priority,
                notes=list(request.notes),
            )
        return self.store.get(job.id) or job

    # ---- files that cannot be taken: said once ---------------------------------------------------------

    def _key(self, group: Group, path: Path) -> str:
        return f"{group.folder}/{path.name}" if group.folder else path.name

    def _problem(self, key: str, message: str) -> None:
        if self._problems.get(key) == message:
            return
        self._problems[key] = message
        log.error("intake_problem", file=display(key), problem=message,
                  fix="the file stays in the inbox; intake takes it once the problem is fixed")
        try:
            self.store.control.report(f"intake:{display(key)}", message, fix="the file stays in the inbox until fixed",
                                      by=self.owner)
        except Exception:
            log.exception("problem_not_recorded")

    def _resolved(self, key: str) -> None:
        if self._problems.pop(key, None) is not None:
            try:
                self.store.control.resolve(f"intake:{display(key)}", by=self.owner)
            except Exception:
                log.exception("problem_not_recorded")

    # ---- the HTTP API's uploads ---------------------------------------------------------------------

    def submit(
        self, *, image: Path, image_name: str, sidecar: Path | None = None, sidecar_name: str | None = None,
        params: dict[str, Any] | None = None, idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """An uploaded image (+ sidecar or params) → a queued job, validated exactly as a drop is.

        Raises InputError before anything is created. The files move from their temporary paths
        into work/<id>/input/; `created` is False when the idempotency key was used before (then
        nothing moved and the caller removes its temporary files).
        """
        if idempotency_key:
            earlier = self.store.find_by_idempotency_key(idempotency_key)
            if earlier is not None:
                return earlier, False
        name = _upload_name(image_name, "image")
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{name}: send a .png, .jpg, .jpeg or .webp image (the name's extension says which)")
        stem = Path(name).stem
        notes: list[str] = []
        info = inspect_image(image, max_pixels=self.s.max_image_pixels, name=name)
        notes.extend(info.notes)
        inputs = [name]
        where = name
        side = None
        if sidecar is not None:
            side_name = _upload_name(sidecar_name or f"{stem}.txt", "sidecar")
            with open(sidecar, "rb") as fh:
                data = fh.read(self.s.max_sidecar_bytes + 1)
            if len(data) > self.s.max_sidecar_bytes:
                raise InputError(f"{side_name}: the sidecar is over the limit of {self.s.max_sidecar_bytes:,} bytes")
            side = parse_sidecar_bytes(data, Path(side_name).suffix, name=side_name)
            inputs.append(side_name)
            where = side_name
        elif params is not None:
            side = parse_values(params)
            where = "params"
        key = "api:" + hashlib.sha256(f"{idempotency_key or ''}|{os.urandom(16).hex()}".encode()).hexdigest()
        request = _request(stem, side, self.s, key, tuple(inputs), "", "api", where, notes, idempotency_key)
        job, created = self.store.stage([request], owner=self.owner, lease_seconds=self.s.lease_seconds,
                                        host=self.host)[0]
        if not created:  # the same idempotency key raced in from another request
            return job, False
        dest = folders.job_dir(self.s.filled("work_dir"), job.id) / "input"
        folders.move_file(image, dest / name)
        if sidecar is not None:
            folders.move_file(sidecar, dest / inputs[1])
        jlog = JobLog(folders.job_dir(self.s.filled("work_dir"), job.id) / "job.log", job.id, job.name)
        jlog.info("received", inputs=inputs, priority=job.priority, folder="api")
        for note in request.notes:
            jlog.info("note", message=note)
        self.store.mark_staged([job.id], self.owner)
        jlog.info("queued", **(request.params.as_dict() if request.params else {}))
        self.on_queued()
        return self.store.get(job.id) or job, True


def submit(
    settings: Settings, store: Store, *, image: Path, image_name: str, sidecar: Path | None = None,
    sidecar_name: str | None = None, params: dict[str, Any] | None = None, idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """The HTTP API's way in (`serve` runs no intake loop): one upload becomes a queued job, as `Intake.submit`."""
    import socket

    host = socket.gethostname()

    def never(job: Job, owner: str) -> None:  # submit raises InputError before a row exists: no rejection
        raise AssertionError(f"job {job.id}: an upload is refused before it becomes a job")

    intake = Intake(settings, store, owner=f"{host}/{os.getpid()}/api", host=host, finish_rejected=never)
    return intake.submit(image=image, image_name=image_name, sidecar=sidecar, sidecar_name=sidecar_name,
                         params=params, idempotency_key=idempotency_key)


def cannot_move(path: Path) -> str | None:
    """Why this process may not rename `path` out of its folder (None: it may), checked before trying.

    Renaming needs write permission on the folder, and in a sticky folder (mode +t, like /tmp)
    also owning the file or the folder.
    """
    try:
        folder = os.stat(path.parent)
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as err:
        return err.strerror or str(err)
    me = os.geteuid()
    if _capable(CAP_DAC_OVERRIDE) and _capable(CAP_FOWNER):
        return None  # root with its capabilities: permissions and the sticky bit do not apply
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"the folder {path.parent} is not writable by this user (uid {me}); make it group-writable"
    if folder.st_mode & stat.S_ISVTX and st.st_uid != me and folder.st_uid != me and not _capable(CAP_FOWNER):
        return (
            f"it belongs to uid {st.st_uid} and {path.parent} is sticky (chmod +t), so only its owner may move it; "
            f"remove the sticky bit (chmod -t {path.parent}) or have the file owned by the daemon's user"
        )
    return None


CAP_DAC_OVERRIDE, CAP_FOWNER = 1, 3


def _capable(bit: int) -> bool:
    """Whether this process holds a Linux capability (root without it is bound by permissions like anyone)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def _actual(folder: Path, shown: str) -> str:
    """The real name of a dropped file whose stored name is `shown` (differs only for non-UTF-8 names)."""
    if display(shown) == shown and "\\x" not in shown:
        return shown
    try:
        for entry in os.scandir(folder):
            if display(entry.name) == shown:
                return entry.name
    except OSError:
        pass
    return shown


def _upload_name(name: str, what: str) -> str:
    """An uploaded file's name, reduced to a safe base name (no folders, no leading dot)."""
    base = Path(name.replace("\\", "/")).name.strip()
    if not base or base.startswith(".") or "\0" in base:
        raise InputError(f"{what}: the uploaded file needs a name such as cat.png (got {name!r})")
    if len(os.fsencode(base)) > NAME_MAX - LONGEST_SUFFIX:
        raise InputError(f"{what}: the file name is {len(os.fsencode(base))} bytes; keep it to "
                         f"{NAME_MAX - LONGEST_SUFFIX} (the outputs add up to {LONGEST_SUFFIX} bytes to it)")
    return base


__all__ = ["Intake", "build_request", "cannot_move", "display", "group_problem", "intake_key", "submit"]
