"""`i2v-daemon doctor`: is this machine ready to run the daemon, and if not, what to fix.

Each check returns `Check` values: ok, warn (works, but you may not like it) or fail (the daemon
will not work). Nothing here changes anything: no folder is created, no schema upgraded, nothing
downloaded. Exit status 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30
#: below this much free GPU memory the model (about 5 GiB in fp16) and a job will not fit
MIN_FREE_VRAM = 6 * GIB


@dataclass(frozen=True)
class Check:
    level: str  # "ok" | "warn" | "fail"
    name: str  # what was checked: gpu, ffmpeg, inbox_dir, database, model, …
    message: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"level": self.level, "name": self.name, "message": self.message, "fix": self.fix}


def run_checks(settings: Any, *, min_free_gib: float = 5.0) -> list[Check]:
    probes: list[tuple[str, Callable[[], list[Check]]]] = [
        ("gpu", lambda: check_gpu(settings)),
        ("ffmpeg", lambda: check_ffmpeg(settings)),
        ("folders", lambda: check_folders(settings, min_free_gib)),
        ("database", lambda: check_database(settings)),
        ("model", lambda: check_model(settings)),
    ]
    checks: list[Check] = []
    for name, probe in probes:
        try:
            checks += probe()
        except Exception as err:  # a check that crashes is a finding, not a traceback
            checks.append(Check("fail", name, f"{type(err).__name__}: {err}"))
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.level == "fail" for c in checks) else 0


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{c.level.upper():4}  {c.name}: {c.message}")
        if c.fix and c.level != "ok":
            lines.append(f"      fix: {c.fix}")
    fails = sum(c.level == "fail" for c in checks)
    warns = sum(c.level == "warn" for c in checks)
    lines.append(
        f"{fails} problem(s) to fix, {warns} warning(s)" if fails or warns else "everything looks ready"
    )
    return "\n".join(lines)


# ---- the GPU and its driver -----------------------------------------------------------------------


def check_gpu(settings: Any) -> list[Check]:
    from i2v_daemon.models.gpu import describe

    device: str = settings.device
    info = describe()
    build = f"torch {info['torch']}" + (f" (CUDA {info['cuda_build']})" if info["cuda_build"] else " (CPU-only build)")
    out: list[Check] = []
    if device == "cpu":
        out.append(Check("ok", "gpu", f"device = cpu: the GPU is not used; {build}"))
    elif not info["cuda_available"]:
        why = info["error"] or ("this torch has no CUDA" if not info["cuda_build"] else "no GPU visible to torch")
        fix = (
            "install a CUDA build of torch (`make install`, or pip install torch from PyTorch's index)"
            if not info["cuda_build"]
            else "check the NVIDIA driver with nvidia-smi; under systemd, the unit's DeviceAllow= lines"
        )
        if device == "auto":
            out.append(Check("warn", "gpu", f"{why} ({build}); jobs run on the CPU, very slowly",
                             f'{fix}, or set device = "cpu"'))
        else:
            out.append(Check("fail", "gpu", f"{why} ({build}); device = {device} cannot work", fix))
    else:
        wanted = int(device.partition(":")[2] or 0) if device.startswith("cuda") else None
        if wanted is not None and wanted >= len(info["devices"]):
            out.append(Check("fail", "gpu", f"device = {device}, but torch sees {len(info['devices'])} GPU(s)",
                             "set device to auto, cuda or cuda:N with N below the count"))
        for d in info["devices"]:
            if wanted is not None and d["index"] != wanted:
                continue
            free, total = d["free_bytes"], d["total_bytes"]
            msg = (f"cuda:{d['index']} {d['name']} (compute {d['capability']}), "
                   f"{free / GIB:.1f} of {total / GIB:.1f} GiB free; {build}")
            if free < MIN_FREE_VRAM:
                fix = "other processes hold GPU memory (see nvidia-smi); free it or set vram_budget_gib"
                out.append(Check("warn", "gpu", msg, fix))
            else:
                out.append(Check("ok", "gpu", msg))
    out += _nvidia_smi(required=device != "cpu" and info["cuda_available"])
    return out


def _nvidia_smi(required: bool) -> list[Check]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        if not required:
            return []
        return [Check("warn", "driver", "nvidia-smi is not installed", "install the NVIDIA driver utilities")]
    query = "--query-gpu=index,name,driver_version,memory.used,memory.total"
    try:
        proc = subprocess.run([exe, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return [Check("fail", "driver", f"nvidia-smi did not answer: {err}", "check the NVIDIA driver (dmesg)")]
    if proc.returncode != 0:
        detail = (proc.stdout + proc.stderr).strip().splitlines()
        level = "fail" if required else "warn"
        return [Check(level, "driver", f"nvidia-smi failed: {detail[0] if detail else proc.returncode}",
                      "the driver and its kernel module disagree (reboot after a driver update) or no GPU is present")]
    return [Check("ok", "driver", f"nvidia-smi: {line.strip()}") for line in proc.stdout.strip().splitlines()]


# ---- ffmpeg -------------------------------------------------------------------------------------


def check_ffmpeg(settings: Any) -> list[Check]:
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        version = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30)
        encoders = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30)
    except Exception as err:
        return [Check("fail", "ffmpeg", f"the ffmpeg binary cannot run: {err}",
                      "pip install --force-reinstall imageio-ffmpeg, or set IMAGEIO_FFMPEG_EXE")]
    first = version.stdout.splitlines()[0] if version.stdout else f"exit {version.returncode}"
    if version.returncode != 0:
        return [Check("fail", "ffmpeg", f"{exe} failed: {first}", "reinstall imageio-ffmpeg")]
    if "libx264" not in encoders.stdout:
        return [Check("fail", "ffmpeg", f"{first}: no libx264 encoder (H.264 is required)",
                      "point IMAGEIO_FFMPEG_EXE at an ffmpeg built with libx264")]
    return [Check("ok", "ffmpeg", f"{first} ({exe}), with libx264")]


# ---- folders ------------------------------------------------------------------------------------


def check_folders(settings: Any, min_free_gib: float = 5.0) -> list[Check]:
    out: list[Check] = []
    folders = {"data_dir": Path(settings.data_dir), **{k: Path(v) for k, v in settings.folders().items()}}
    devices: dict[str, int] = {}
    for key, path in folders.items():
        check, dev = _folder(key, path, min_free_gib)
        out.append(check)
        if dev is not None:
            devices[key] = dev
    work = devices.get("work_dir")
    for key in ("output_dir", "failed_dir"):
        if work is not None and key in devices and devices[key] != work:
            msg = "is on another filesystem than work_dir: finished jobs are copied, not moved"
            out.append(Check("warn", key, msg,
                             "keep work_dir, output_dir and failed_dir on one filesystem"))
    return out


def _folder(key: str, path: Path, min_free_gib: float) -> tuple[Check, int | None]:
    env = f"{key} / I2V_{key.upper()}"
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return Check("fail", key, f"{path} cannot be created: {ancestor} is a file, not a folder",
                     f"set {env} to a folder path"), None
    if ancestor != path:
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return Check("fail", key, f"{path} does not exist and {ancestor} is not writable by {_me()}",
                         f"create it: sudo install -d -o {_me()} {path}"), None
        return Check("ok", key, f"{path} does not exist yet; the daemon creates it at start"), None
    st = path.stat()
    if not os.access(path, os.W_OK | os.X_OK):
        return Check("fail", key, f"{path} is not writable by {_me()} ({_describe(st)})",
                     f"sudo chown {_me()} {path}, or add {_me()} to its group and chmod g+rwx {path}"), st.st_dev
    free = shutil.disk_usage(path).free
    msg = f"{path} ({_describe(st)}, {free / GIB:.1f} GiB free)"
    if free < min_free_gib * GIB:
        return Check("warn", key, f"{msg}: under {min_free_gib:g} GiB free",
                     "free disk space: videos and job folders need room"), st.st_dev
    return Check("ok", key, msg), st.st_dev


def _describe(st: os.stat_result) -> str:
    return f"{stat.filemode(st.st_mode)} {_user(st.st_uid)}:{_group(st.st_gid)}"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _me() -> str:
    return _user(os.geteuid())


# ---- the database -------------------------------------------------------------------------------


def check_database(settings: Any) -> list[Check]:
    from sqlalchemy.engine import make_url

    url: str = settings.database_url
    fix = "set database_url / I2V_DATABASE_URL to a reachable database (sqlite:///PATH or postgresql+psycopg://…)"
    try:
        parsed = make_url(url)
        shown = parsed.render_as_string(hide_password=True)
    except Exception as err:
        return [Check("fail", "database", f"database_url is not a database URL: {err}", fix)]
    is_file_db = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if is_file_db and not Path(parsed.database).exists():  # type: ignore[arg-type]
        return [Check("warn", "database", f"{shown} does not exist yet; the daemon creates it at start")]
    try:
        return _open_database(url, shown, postgres=parsed.get_backend_name() == "postgresql")
    except Exception as err:
        detail = str(getattr(err, "orig", None) or err).strip().splitlines()
        return [Check("fail", "database", f"cannot open {shown}: {detail[0] if detail else type(err).__name__}", fix)]


def _open_database(url: str, shown: str, *, postgres: bool) -> list[Check]:
    from sqlalchemy import create_engine, inspect

    from i2v_daemon import migrate
    from i2v_daemon.store import Store

    if postgres:
        # Fail within seconds on a server that does not answer, rather than the driver's minutes.
        probe = create_engine(url, connect_args={"connect_timeout": 10}, pool_pre_ping=True)
        try:
            with probe.connect():
                pass
        finally:
            probe.dispose()
    store = Store(url)
    try:
        if not inspect(store.engine).has_table("jobs"):
            return [Check("warn", "database", f"{shown} has no jobs table yet; the daemon creates it at start")]
        out = []
        current, head = migrate.current_revision(store.engine), migrate.head()
        if current != head:
            out.append(Check("warn", "database", f"schema at revision {current or 'of the first release'}; "
                             f"the daemon upgrades it to {head} at start"))
        counts = store.counts()
        summary = ", ".join(f"{k} {v}" for k, v in counts.items())
        out.append(Check("ok", "database", f"{shown}: {summary}"))
        if inspect(store.engine).has_table("control"):
            pause = store.pause_state()
            if pause["paused"]:
                by = f" by {pause['by']}" if pause["by"] else ""
                since = f"{pause['since']:%Y-%m-%d %H:%M} UTC" if pause["since"] else "a while"
                out.append(Check("warn", "queue", f"paused since {since}{by}: no new jobs start", "i2v-daemon resume"))
        return out
    finally:
        store.close()


# ---- the model ----------------------------------------------------------------------------------


def check_model(settings: Any) -> list[Check]:
    from i2v_daemon.errors import I2VError
    from i2v_daemon.models.loader import FAMILIES, local_folder

    model: str = settings.model
    try:
        folder = local_folder(model)
    except I2VError as err:
        return [Check("fail", "model", str(err), "set model to a diffusers folder or a Hub repo id")]
    if folder is not None:
        return [_local_model(model, folder, FAMILIES)]
    return [_hub_model(model)]


def _local_model(model: str, folder: Path, families: dict[str, str]) -> Check:
    import json

    index = folder / "model_index.json"
    if not index.is_file():
        return Check("fail", "model", f"{folder} has no model_index.json",
                     "set model to the diffusers pipeline folder (the one with model_index.json, unet/, vae/, …)")
    try:
        cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        return Check("fail", "model", f"{index} cannot be read: {err}", "copy or download the model again")
    if cls not in families:
        return Check("fail", "model", f"{folder} is a {cls}, which i2v-daemon does not support",
                     f"use one of: {', '.join(families)}")
    return Check("ok", "model", f"{folder}: {cls} ({families[cls]})")


def _hub_model(model: str) -> Check:
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(model, "model_index.json")
    if isinstance(cached, str):
        size = ""
        try:
            for repo in huggingface_hub.scan_cache_dir().repos:
                if repo.repo_id == model and repo.repo_type == "model":
                    size = f", {repo.size_on_disk / GIB:.1f} GiB cached"
        except Exception:  # the size is a nicety
            pass
        return Check("ok", "model", f"{model} is in the Hugging Face cache ({Path(cached).parents[2]}{size})")
    fix = f"download it once with network access: huggingface-cli download {model} (with the daemon's HF_HOME)"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return Check("warn", "model", f"{model} is not in the Hugging Face cache and HF_HUB_OFFLINE is set", fix)
    try:
        huggingface_hub.model_info(model, timeout=15)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Check("warn", "model", f"{model} is not cached and the Hub cannot be reached ({first})", fix)
    return Check("ok", "model", f"{model} is on the Hub; the first start downloads it (about 10 GB for I2VGen-XL)")
