"""`i2v-daemon doctor`: is this machine ready to run the daemon, and if not, what to fix.

Each check returns `Check` values: ok, warn (works, but you may not like it), wait (not there now:
a database that does not accept connections, a read-only share, a GPU the driver does not show;
`run` and `serve` wait for it and go on by themselves, judged as `service/readiness.py` judges them)
or fail (the daemon will not work: `run` would exit 78, or every job, or every job of one model,
would fail). Nothing here changes anything: no folder is created, no schema upgraded, nothing
downloaded; a network probe is one request bounded to a few seconds, and none at all with
HF_HUB_OFFLINE set. Exit status 0 when nothing failed or waits, 1 otherwise.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon.errors import InputError, NotReady, first_line
from i2v_daemon.models.hub import HubProbe, hub_cli
from i2v_daemon.service.readiness import database_problem, model_cache_problem, os_problem

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings

GIB = 2**30
#: below this much free GPU memory the model (about 5 GiB in fp16) and a job will not fit
MIN_FREE_VRAM = 6 * GIB
#: the longest one look at the Hugging Face Hub may take; its own client retries for half a minute
#: where the systemd unit keeps the model cache (Environment=HF_HOME=%C/i2v-daemon/huggingface)
SERVICE_HF_HOME = Path("/var/cache/i2v-daemon/huggingface")
#: how a problem of a pipeline that is only partly there begins (a download or copy that stopped)
INCOMPLETE = "is incomplete: "
#: ffmpeg filter -> the `interpolation` mode that needs it
INTERPOLATION_FILTERS = {"minterpolate": "motion", "framerate": "blend"}


@dataclass(frozen=True)
class Check:
    level: str  # "ok" | "warn" | "wait" | "fail"
    name: str  # what was checked: gpu, ffmpeg, inbox_dir, database, model, …
    message: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        """The JSON shape `doctor --json` prints."""
        return {"level": self.level, "name": self.name, "message": self.message, "fix": self.fix}


def run_checks(settings: Settings, *, min_free_gib: float = 5.0) -> list[Check]:
    """Every check, in the order `render` shows them; a check that crashes becomes a fail of its own."""
    probes: list[tuple[str, Callable[[], list[Check]]]] = [
        ("gpu", lambda: check_gpu(settings)),
        ("ffmpeg", lambda: check_ffmpeg(settings)),
        ("folders", lambda: check_folders(settings, min_free_gib)),
        ("database", lambda: check_database(settings)),
        ("model", lambda: check_models(settings)),
        ("model_cache", lambda: check_model_cache(settings)),
        ("fit", lambda: check_fit(settings)),
        ("rife_model", lambda: check_rife_model(settings)),
        ("on_finish", lambda: check_on_finish(settings)),
        ("api_token_file", lambda: check_api_token_file(settings)),
        ("accelerate", lambda: check_accelerate(settings)),
        ("provenance", lambda: check_provenance(settings)),
        ("notify", lambda: check_notify(settings)),
    ]
    checks: list[Check] = []
    for name, probe in probes:
        try:
            checks += probe()
        except Exception as err:  # a check that crashes is a finding, not a traceback
            checks.append(Check("fail", name, f"{type(err).__name__}: {err}"))
    return checks


def exit_code(checks: list[Check]) -> int:
    """1 when anything failed or is not there now (waits), else 0 (warnings do not fail)."""
    return 1 if any(c.level in ("fail", "wait") for c in checks) else 0


def render(checks: list[Check]) -> str:
    """The checks as text: one line each, a `fix:` line under each problem, then a summary."""
    lines = []
    for c in checks:
        lines.append(f"{c.level.upper():4}  {c.name}: {c.message}")
        if c.fix and c.level != "ok":
            lines.append(f"      fix: {c.fix}")
    fails = sum(c.level == "fail" for c in checks)
    warns = sum(c.level == "warn" for c in checks)
    waits = sum(c.level == "wait" for c in checks)
    waiting = f", {waits} not there now (the daemon waits for it)" if waits else ""
    lines.append(
        f"{fails} problem(s) to fix, {warns} warning(s){waiting}" if fails or warns or waits
        else "everything looks ready"
    )
    return "\n".join(lines)


# ---- the GPU and its driver -----------------------------------------------------------------------


def check_gpu(settings: Settings) -> list[Check]:
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
        elif info["cuda_build"]:  # a driver being reloaded, MIG being reconfigured: `run` waits for the GPU
            out.append(Check("wait", "gpu", f"{why} ({build}); device = {device}: `run` waits until the driver "
                             "shows the GPU", fix))
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


def check_ffmpeg(settings: Settings) -> list[Check]:
    """The bundled (or IMAGEIO_FFMPEG_EXE) ffmpeg runs, has libx264, and the interpolation filters."""
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        version = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30)
        encoders = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30)
        filters = subprocess.run([exe, "-hide_banner", "-filters"], capture_output=True, text=True, timeout=30)
    except Exception as err:
        return [Check("fail", "ffmpeg", f"the ffmpeg binary cannot run: {err}",
                      "pip install --force-reinstall imageio-ffmpeg, or set IMAGEIO_FFMPEG_EXE")]
    first = version.stdout.splitlines()[0] if version.stdout else f"exit {version.returncode}"
    if version.returncode != 0:
        return [Check("fail", "ffmpeg", f"{exe} failed: {first}", "reinstall imageio-ffmpeg")]
    if "libx264" not in encoders.stdout:
        return [Check("fail", "ffmpeg", f"{first}: no libx264 encoder (H.264 is required)",
                      "point IMAGEIO_FFMPEG_EXE at an ffmpeg built with libx264")]
    # `-filters` lines: flags, the name, the pads, a description (" TS minterpolate  V->V  …").
    have = {m.group(1) for m in re.finditer(r"^\s*[A-Z.|]{2,3}\s+(\w+)\s", filters.stdout, re.MULTILINE)}
    out = [Check("ok", "ffmpeg", f"{first} ({exe}), with libx264")]
    for name, mode in INTERPOLATION_FILTERS.items():
        if name not in have:
            out.append(Check(
                "warn", "ffmpeg", f"{exe} has no {name} filter: interpolation = \"{mode}\" will not work "
                f"(those jobs are delivered at their generated fps, and their job.log says why)",
                "point IMAGEIO_FFMPEG_EXE at a full ffmpeg build (the one imageio-ffmpeg ships has every filter), "
                f"or use another interpolation mode than \"{mode}\"",
            ))
    return out


# ---- folders ------------------------------------------------------------------------------------


def check_folders(settings: Settings, min_free_gib: float = 5.0) -> list[Check]:
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
    try:
        st = path.stat()
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError as err:  # a stale or unreachable share
        judged = os_problem(err, key, path)
        level = "wait" if isinstance(judged, NotReady) else "fail"
        return Check(level, key, f"{path} cannot be read now: {err.strerror}" + _WAITS * (level == "wait"),
                     "check the share's server and mount (mount, dmesg)"), None
    if read_only:
        return Check("wait", key, f"{path} is on a read-only filesystem{_WAITS}",
                     "remount it read-write (mount -o remount,rw), or check the share's server"), st.st_dev
    if not os.access(path, os.W_OK | os.X_OK):
        return Check("fail", key, f"{path} is not writable by {_me()} ({_describe(st)})",
                     f"sudo chown {_me()} {path}, or add {_me()} to its group and chmod g+rwx {path}"), st.st_dev
    free = shutil.disk_usage(path).free
    msg = f"{path} ({_describe(st)}, {free / GIB:.1f} GiB free)"
    if free < min_free_gib * GIB:
        return Check("warn", key, f"{msg}: under {min_free_gib:g} GiB free",
                     "free disk space: videos and job folders need room"), st.st_dev
    return Check("ok", key, msg), st.st_dev


#: said of what `run` and `serve` wait for rather than exit
_WAITS = ": `run` and `serve` wait for it and go on by themselves"


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


def check_database(settings: Settings) -> list[Check]:
    from sqlalchemy.engine import make_url

    url = settings.filled("database_url")
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
        judged = database_problem(err, url)
        if isinstance(judged, NotReady):
            return [Check("wait", "database", f"cannot open {shown} now: {judged.cause}{_WAITS}",
                          "start the database server, or check the network to it")]
        return [Check("fail", "database", f"cannot open {shown}: {first_line(err)}", fix)]


def _open_database(url: str, shown: str, *, postgres: bool) -> list[Check]:
    from sqlalchemy import create_engine, inspect

    from i2v_daemon.queue import migrate
    from i2v_daemon.queue.store import Store

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


# ---- the models ---------------------------------------------------------------------------------


def check_model_cache(settings: Settings) -> list[Check]:
    """The default model's folder, or the Hugging Face cache, on a share that fails now: `run` waits for it."""
    try:
        model_cache_problem(settings)
    except NotReady as err:
        return [Check("wait", "model_cache", f"{err.what} cannot be read now: {err.cause}{_WAITS}",
                      "check the share's server and mount (mount, dmesg)")]
    return []


