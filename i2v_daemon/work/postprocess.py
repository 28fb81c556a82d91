"""After generation: the poster, the encoded video(s), frame interpolation to the delivered rate, and the check
that what was written is what was generated.

The generated frames are kept in work/<id>/frames.npy until the job is published, so an encode
that fails for a reason that passes (a full disk, ffmpeg killed) is done again from them on the
next attempt instead of regenerating the whole video on the GPU. A video whose frame count or size
differs from what was generated is a bug, not bad luck: that fails the job instead of retrying it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from i2v_daemon.errors import DatabaseGone, GenerationError, I2VError, JobCanceled, LeaseLost
from i2v_daemon.logs import JobLog
from i2v_daemon.queue.jobs import Job
from i2v_daemon.work.video import mp4_info, write_mp4

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings

FRAMES = "frames.npy"
FRAMES_META = "frames.json"
POSTER = "poster.jpg"


def save_frames(frames: np.ndarray, job_dir: Path, effective: dict[str, Any]) -> None:
    """Keep the generated frames beside the job until it is published (not fsynced: a loss costs a regeneration)."""
    tmp = job_dir / f".{FRAMES}.part"
    with open(tmp, "wb") as fh:
        np.save(fh, frames, allow_pickle=False)
    os.replace(tmp, job_dir / FRAMES)
    (job_dir / FRAMES_META).write_text(json.dumps({"shape": list(frames.shape), "seed": effective.get("seed")}))


def saved_frames(job_dir: Path, job: Job) -> np.ndarray | None:
    """The frames an earlier attempt of this job generated, when they match what it recorded."""
    eff = job.effective or {}
    try:
        meta = json.loads((job_dir / FRAMES_META).read_text())
        frames: np.ndarray = np.load(job_dir / FRAMES, allow_pickle=False)
    except (OSError, ValueError):
        return None
    want = [eff.get("num_frames"), eff.get("height"), eff.get("width"), 3]
    if list(frames.shape) != want or meta.get("seed") != eff.get("seed") or frames.dtype != np.uint8:
        return None
    return frames


def drop_frames(job_dir: Path) -> None:
    for name in (FRAMES, FRAMES_META):
        with contextlib.suppress(FileNotFoundError):
            (job_dir / name).unlink()


def write_poster(frames: np.ndarray, path: Path) -> None:
    """The middle frame, full size, as a JPEG (written under a temporary name, then renamed)."""
    from PIL import Image

    tmp = path.with_name(f".{POSTER}.part")
    Image.fromarray(frames[len(frames) // 2]).save(tmp, "JPEG", quality=90)
    os.replace(tmp, path)


def check_video(path: Path, width: int, height: int, frames: int | None) -> dict[str, Any]:
    """The written video's facts from its container; GenerationError when they differ from what was made."""
    info = mp4_info(path)
    made = (info["width"], info["height"])
    if made != (width, height) or (frames is not None and info["num_frames"] != frames):
        raise GenerationError(
            f"the encoder wrote {info['num_frames']} frames of {made[0]}x{made[1]} where {frames} of {width}x{height} "
            "were generated; this is a bug in i2v-daemon's encoding, please report it with the job's job.log"
        )
    return info


def write_videos(
    frames: np.ndarray, job: Job, effective: dict[str, Any], job_dir: Path, *, enter: Callable[[str], None],
    settings: Settings, device: str, jlog: JobLog, notes: list[str], on_alive: Callable[[str], Any],
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Poster, video (and the interpolated one); returns the video's file name, the effective values, postprocess."""
    params = job.params
    fps = int(effective["fps"])
    output_fps = params.output_fps if params is not None else None
    write_poster(frames, job_dir / POSTER)
    enter("encoding")
    video = f"{job.name}.mp4"
    count, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    post: list[dict[str, Any]] = []
    effective = {**effective, "output_fps": fps, "interpolation": None, "output_frames": count}
    made = job_recipe(job, effective, job_dir, settings)
    if not output_fps or output_fps <= fps:
        write_mp4(frames, job_dir / video, fps, recipe=made)
        check_video(job_dir / video, width, height, count)
        jlog.info("video_written", file=video, width=width, height=height, num_frames=count, fps=fps)
        return video, effective, post
    generated = f"{job.name}.generated.mp4"
    write_mp4(frames, job_dir / generated, fps, recipe=made)
    check_video(job_dir / generated, width, height, count)
    jlog.info("video_written", file=generated, width=width, height=height, num_frames=count, fps=fps)
    mode = params.interpolation or "motion"  # type: ignore[union-attr]
    enter("interpolating")
    entry, delivered = _interpolate(frames, job_dir / generated, job_dir / video, fps, output_fps, mode, settings,
                                    device, jlog, notes, on_alive,
                                    {**made, "output_fps": output_fps, "interpolation": mode})
    post.append(entry)
    effective.update(output_fps=output_fps if delivered else fps, interpolation=mode if delivered else None,
                     output_frames=entry.get("output_frames", count) if delivered else count)
    return video, effective, post


def job_recipe(job: Job, effective: dict[str, Any], job_dir: Path, settings: Settings) -> dict[str, Any]:
    """The recipe the job's videos carry (`recipe.py`): its effective values, model and input image's hash."""
    from i2v_daemon.work import recipe

    name = effective.get("model") or "default"
    image = job_dir / "input" / job.inputs[0] if job.inputs else None
    return recipe.build(job.name, job.prompt, job.negative_prompt, effective,
                        model_id=settings.model_choices().get(name) or job.model,
                        input_file=image if image is not None and image.is_file() else None)


def _interpolate(
    frames: np.ndarray, generated: Path, target: Path, fps: int, output_fps: int, mode: str, settings: Settings,
    device: str, jlog: JobLog, notes: list[str], on_alive: Callable[[str], Any], made: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Interpolate to `output_fps`; on any failure the generated video becomes the delivered one, and says why."""
    entry: dict[str, Any] = {"step": "interpolation", "mode": mode, "fps": fps, "output_fps": output_fps}
    t0 = time.monotonic()
    try:
        from i2v_daemon.work.interpolate import interpolate_to_mp4

        result = interpolate_to_mp4(
            frames, fps=fps, output_fps=output_fps, mode=mode, path=target, rife_model=settings.rife_model,
            device=device, on_progress=lambda done, total: on_alive("interpolating"), recipe=made,
        )
    except (JobCanceled, LeaseLost, DatabaseGone):  # not interpolation's failure: the job's, or the daemon's
        raise
    except Exception as err:
        shutil.copyfile(generated, target)
        # Our own errors say what happened in words; anything else is named by its type too.
        why = str(err) if isinstance(err, I2VError) else f"{type(err).__name__}: {err}"
        note = f"interpolation to {output_fps} fps ({mode}) failed, so the video is delivered at {fps} fps: {why}"
        notes.append(note)
        jlog.warning("interpolation_failed", error=why, fallback=f"{target.name} at {fps} fps")
        entry.update(outcome="failed", error=why[:500], seconds=round(time.monotonic() - t0, 3),
                     output_frames=len(frames))
        return entry, False
    entry.update(
        outcome="succeeded", error=None, seconds=round(result.seconds, 3), peak_vram_bytes=result.peak_vram_bytes,
        output_frames=result.output_frames, exact=result.exact, device=device,
    )
    notes.extend(result.notes)  # a rate that is not a whole multiple says so there, once
    jlog.info("interpolated", mode=mode, output_fps=output_fps, output_frames=result.output_frames,
              seconds=round(result.seconds, 2))
    return entry, True
