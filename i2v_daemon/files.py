"""Moving files without ever losing one: staging into work/, atomic writes, publishing to output/.

A job's files live in `<work_dir>/<job id>/` (input/, job.log, the video) until the job ends;
then that folder is renamed, whole, to `<output_dir>/S` or `<failed_dir>/S`. The destination
is recorded in the database (a unique column, so two daemons never pick the same S-2) before
the rename, so a crash at any point is finished by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any


def job_dir(work_dir: str | os.PathLike[str], job_id: int) -> Path:
    """A job's folder while it is in flight: `<work_dir>/<job id>/` (inputs, job.log, the video)."""
    return Path(work_dir) / str(job_id)


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp name, fsync, rename, fsync the folder: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode())


def sync_all(paths: list[Path]) -> None:
    """Make every rename and create inside these folders durable, with one sync per filesystem.

    Intake moves thousands of files a pass; one `syncfs(2)` per filesystem replaces an fsync of
    every folder. Where syncfs is not available, each folder is fsynced.
    """
    seen_devices: set[int] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_dev in seen_devices:
            continue
        if _syncfs(path):
            seen_devices.add(st.st_dev)
        else:
            fsync_dir(path)


def _syncfs(path: Path) -> bool:
    libc = _libc()
    if libc is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bool(libc.syncfs(fd) == 0)
    finally:
        os.close(fd)


@functools.cache
def _libc() -> Any:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.syncfs.argtypes = [ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def move_file(src: Path, dst: Path, *, durable: bool = True) -> None:
    """Move one file; `os.replace` on one filesystem, copy + fsync + rename + unlink across two.

    `durable=False`: the caller syncs the folders itself afterwards (`sync_all`), once for many files.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        mode = os.lstat(src).st_mode
        if not stat.S_ISREG(mode):
            _recreate_special(src, dst, mode)
            return
        tmp = dst.with_name(f".{dst.name}.part")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
        os.unlink(src)
    if durable:
        fsync_dir(dst.parent)
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(src.parent)


def _recreate_special(src: Path, dst: Path, mode: int, *, keep_source: bool = False) -> None:
    """Across filesystems, a symlink or FIFO is made anew (never opened: a FIFO would block)."""
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(dst, stat.S_IMODE(mode))
    else:
        # A socket or device cannot be recreated by an unprivileged daemon; leave a note in its place.
        dst.with_name(dst.name + ".not-copied.txt").write_text(
            f"{src.name} was a socket or device file; it stayed on the other filesystem at {src}\n"
        )
        return
    if not keep_source:
        os.unlink(src)


def stage_inputs(
    names: list[str] | tuple[str, ...], inbox: Path, job_dir: Path, previous_dir: Path | None = None,
) -> list[str]:
    """Bring a job's inputs into `job_dir/input/`; idempotent. Returns the names still missing.

    Looks in the inbox folder it was dropped in (a job whose intake was interrupted) and in
    `previous_dir` (a retried job whose files are still in failed/). Intake alone calls this.
    """
    if previous_dir is not None and previous_dir.is_dir() and not job_dir.exists():
        # A retry: the whole failed/S folder comes back to work/ (one rename), old log included.
        job_dir.parent.mkdir(parents=True, exist_ok=True)
        move_tree(previous_dir, job_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(job_dir / "job.json")
    missing = []
    for name in names:
        dst = job_dir / "input" / name
        if os.path.lexists(dst):  # lexists: a staged symlink counts, wherever it points
            continue
        for src in (inbox / name, *([previous_dir / "input" / name] if previous_dir else [])):
            try:
                move_file(src, dst, durable=False)  # the caller syncs the folders once
                break
            except FileNotFoundError:
                continue
        else:
            missing.append(name)
    return missing


def free_name(root: Path, name: str, taken: set[str] | frozenset[str] = frozenset()) -> Path:
    """`root/name`, or `name-2`, `name-3`, … : the first that is neither on disk nor in `taken`.

    The database's unique index on the chosen folder arbitrates between daemons; the folder
    itself appears only when the finished job folder is renamed onto it.
    """
    n = 1
    while True:
        candidate = root / (name if n == 1 else f"{name}-{n}")
        if not candidate.exists() and str(candidate) not in taken:
            return candidate
        n += 1


def move_tree(src: Path, dst: Path) -> None:
    """Move a folder onto `dst` (absent or an empty reserved folder); survives a crash midway."""
    try:
        os.replace(src, dst)  # rename(2) replaces an empty directory atomically
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.ENOTEMPTY, errno.EEXIST):
            raise
        # Another filesystem (or a half-done earlier copy): copy file by file, then drop the source.
        for path in sorted(src.rglob("*")):
            target = dst / path.relative_to(src)
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(target) and not stat.S_ISREG(mode):
                continue  # a special file already recreated by an interrupted earlier copy
            if not stat.S_ISREG(mode):  # a user's symlink or FIFO: recreate it, never read through it
                _recreate_special(path, target, mode, keep_source=True)
                continue
            tmp = target.with_name(f".{target.name}.part")
            shutil.copy2(path, tmp, follow_symlinks=False)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        for d in sorted({p.parent for p in dst.rglob("*")} | {dst}):
            fsync_dir(d)
        shutil.rmtree(src)
    fsync_dir(dst.parent)
    fsync_dir(src.parent)


def publish(job_dir: Path, destination: Path) -> None:
    """Move the finished job folder into its reserved place; safe to call again after a crash."""
    if job_dir.exists():
        destination.parent.mkdir(parents=True, exist_ok=True)
        move_tree(job_dir, destination)


#: Uploads `serve` streams into work/ before they become a job; older ones were left by a crash.
UPLOAD_PREFIX = ".upload-"
STALE_UPLOAD_SECONDS = 3600.0


def remove_stale_uploads(work_dir: Path, *, older_than: float = STALE_UPLOAD_SECONDS) -> list[str]:
    """Delete upload leftovers in work/ that no request can still be writing (a crash in the middle)."""
    import time

    removed: list[str] = []
    try:
        entries = list(os.scandir(work_dir))
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(UPLOAD_PREFIX):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            continue
    return removed