def check_models(settings: Settings) -> list[Check]:
    """The default model and every entry of `models`: each is something `run` or a job loads, with its weights."""
    hub = HubProbe()
    weights = settings.model_weights()
    out = [_weights_check(_model_check("model", settings.model, hub, name=None), settings.model,
                          weights["default"], "")]
    for name, entry in settings.models.items():
        check = _model_check(f"models.{name}", entry.model, hub, name=name)
        out.append(_weights_check(check, entry.model, weights[name], f"models.{name}."))
    return out


def check_fit(settings: Settings) -> list[Check]:
    """Which presets fit this card, for every model whose configs are here (`i2v-daemon plan`'s answer).

    One line per model: the placement the daemon would load it with (planned for the largest preset, as
    the holder plans it) and each preset's predicted peak there; a warning for a preset that fits only on
    a heavier placement of the out-of-memory ladder, only smaller, or not at all. The CPU has no card to
    plan for.
    """
    from i2v_daemon.models import loader, planner
    from i2v_daemon.models.holder import ModelHolder
    from i2v_daemon.params import NEEDS_LORA

    holder = ModelHolder(settings.model, settings.device, settings.dtype, vram_budget_gib=settings.vram_budget_gib,
                         accelerate=settings.accelerate)
    budget = holder.card_budget()
    if budget is None:
        return [Check("ok", "fit", f"device = {settings.device}: no card to plan for; `i2v-daemon plan --vram-gib N` "
                                   "answers for one")]
    weights = settings.model_weights()
    presets = settings.all_presets()
    out = []
    for name, model in settings.model_choices().items():
        folder = loader.config_folder(model)
        key = "fit" if name == "default" else f"fit models.{name}"
        if folder is None:
            out.append(Check("ok", key, f"{model}: its configs are not here yet; planned when it is downloaded"))
            continue
        plans: dict[str, Any] = {}
        said, short = [], []
        for preset_name, preset in presets.items():
            if preset.lora is None and preset_name in NEEDS_LORA:
                continue  # not usable until it has its LoRA (`[presets.wan-turbo] lora = …`)
            kind = preset.weights or weights[name].kind
            try:
                plans[preset_name] = planner.plan(
                    str(folder), budget_bytes=budget, resolution=preset.resolution, num_frames=preset.num_frames,
                    ladder=list(settings.resolution_ladder), dtype=settings.dtype, weights=kind,
                    margin=settings.memory_margin, allow_fp8_fallback=settings.allow_fp8_fallback and kind == "auto",
                    autotune=holder.autotunes(kind))  # as the worker plans: on a GPU with the fast path
            except InputError as err:  # a size or frame count this family cannot honour: not this card's fault
                said.append(f"{preset_name}: not for this model ({first_line(err)})")
            except Exception as err:  # one preset the model cannot plan says so; the others are still shown
                said.append(f"{preset_name}: cannot be planned ({first_line(err)})")
                short.append(preset_name)
        if plans:
            # As the daemon does: one placement, planned at load for the largest preset, serves every job.
            largest = max(plans.values(), key=lambda p: p.width * p.height * p.num_frames)
            placed = largest.chosen or largest.predictions[-1]
            head = f"placed {placed.name} (planned for {largest.width}x{largest.height}x{largest.num_frames})"
            for preset_name, plan in plans.items():
                size = f"{plan.width}x{plan.height}x{plan.num_frames}"
                there = next(p for p in plan.predictions if p.name == placed.name)
                if there.fits:
                    said.append(f"{preset_name} {size} ({there.peak_bytes / GIB:.1f} GiB)")
                    continue
                short.append(preset_name)
                heavier = next((p for p in plan.predictions if p.fits), None)
                smaller = next((s for s in plan.smaller if s["chosen"]), None)
                if heavier is not None:
                    said.append(f"{preset_name} {size} only on the ladder's {heavier.name}")
                elif smaller is not None:
                    pick = smaller["chosen"]
                    said.append(f"{preset_name} {size} does not fit, runs at {smaller['width']}x{smaller['height']} "
                                f"({pick['placement']}{'+fp8' if pick['fp8'] else ''})")
                else:
                    said.append(f"{preset_name} {size} does not fit at any size of resolution_ladder")
            said.insert(0, head)
        message = f"{model} on a {budget / GIB:.3g} GiB card (predicted): " + "; ".join(said)
        fix = (f"presets {', '.join(short)}: lower their resolution or num_frames, allow fp8 weights "
               "(allow_fp8_fallback), or use a larger card" if short else "")
        out.append(Check("warn" if short else "ok", key, message, fix))
    return out


