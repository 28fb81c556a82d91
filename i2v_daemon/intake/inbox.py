"""The inbox: a full scan is the ground truth; filesystem events only make the next scan sooner.

A file is taken once its size and mtime have stayed unchanged for `stable_seconds` (or, when its
mtime is already that old, on the second look that finds it unchanged); an image waits up to
`sidecar_wait_seconds` for its sidecar. Files starting with `.` or ending in a temporary suffix
are never taken; of the subfolders only the presets' (`inbox/fast/`, …) are scanned, the rest are
left alone; anything that is not a regular file (symlink, FIFO, socket, device) is never opened.
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

from i2v_daemon.intake.images import IMAGE_SUFFIXES
from i2v_daemon.intake.sidecar import SIDECAR_SUFFIXES

#: Batch manifests (intake/batch.py): one job per row.
MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl"})

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


#: Seconds between the two looks that take a file whose mtime is already older than stable_seconds.
CONFIRM_SECONDS = 0.1


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    ino: int
    first_seen: float  # monotonic time this (size, mtime) was first observed


@dataclass
class Group:
    """All files of one stem in one folder that are ready to become a job."""

    stem: str
    images: list[Path]
    sidecars: list[Path]
    folder: str = ""  # "" for the inbox itself, else the preset whose subfolder it is in


@dataclass
class ScanResult:
    ready: list[Group] = field(default_factory=list)
    manifests: list[tuple[str, Path]] = field(default_factory=list)  # (preset folder or "", a stable .csv/.jsonl)
    pending: int = 0  # files seen but not yet stable (or images still waiting for a sidecar)
    next_check: float | None = None  # seconds until a pending file may become ready


class InboxScanner:
    """Decides which groups are ready; keeps only in-memory timing, so a restart simply waits again."""

    def __init__(
        self, inbox: Path, *, stable_seconds: float, sidecar_wait_seconds: float,
        on_skip: Callable[[str, str], None] | None = None, preset_folders: tuple[str, ...] = (),
    ) -> None:
        self.inbox = inbox
        self.stable_seconds = stable_seconds
        self.sidecar_wait_seconds = sidecar_wait_seconds
        self.preset_folders = preset_folders  # subfolders taken with that preset as the default
        self._seen: dict[str, _Seen] = {}
        self._skipped: set[tuple[str, str]] = set()
        self._on_skip = on_skip

    def folders(self) -> dict[str, Path]:
        """"" → the inbox, and each preset's name → its subfolder (whether or not it exists yet)."""
        return {"": self.inbox, **{name: self.inbox / name for name in self.preset_folders}}

    def _skip(self, name: str, why: str) -> None:
        if (name, why) not in self._skipped:  # say it once, not every scan
            self._skipped.add((name, why))
            if self._on_skip:
                self._on_skip(name, why)

    def scan(self, *, now: float | None = None, wall_now: float | None = None, once: bool = False) -> ScanResult:
        """Look at every file in the inbox and the presets' folders once.

        `once`: files already old enough count as stable. Otherwise a file whose mtime is older
        than `stable_seconds` is taken on the second look that finds it unchanged.
        """
        now = time.monotonic() if now is None else now
        wall_now = time.time() if wall_now is None else wall_now
        result = ScanResult()
        present: set[str] = set()
        for folder, path in self.folders().items():
            if folder and not _is_real_folder(path):
                continue  # absent, or a link: never followed
            self._scan_folder(folder, path, now, wall_now, once, result, present)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return result

    def _scan_folder(
        self, folder: str, path: Path, now: float, wall_now: float, once: bool, result: ScanResult, present: set[str],
    ) -> None:
        images: dict[str, list[Path]] = {}
        sidecars: dict[str, list[Path]] = {}
        ready_in: dict[str, float] = {}  # name -> seconds until it counts as stable (<= 0: it does)
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        prefix = f"{folder}/" if folder else ""
        for entry in entries:
            name = entry.name
            if is_ignored_name(name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue  # subfolders are left alone (the presets' are scanned on their own)
            key = prefix + name
            suffix = Path(name).suffix.lower()
            manifest = suffix in MANIFEST_SUFFIXES
            if suffix not in IMAGE_SUFFIXES and suffix not in SIDECAR_SUFFIXES and not manifest:
                self._skip(key, "not an image (.png .jpg .jpeg .webp), a sidecar (.txt .json .toml) or a batch "
                                "manifest (.csv .jsonl)")
                continue
            # Symlinks, FIFOs, sockets and devices are not skipped: they travel (by rename, never
            # opened) into a rejected job, so the user finds them in failed/ with the reason.
            present.add(key)
            seen = self._seen.get(key)
            if seen is None or (seen.size, seen.mtime_ns, seen.ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
                seen = self._seen[key] = _Seen(st.st_size, st.st_mtime_ns, st.st_ino, now)
            seen_for = now - seen.first_seen
            age = wall_now - st.st_mtime_ns / 1e9
            if once:
                ready_in[name] = self.stable_seconds - max(seen_for, age)
            elif age >= self.stable_seconds:
                # Written long ago (renamed in): one more look that finds it unchanged is enough.
                ready_in[name] = min(CONFIRM_SECONDS, self.stable_seconds) - seen_for
            else:
                ready_in[name] = self.stable_seconds - seen_for
            stem = Path(name).stem
            if manifest:  # a batch: ready once stable, before the images it names wait out sidecar_wait_seconds
                if ready_in[name] > 0:
                    result.pending += 1
                    result.next_check = min(result.next_check or ready_in[name], ready_in[name])
                elif stat.S_ISREG(st.st_mode):
                    result.manifests.append((folder, path / name))
                continue
            (images if suffix in IMAGE_SUFFIXES else sidecars).setdefault(stem, []).append(path / name)

        def wait(seconds: float) -> None:
            result.pending += 1
            result.next_check = seconds if result.next_check is None else min(result.next_check, seconds)

        for stem, imgs in sorted(images.items()):
            sides = sidecars.get(stem, [])
            unstable = [ready_in[p.name] for p in imgs + sides if ready_in[p.name] > 0]
            if unstable:
                wait(max(unstable))  # ready when the least stable one is
                continue
            if not sides:
                waited = -max(ready_in[p.name] for p in imgs)  # how long it has been stable
                if waited < self.sidecar_wait_seconds:
                    wait(self.sidecar_wait_seconds - waited)
                    continue
            result.ready.append(Group(stem, sorted(imgs), sorted(sides), folder))
        for stem, sides in sidecars.items():
            if stem not in images:
                for p in sides:
                    self._skip(prefix + p.name, "a sidecar without an image of the same name; waiting for the image")

    def forget(self, names: list[str]) -> None:
        """Start the stability clock over for these files (keys: "name" or "preset/name")."""
        for n in names:
            self._seen.pop(n, None)


def _is_real_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


#: watchdog event types that can make a file ready. Opening and closing a file without writing
#: (our own reads of images and sidecars) is not among them: they would wake intake in a loop.
WAKING_EVENTS = frozenset({"created", "moved", "modified", "closed"})


class Watcher:
    """watchdog observer whose events only wake the intake loop; polling on network filesystems."""

    def __init__(
        self, inbox: Path, wake: threading.Event, *, mode: str = "auto", poll_seconds: float = 2.0,
        folders: tuple[Path, ...] = (),
    ):
        self.inbox = inbox
        self.folders = folders  # the presets' subfolders that exist at start (the rescan covers the rest)
        self.wake = wake
        self.polling = mode == "polling" or (mode == "auto" and needs_polling(inbox))
        self.poll_seconds = poll_seconds
        self._observer: Any = None

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler

        wake = self.wake

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type in WAKING_EVENTS and not event.is_directory:
                    wake.set()

        if self.polling:
            from watchdog.observers.polling import PollingObserver

            self._observer = PollingObserver(timeout=self.poll_seconds)
        else:
            from watchdog.observers import Observer

            self._observer = Observer()
        handler = _Handler()
        for folder in (self.inbox, *self.folders):
            if _is_real_folder(folder):
                self._observer.schedule(handler, str(folder), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
