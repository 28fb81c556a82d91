"""The compile cache under the daemon's state folder, so a restarted (or second) daemon starts warm.

Two layers, both keyed by torch, Triton, the driver and the GPU (a compiled kernel is only
valid for those):
- Inductor's and Triton's own on-disk caches (`TORCHINDUCTOR_CACHE_DIR`, `TRITON_CACHE_DIR`),
  pointed at `<root>/<key>/`. They must be set before torch first compiles anything, and
  Triton reads its variable when it is imported, so `activate()` runs before torch is imported
  where it can (ModelHolder.from_settings) and says so when it could not.
- torch's portable "mega-cache" (`torch.compiler.save_cache_artifacts`): one file per process
  that compiled something, loaded at start, so the cache survives a wiped temp folder and can
  be copied to another host with the same key.

This module imports torch only inside `load` and `save`: computing the key reads package
metadata and the driver's files, not torch.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["ARTIFACTS_KEPT", "CompileCache", "cache_key"]

#: Mega-cache files kept per key (the newest); each holds everything its process compiled.
ARTIFACTS_KEPT = 8


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def _driver() -> str:
    """The NVIDIA driver's version from /proc (no CUDA call), "none" without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return "none"
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return found.group(1) if found else "unknown"


def _gpus() -> str:
    """The GPUs' model names from /proc, "cpu-<machine>" on a host without an NVIDIA driver."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        with contextlib.suppress(OSError):
            found = re.search(r"^Model:\s*(.+)$", info.read_text(), re.MULTILINE)
            if found:
                names.append(found.group(1).strip())
    if not names:
        return f"cpu-{platform.machine()}"
    return "+".join(sorted(set(names)))


def _torch_default(var: str, value: str) -> bool:
    """Whether `value` is the folder torch itself wrote into `var` (Inductor records its default there on
    first use; Inductor puts Triton's under its own), rather than one a person chose."""
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}"
    inductor_default = Path(tempfile.gettempdir()) / ("torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    if var == "TORCHINDUCTOR_CACHE_DIR":
        return Path(value) == inductor_default
    return Path(value).is_relative_to(inductor_default)


def _count(info: Any) -> int:
    """Artefacts in a CacheInfo: a dict of lists in newer torch, one list per kind in older ones."""
    if info is None:
        return 0
    kinds = getattr(info, "artifacts", None)
    if isinstance(kinds, dict):
        return sum(len(v) for v in kinds.values())
    return sum(len(v) for v in vars(info).values() if isinstance(v, list))


def cache_key() -> str:
    """torch, Triton, driver and GPU as one folder name.

    For example `torch-2.11.0+cu130_triton-3.6.0_driver-580.159.03_NVIDIA-H200`.
    """
    raw = f"torch-{_version('torch')}_triton-{_version('triton')}_driver-{_driver()}_{_gpus()}"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", raw)[:200]


@dataclass
class CompileCache:
    """`<root>/<key>/`: Inductor's and Triton's caches and the portable artefacts of this torch and GPU."""

    root: Path
    key: str = field(default_factory=cache_key)
    notes: list[str] = field(default_factory=list)  # what a person should know (doctor, the log)
    loaded: dict[str, Any] = field(default_factory=dict)  # what load() found

    @property
    def folder(self) -> Path:
        return self.root / self.key

    def activate(self) -> None:
        """Point Inductor and Triton at this folder (before torch is imported, where possible)."""
        # Only the variables: Inductor and Triton create their folders when they first write one,
        # so a daemon that never compiles (the CPU) leaves nothing behind.
        inductor, triton = self.folder / "inductor", self.folder / "triton"
        for var, path in (("TORCHINDUCTOR_CACHE_DIR", inductor), ("TRITON_CACHE_DIR", triton)):
            current = os.environ.get(var)
            if current and Path(current) != path and not _torch_default(var, current):
                # Someone chose a cache folder on purpose (a shared one, say): theirs wins.
                self.notes.append(f"{var} is set to {current}; the compile cache uses it instead of {path}")
                continue
            os.environ[var] = str(path)
        if "torch" in sys.modules:
            self.notes.append(
                "torch was imported before the compile cache was set up; Triton may keep its default cache folder"
            )

    def artifacts(self) -> list[Path]:
        """The portable artefact files, newest first."""
        files = list(self.folder.glob("artifacts-*.bin"))
        return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)

    def load(self) -> dict[str, Any]:
        """Hot-load every saved artefact file into torch's caches; returns counts for the log."""
        import torch

        found = {"files": 0, "artifacts": 0, "failed": 0}
        for path in self.artifacts():
            try:
                info = torch.compiler.load_cache_artifacts(path.read_bytes())
                found["artifacts"] += _count(info)
            except Exception as err:  # a file from a crash half-way, or an older format: skip it
                found["failed"] += 1
                self.notes.append(f"{path.name} could not be loaded ({type(err).__name__}); it was skipped")
                continue
            found["files"] += 1
        self.loaded = found
        return found

    def save(self) -> Path | None:
        """Write what this process compiled so far as one artefact file (temp name, then rename)."""
        import torch

        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        blob, _info = saved
        if not blob:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"artifacts-{os.getpid()}.bin"
        tmp = path.with_name(f".{path.name}.{time.monotonic_ns()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        for old in self.artifacts()[ARTIFACTS_KEPT:]:
            with contextlib.suppress(OSError):
                old.unlink()
        return path

    def size_bytes(self) -> int:
        """Bytes the cache takes on disk, for doctor."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.folder):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(dirpath, name)).st_size
        return total


def describe(root: Path) -> dict[str, Any]:
    """For `doctor`: this host's cache folder under `root`, its key, what it holds, and the other keys beside it.

    Reads the file system only (no torch): a folder for another torch, driver or GPU is what an
    upgrade leaves behind and can be deleted.
    """
    cache = CompileCache(Path(root))
    folder = cache.folder
    others = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and p.name != cache.key) \
        if Path(root).is_dir() else []
    return {
        "folder": str(folder), "key": cache.key, "exists": folder.is_dir(),
        "size_bytes": cache.size_bytes() if folder.is_dir() else 0,
        "artifact_files": len(cache.artifacts()) if folder.is_dir() else 0, "other_keys": others,
    }