def _weights_check(check: Check, model: str, weights: Any, prefix: str) -> Check:
    """A model that is fine but can never run with its weights (GGUF on a UNet, …) fails as `run` stops at it."""
    from i2v_daemon.errors import ConfigError
    from i2v_daemon.models.loader import check_weights

    if check.level != "ok":
        return check
    try:
        check_weights(model, weights, prefix)
    except ConfigError as err:
        return Check("fail", check.name, f"{err} — `run` and `run --once` exit 78",
                     f"change {prefix}weights (docs/models.md#weights)")
    if weights.kind == "auto":
        return check
    return Check(check.level, check.name, f"{check.message}; weights {weights.label()}", check.fix)


def _model_check(key: str, model: str, hub: HubProbe, *, name: str | None) -> Check:
    from huggingface_hub.utils import validate_repo_id

    from i2v_daemon.errors import I2VError
    from i2v_daemon.models.loader import local_folder

    # What failing costs, said in each fail, as `run` behaves: a default model that can never load as
    # configured stops it (exit 78, so systemd does not restart it in a loop); one that cannot be
    # fetched *now* leaves it up with every job queued; another model fails the jobs that name it.
    never = "`run` and `run --once` exit 78" if name is None else f'every job with model = "{name}" fails'
    not_now = ("nothing runs: jobs stay queued until it can be fetched, `run --once` exits 78" if name is None
               else f'jobs with model = "{name}" wait in the queue (using no attempt) until it can be fetched')
    try:
        folder = local_folder(model, key)
        if folder is None:
            validate_repo_id(model)
    except (I2VError, ValueError) as err:  # HFValidationError is a ValueError
        return Check("fail", key, f"{err} — {never}",
                     f"set {key} to a diffusers folder (the one with model_index.json) or a Hub repo id "
                     "such as ali-vilab/i2vgen-xl")
    if folder is not None:
        what, problem, fix = _pipeline(folder)
        if problem:
            return Check("fail", key, f"{folder} {problem} — {never}", f"{fix}, or set {key} to another model")
        return Check("ok", key, f"{folder}: {what}")
    return _hub_model(key, model, hub, never=never, not_now=not_now)


