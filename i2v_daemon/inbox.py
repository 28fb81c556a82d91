"""The inbox: a full scan is the ground truth; filesystem events only make the next scan sooner.

A file is taken once its size and mtime have stayed unchanged for `stable_seconds`; an image
waits up to `sidecar_wait_seconds` for its sidecar. Files starting with `.` or ending in a
temporary suffix are never taken, subfolders are left alone, and anything that is not a regular
file (symlink, FIFO, socket, device) is never opened.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from i2v_daemon.images import IMAGE_SUFFIXES
from i2v_daemon.sidecar import SIDECAR_SUFFIXES

TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".filepart")
NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre", "gpfs", "davfs",
    "beegfs", "virtiofs",
}


def is_ignored_name(name: str) -> bool:
    """Names users write under before renaming into place (INTERFACE.md §2)."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


def filesystem_type(path: Path) -> str:
    """The mount type holding `path`, from /proc/self/mountinfo ("" if unknown)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target = str(path.resolve())
    best, fstype = "", ""
    for line in lines:
        left, _, right = line.partition(" - ")
        parts = left.split()
        if len(parts) < 5 or not right:
            continue
        mount = parts[4].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fstype = mount, right.split()[0]
    return fstype


def needs_polling(path: Path) -> bool:
    fstype = filesystem_type(path)
    return fstype in NETWORK_FS or fstype.startswith("fuse")


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    ino: int
    first_seen: float  # monotonic time this (size, mtime) was first observed


@dataclass
class Group:
    """All files of one stem that are ready to become a job."""

    stem: str
    images: list[Path]
    sidecars: list[Path]


@dataclass
class ScanResult:
    ready: list[Group] = field(default_factory=list)
    pending: int = 0  # files seen but not yet stable (or images still waiting for a sidecar)
    next_check: float | None = None  # seconds until a pending file may become ready


class InboxScanner:
    """Decides which groups are ready; keeps only in-memory timing, so a restart simply waits again."""

    def __init__(
        self, inbox: Path, *, stable_seconds: float, sidecar_wait_seconds: float,
        on_skip: Callable[[str, str], None] | None = None,
    ) -> None:
        self.inbox = inbox
        self.stable_seconds = stable_seconds
        self.sidecar_wait_seconds = sidecar_wait_seconds
        self._seen: dict[str, _Seen] = {}
        self._skipped: set[tuple[str, str]] = set()
        self._on_skip = on_skip

    def _skip(self, name: str, why: str) -> None:
        if (name, why) not in self._skipped:  # say it once, not every scan
            self._skipped.add((name, why))
            if self._on_skip:
                self._on_skip(name, why)

    def scan(self, *, now: float | None = None, wall_now: float | None = None, once: bool = False) -> ScanResult:
        """Look at every file in the inbox once. `once`: files already old enough count as stable."""
        now = time.monotonic() if now is None else now
        wall_now = time.time() if wall_now is None else wall_now
        images: dict[str, list[Path]] = {}
        sidecars: dict[str, list[Path]] = {}
        ready_since: dict[str, float] = {}  # name -> seconds it has been stable
        result = ScanResult()
        present = set()
        try:
            entries = list(os.scandir(self.inbox))
        except FileNotFoundError:
            return result
        for entry in entries:
            name = entry.name
            if is_ignored_name(name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue  # subfolders are left alone
            suffix = Path(name).suffix.lower()
            if suffix not in IMAGE_SUFFIXES and suffix not in SIDECAR_SUFFIXES:
                self._skip(name, "not an image (.png .jpg .jpeg .webp) or a sidecar (.txt .json .toml)")
                continue
            # Symlinks, FIFOs, sockets and devices are not skipped: they travel (by rename, never
            # opened) into a rejected job, so the user finds them in failed/ with the reason.
            present.add(name)
            seen = self._seen.get(name)
            if seen is None or (seen.size, seen.mtime_ns, seen.ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
                seen = self._seen[name] = _Seen(st.st_size, st.st_mtime_ns, st.st_ino, now)
            stable_for = now - seen.first_seen
            if once:
                stable_for = max(stable_for, wall_now - st.st_mtime_ns / 1e9)
            ready_since[name] = stable_for
            stem = Path(name).stem
            (images if suffix in IMAGE_SUFFIXES else sidecars).setdefault(stem, []).append(self.inbox / name)
        for gone in set(self._seen) - present:
            del self._seen[gone]

        def wait(seconds: float) -> None:
            result.pending += 1
            result.next_check = seconds if result.next_check is None else min(result.next_check, seconds)

        for stem, imgs in sorted(images.items()):
            sides = sidecars.get(stem, [])
            unstable = [ready_since[p.name] for p in imgs + sides if ready_since[p.name] < self.stable_seconds]
            if unstable:
                wait(self.stable_seconds - min(unstable))  # ready when the least stable one is
                continue
            if not sides:
                waited = min(ready_since[p.name] for p in imgs) - self.stable_seconds
                if waited < self.sidecar_wait_seconds:
                    wait(self.sidecar_wait_seconds - waited)
                    continue
            result.ready.append(Group(stem, sorted(imgs), sorted(sides)))
        for stem, sides in sidecars.items():
            if stem not in images:
                for p in sides:
                    self._skip(p.name, "a sidecar without an image of the same name; waiting for the image")
        return result

    def forget(self, names: list[str]) -> None:
        for n in names:
            self._seen.pop(n, None)


class Watcher:
    """watchdog observer whose events only wake the intake loop; polling on network filesystems."""

    def __init__(self, inbox: Path, wake: threading.Event, *, mode: str = "auto", poll_seconds: float = 2.0):
        self.inbox = inbox
        self.wake = wake
        self.polling = mode == "polling" or (mode == "auto" and needs_polling(inbox))
        self.poll_seconds = poll_seconds
        self._observer: Any = None

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler

        wake = self.wake

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        if self.polling:
            from watchdog.observers.polling import PollingObserver

            self._observer = PollingObserver(timeout=self.poll_seconds)
        else:
            from watchdog.observers import Observer

            self._observer = Observer()
        self._observer.schedule(_Handler(), str(self.inbox), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