def _pipeline(folder: Path) -> tuple[str, str, str]:
    """(what it is, what is wrong with it or "", the fix) for a diffusers pipeline folder or cached snapshot.

    Its parts are checked too; a part that is missing reads "is incomplete: …".
    """
    from i2v_daemon.models.loader import FAMILIES, missing_pipeline_class

    index = folder / "model_index.json"
    if not index.is_file():
        return "", "has no model_index.json", \
            "point it at the diffusers pipeline folder (with model_index.json, unet/, vae/, …)"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        cls = data.get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        return "", f"has a model_index.json that cannot be read ({err})", "copy or download the model again"
    if cls not in FAMILIES:
        return "", f"is a {cls}, which i2v-daemon does not support", f"use a pipeline of one of: {', '.join(FAMILIES)}"
    installed = missing_pipeline_class(cls)
    if installed is not None:
        return "", f"needs diffusers' {cls}, which diffusers {installed} does not have", \
            "upgrade diffusers (pip install -U diffusers)"
    what = f"{cls} ({FAMILIES[cls]})"
    missing = _missing_parts(folder, data)
    if missing:
        return what, f"{INCOMPLETE}{'; '.join(missing)}", "copy or download the whole pipeline again"
    return what, "", ""



#: file endings of weights that from_pretrained can load
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def _missing_parts(folder: Path, index: dict[str, Any]) -> list[str]:
    """Components model_index.json names that are not there (a half-finished download or copy)."""
    missing = []
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or None in spec:
            continue  # metadata, flags, or a component the pipeline leaves out
        sub = folder / part
        if not sub.is_dir():
            missing.append(f"{part}/ is missing")
        elif (sub / "config.json").is_file() and not _has_weights(sub):  # a model (not a tokenizer or scheduler)
            missing.append(f"{part}/ has no complete weights")
    return missing


def _has_weights(sub: Path) -> bool:
    # is_file() follows links: a Hub cache's snapshot link to a blob that never finished does not count.
    files = {p.name for p in sub.iterdir() if p.is_file()}
    for name in files:
        if name.endswith(".index.json"):  # sharded: complete when every shard it names is there
            try:
                shards = set(json.loads((sub / name).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if shards and shards <= files:
                return True
    return any(n.endswith(_WEIGHTS) and not re.search(r"-\d{5}-of-\d{5}\.", n) for n in files)


def _hub_model(key: str, model: str, hub: HubProbe, *, never: str, not_now: str) -> Check:
    import huggingface_hub
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    get_it = _download_advice(key, model)
    cached = huggingface_hub.try_to_load_from_cache(model, "model_index.json")
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        what, problem, fix = _pipeline(snapshot)
        copy = f"{model}: the copy in the Hugging Face cache ({snapshot})"
        if problem and not problem.startswith(INCOMPLETE):
            return Check("fail", key, f"{copy} {problem} — {never}", f"{fix}, or set {key} to another model")
        if problem:  # a download that stopped half-way: the next load with network access finishes it
            if not offline and hub.ask(model)[0] == "ok":
                return Check("warn", key, f"{copy} {problem}; the first load downloads the rest", get_it)
            return Check("fail", key, f"{copy} {problem} — {not_now}", get_it)
        where = f"{model}: {what}, in the Hugging Face cache ({cache}, {_size(_cached_bytes(cache, model))})"
        if offline:
            return Check("ok", key, f"{where}; HF_HUB_OFFLINE is set: it loads without the network")
        verdict, detail = hub.ask(model)
        if verdict == "down":
            return Check("warn", key, f"{where}, but the Hub cannot be reached ({detail}) and HF_HUB_OFFLINE is not "
                         "set: each load asks the Hub about every file first, and may wait on it",
                         _OFFLINE_ADVICE)
        return Check("ok", key, where)
    if offline:
        return Check("fail", key, f"{model} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set, "
                     f"so it cannot be downloaded — {not_now}", get_it)
    verdict, detail = hub.ask(model)
    if verdict == "down":
        return Check("fail", key, f"{model} is not in the Hugging Face cache ({cache}) and the Hub cannot be "
                     f"reached ({detail}) — {not_now}", get_it)
    if verdict == "gated":
        return Check("fail", key, f"{model} is gated on the Hub: it needs a logged-in user who accepted its terms "
                     f"— {never}", f"accept them on https://huggingface.co/{model}, then, as the daemon's user: "
                     f"{_hf_home_prefix()}{hub_cli()} auth login; then {get_it}")
    if verdict == "missing":
        return Check("fail", key, f"{model}: no such repo on the Hub, or a private one ({detail}) — {never}",
                     f"check the repo id on https://huggingface.co/{model}; a private repo needs "
                     f"`{hub_cli()} auth login` as the daemon's user")
    if verdict == "not_pipeline":
        return Check("fail", key, f"{model} has no model_index.json on the Hub, so it is not a diffusers pipeline "
                     f"— {never}", f"set {key} to a diffusers repo such as ali-vilab/i2vgen-xl")
    if verdict == "refused":
        return Check("fail", key, f"the Hub refused {model} ({detail}) — {never}",
                     f"check the repo id and your token (`{hub_cli()} auth whoami`)")
    size = " (about 10 GB)" if model == "ali-vilab/i2vgen-xl" else ""
    return Check("ok", key, f"{model} is on the Hub, not in the cache yet: the first load downloads it{size} "
                 f"into {cache}")


_OFFLINE_ADVICE = (
    "set HF_HUB_OFFLINE=1 in the daemon's environment (under systemd: `systemctl edit i2v-daemon`, then "
    "[Service] Environment=HF_HUB_OFFLINE=1): a cached model then loads without touching the network"
)


def _download_advice(key: str, model: str) -> str:
    hf = hub_cli()
    advice = (f"download it once, with network access, as the daemon's user: {_hf_home_prefix()}{hf} download {model}; "
              f"to run without the network afterwards, set HF_HUB_OFFLINE=1 in the daemon's environment, or download "
              f"it to a folder ({hf} download {model} --local-dir DIR) and set {key} = \"DIR\"")
    from huggingface_hub import constants

    if "HF_HOME" not in os.environ and SERVICE_HF_HOME.is_dir() and Path(constants.HF_HOME) != SERVICE_HF_HOME:
        # The cache doctor looked in is not the one the service uses: say so, or the fix looks wrong.
        advice += (f". This doctor looked in {constants.HF_HOME}; the service's cache is {SERVICE_HF_HOME}: "
                   f"run `sudo -u {_user(SERVICE_HF_HOME.stat().st_uid)} HF_HOME={SERVICE_HF_HOME} i2v-daemon doctor`")
    return advice


def _hf_home_prefix() -> str:
    """`HF_HOME=… ` as the daemon has it: the environment's, else the systemd unit's when it is installed."""
    from huggingface_hub import constants

    if "HF_HOME" not in os.environ and SERVICE_HF_HOME.is_dir():
        return f"HF_HOME={SERVICE_HF_HOME} "
    return f"HF_HOME={constants.HF_HOME} "


def _cached_bytes(cache: Path, model: str) -> int:
    blobs = cache / f"models--{model.replace('/', '--')}" / "blobs"
    try:
        return sum(p.stat().st_size for p in blobs.iterdir() if p.is_file())
    except OSError:
        return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


# ---- the fast path -------------------------------------------------------------------------------


def check_accelerate(settings: Settings) -> list[Check]:
    """`accelerate`: whether the compiled fast path will run here, and what its compile cache holds."""
    from i2v_daemon.models.compile_cache import describe as describe_cache
    from i2v_daemon.models.gpu import describe as describe_gpu
    from i2v_daemon.models.holder import resolve_accelerate

    device = settings.device
    if device == "auto":
        device = "cuda" if describe_gpu()["cuda_available"] else "cpu"
    on = resolve_accelerate(settings.accelerate, device)
    root = Path(settings.data_dir) / "cache" / "compile"
    cache = describe_cache(root)
    state = "on" if on else "off"
    msg = f'accelerate = "{settings.accelerate}": the fast path is {state} on {device}'
    if on:
        held = (f"{cache['size_bytes'] / 2**20:.0f} MiB, {cache['artifact_files']} artifact file(s)"
                if cache["exists"] else "empty: the first job at each size compiles (minutes on a GPU), later "
                "starts reuse it")
        msg += f"; compile cache {cache['folder']} ({held})"
        if settings.warm_up:
            msg += "; the presets' shapes are compiled at start-up (warm_up)"
    out = [Check("ok", "accelerate", msg)]
    if cache["other_keys"]:
        stale = ", ".join(cache["other_keys"])
        out.append(Check("warn", "accelerate",
                         f"{root} also holds caches for other torch/driver/GPU versions ({stale})",
                         f"they are no longer used and can be deleted: rm -r {root}/<key>"))
    return out


# ---- frame interpolation: the RIFE weights ------------------------------------------------------


def check_rife_model(settings: Settings) -> list[Check]:
    """`rife_model`: required where interpolation = "rife" is a default, and a readable safetensors file when set."""
    users = _rife_users(settings)
    path = getattr(settings, "rife_model", None)
    if path is None:
        if not users:
            return []
        return [Check("fail", "rife_model", f'interpolation = "rife" ({", ".join(users)}) needs rife_model, '
                      "which is not set: those jobs cannot be interpolated",
                      'set rife_model to a local RIFE weights file (.safetensors; it is never downloaded), '
                      'or use interpolation = "motion"')]
    path = Path(path)
    problem = _rife_problem(path)
    if problem:
        return [Check("fail", "rife_model", f"{path} {problem}",
                      "set rife_model to a readable local RIFE weights file (.safetensors), or use "
                      'interpolation = "motion"')]
    return [Check("ok", "rife_model", f"{path}: RIFE weights" + (f", used by {', '.join(users)}" if users else ""))]


def _rife_users(settings: Settings) -> list[str]:
    """The settings that make "rife" a default: `interpolation` and presets (which may not have the key yet)."""
    users = ["interpolation"] if getattr(settings, "interpolation", None) == "rife" else []
    presets = {**settings.all_presets(), **getattr(settings, "presets", {})}
    users += [f"presets.{name}" for name, p in presets.items() if getattr(p, "interpolation", None) == "rife"]
    return users


def _rife_problem(path: Path) -> str:
    """What is wrong with a RIFE weights file, or ""."""
    from i2v_daemon.models.loader import _safetensors_header

    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return f"cannot be read by {_me()} ({_describe(path.stat())})"
    check = _rife_checker()
    if check is not None:  # the interpolation module knows the formats and the tensors RIFE needs
        try:
            answer = check(path)  # None when usable, else what is wrong and what to do
        except Exception as err:
            return f"is not usable RIFE weights: {type(err).__name__}: {err}"
        if isinstance(answer, str) and answer:
            return f"is not usable: {answer}"
        return "is not usable RIFE weights" if answer is False else ""
    try:
        header = _safetensors_header(path)
    except (OSError, ValueError, struct.error) as err:
        return f"is not a safetensors file ({err or type(err).__name__})"
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        return "is a safetensors file without tensors"
    return ""


def _rife_checker() -> Callable[[Path], Any] | None:
    try:
        from i2v_daemon.models import rife
    except ModuleNotFoundError as err:
        if err.name != "i2v_daemon.models.rife":
            raise  # the module is there but broken: a finding, not an absence
        return None
    return getattr(rife, "check_rife_weights", None)


# ---- the on_finish hook and the API token ---------------------------------------------------------


def check_on_finish(settings: Settings) -> list[Check]:
    """`on_finish`: its argv[0] must be an executable file, absolute or on PATH."""
    argv = list(getattr(settings, "on_finish", None) or [])
    if not argv:
        return []
    exe = argv[0]
    fix = 'set on_finish = ["/absolute/path/to/program", "arg", …] to an executable file (chmod +x it)'
    if os.sep in exe:
        path = Path(exe)
        if not path.is_absolute():
            return [Check("fail", "on_finish", f"{exe} is a relative path: the daemon's working folder decides "
                          "what it means (/ under systemd)", fix)]
        if not path.exists():
            return [Check("fail", "on_finish", f"{exe} does not exist: the hook never runs", fix)]
        if not path.is_file() or not os.access(path, os.X_OK):
            return [Check("fail", "on_finish", f"{exe} is not an executable file ({_describe(path.stat())})", fix)]
        resolved = str(path)
    else:
        found = shutil.which(exe)
        if found is None:
            return [Check("fail", "on_finish", f"{exe} is not on PATH ({os.environ.get('PATH', '')}): the hook "
                          "never runs", f"{fix}; under systemd PATH is the unit's, so prefer an absolute path")]
        resolved = found
    return [Check("ok", "on_finish", f"runs {resolved}" + (f" with {len(argv) - 1} argument(s)" if argv[1:] else ""))]


def check_api_token_file(settings: Settings) -> list[Check]:
    """`api_token_file`, when it exists: readable by its owner only, and that owner is the daemon's user."""
    path = getattr(settings, "api_token_file", None)
    if path is None:
        return []
    path = Path(path)
    if not path.exists():
        return [Check("ok", "api_token_file", f"{path} does not exist yet; `i2v-daemon serve` creates it (mode 0600)")]
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        return [Check("fail", "api_token_file", f"{path} is not a regular file ({_describe(st)})",
                      "set api_token_file to a file path, or remove what is there so `serve` creates it")]
    problems, fixes = [], []
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        problems.append(f"mode {mode:04o} lets others than its owner read the token")
        fixes.append(f"chmod 600 {path}")
    if st.st_uid != os.geteuid():
        problems.append(f"it belongs to {_user(st.st_uid)}, not {_me()} (the user this doctor runs as)")
        fixes.append(f"sudo chown {_me()} {path} (run doctor as the daemon's user)")
    if problems:
        return [Check("warn", "api_token_file", f"{path}: {'; '.join(problems)}", "; ".join(fixes))]
    return [Check("ok", "api_token_file", f"{path} ({_describe(st)})")]


def check_provenance(settings: Settings) -> list[Check]:
    """C2PA signing: the bindings load, the certificate loads, its key is its own, and how long it has left."""
    from i2v_daemon.errors import ConfigError
    from i2v_daemon.work import provenance

    if getattr(settings, "provenance", "c2pa") == "off":
        return [Check("warn", "provenance", "provenance = \"off\": videos are published without a C2PA manifest "
                      "(each job.json says so); they still carry their recipe",
                      "set provenance = \"c2pa\" to sign and label every output as AI-made")]
    checks: list[Check] = []
    try:
        checks.append(Check("ok", "c2pa", f"bindings load: {provenance.bindings()}"))
    except Exception as err:  # ImportError, OSError from the native library
        return [Check("fail", "c2pa", f"the c2pa bindings do not load ({type(err).__name__}: {err}): no job can be "
                      "signed, so every finished job waits", "pip install 'c2pa-python>=0.38,<0.39' into the "
                      "daemon's environment, or set provenance = \"off\"")]
    files = provenance.signer_files(settings, create=False)
    if files.self_signed and not files.key.exists():
        # Not a warning: a self-made chain is a working default (every output is labelled); doctor says what it means.
        return [*checks, Check("ok", "c2pa_cert", f"no c2pa_cert/c2pa_key: the daemon makes its own chain in "
                               f"{files.key.parent} at its first start; verifiers will show that signer as "
                               f"untrusted — to be trusted, {_REAL_CERT}", _REAL_CERT)]
    try:
        info = provenance.check_certificate(files)
    except ConfigError as err:
        return [*checks, Check("fail", "c2pa_cert", str(err), "give c2pa_cert (the signing certificate first) and "
                               "its own key in c2pa_key, or unset both to sign with a self-made certificate")]
    days = info["days_left"]
    what = (f"{info['subject']} ({info['algorithm']}, {info['chain_length']} certificate(s)), expires "
            f"{info['expires'][:10]} ({days} days left); the key matches")
    if days < 0:
        checks.append(Check("fail", "c2pa_cert", f"{what}: EXPIRED, so signing fails and jobs wait",
                            "renew the certificate" if not files.self_signed else
                            f"remove {files.key.parent} so the daemon makes a new chain, or {_REAL_CERT}"))
    elif days < 30:
        checks.append(Check("warn", "c2pa_cert", f"{what}: expires soon", "renew the certificate before then"))
    elif files.self_signed:
        checks.append(Check("ok", "c2pa_cert", f"self-made: {what}; verifiers will show the signer as untrusted "
                            f"(every output is still labelled and its signature valid) — to be trusted, {_REAL_CERT}",
                            _REAL_CERT))
    else:
        checks.append(Check("ok", "c2pa_cert", what))
    mode = stat.S_IMODE(files.key.stat().st_mode)
    if mode & 0o077:
        checks.append(Check("warn", "c2pa_key", f"{files.key} has mode {mode:04o}: others than its owner can read "
                            "the signing key", f"chmod 600 {files.key}"))
    tsa = getattr(settings, "c2pa_tsa_url", None)
    if tsa:
        checks.append(Check("ok", "c2pa_tsa_url", f"signatures are timestamped by {tsa} (not contacted by doctor; "
                            "unreachable at signing time, a job waits)"))
    return checks


_REAL_CERT = ("set c2pa_cert and c2pa_key to a signing certificate from a CA on the C2PA trust list (or your "
              "organisation's, for verifiers you configure): docs/provenance-and-batches.md")


def check_notify(settings: Settings) -> list[Check]:
    """Every Apprise URL (the config's and the presets') parses; webhook_secret is set where webhooks are."""
    from i2v_daemon.settings import notify_url_problem

    targets = [("notify", u) for u in getattr(settings, "notify", [])]
    for name, table in (getattr(settings, "presets", None) or {}).items():
        targets += [(f"presets.{name}.notify", u) for u in (getattr(table, "notify", None) or [])]
    checks: list[Check] = []
    if targets:
        from i2v_daemon.delivery.notify import shown

        bad = [(key, url, problem) for key, url in targets if (problem := notify_url_problem(url))]
        for key, _url, problem in bad:
            checks.append(Check("fail", key, str(problem), "fix the URL's form (see the Apprise wiki for the service)"))
        if not bad:
            checks.append(Check("ok", "notify", f"{len(targets)} Apprise target(s): "
                                f"{', '.join(shown(u) for _, u in targets)} (syntax only; nothing was sent)"))
    if getattr(settings, "webhooks", None) and not getattr(settings, "webhook_secret", None):
        checks.append(Check("warn", "webhook_secret", "webhooks are unsigned: a receiver cannot tell them from "
                            "forgeries", "set webhook_secret (docs/provenance-and-batches.md#signed-webhooks)"))
    return checks
