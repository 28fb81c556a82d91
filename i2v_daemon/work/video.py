"""Frames to an H.264 mp4 (written under a temp name, then renamed), and reading back what was written.

Uses the ffmpeg binary that imageio-ffmpeg ships, so no system ffmpeg is needed; no torch here.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

from i2v_daemon.errors import TransientError
from i2v_daemon.files import fsync_dir

#: x264 constant quality: 18 is visually near-lossless; files stay small at these lengths.
CRF = 18
#: Seconds allowed for encoding: generous, x264 encodes these sizes far faster than 1 frame a second.
TIMEOUT_BASE_S = 120.0
TIMEOUT_PER_FRAME_S = 1.0

_VIDEO_LINE = re.compile(r"^\s*Stream #\d+:\d+.*: Video: .*$", re.MULTILINE)
_CODEC_PIX = re.compile(r"Video: (?P<codec>\w+)[^,]*, (?P<pix_fmt>\w+)")
_SIZE = re.compile(r", (?P<w>\d+)x(?P<h>\d+)\b")
_FPS = re.compile(r", (?P<fps>[\d.]+) (?:fps|tbr)\b")
_FRAMES = re.compile(r"frame=\s*(?P<n>\d+)")


def write_mp4(frames: np.ndarray, path: Path, fps: int, recipe: dict[str, Any] | None = None) -> None:
    """Write uint8 frames (F, H, W, 3) as H.264/yuv420p at `fps`, exactly F frames, atomically at `path`.

    With a `recipe`, the file carries it as XMP, as an SEI of the first frame and as its comment and
    description tags (`recipe.py`), all written here, before the file gets its name.
    Odd widths or heights lose their last column or row (yuv420p needs even sizes); the
    models produce multiples of 16, so that never happens in practice.
    """
    frames = _even_sized(_check_frames(frames))
    path = Path(path)
    # A temporary name that does not grow with the file's own: a 251-byte name must still work.
    temp = path.with_name(f".encode-{os.getpid()}.mp4.part")
    try:
        with recipe_args(recipe, path.parent) as (inputs, outputs):
            _encode(frames, temp, fps, inputs, outputs)
        if recipe is not None:
            append_xmp(temp, recipe)
        _fsync_file(temp)
        os.replace(temp, path)
        fsync_dir(path.parent)
    except OSError as err:  # disk full or gone while syncing or renaming: the failure policy decides
        raise TransientError(f"could not finish writing {path}: {err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def mp4_info(path: Path) -> dict[str, Any]:
    """What an mp4 written by us holds, read from its container (no decode): width, height, num_frames, fps,
    codec, pix_fmt. Raises TransientError when the file is not a readable mp4 with one video track."""
    from i2v_daemon.work.mp4 import read_video_track

    try:
        return read_video_track(path)
    except (OSError, ValueError) as err:
        raise TransientError(f"{path} is not a readable mp4: {err}") from err


def probe_mp4(path: Path) -> dict[str, Any]:
    """What a video file holds, by decoding all of it: width, height, num_frames, fps, codec, pix_fmt."""
    # Decoding every frame (to the null muxer) both counts them and proves the file is readable.
    cmd = [_ffmpeg(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"]
    result = _run(cmd, timeout=TIMEOUT_BASE_S, what=f"reading {path}")
    log = result.stderr.decode(errors="replace")
    # The first video stream line is the input's ("Stream #0:0…: Video: h264 (High) …, yuv420p
    # (progressive), 64x96, 311 kb/s, 8 fps, …"); the output's null stream is listed later.
    line = _VIDEO_LINE.search(log)
    counts = _FRAMES.findall(log)
    codec_pix = _CODEC_PIX.search(line[0]) if line else None
    size = _SIZE.search(line[0]) if line else None
    if codec_pix is None or size is None or not counts:
        raise TransientError(f"ffmpeg found no readable video stream in {path}: {_tail(log)}")
    fps = _FPS.search(line[0]) if line else None
    return {
        "width": int(size["w"]),
        "height": int(size["h"]),
        "num_frames": int(counts[-1]),
        "fps": float(fps["fps"]) if fps else None,
        "codec": codec_pix["codec"],
        "pix_fmt": codec_pix["pix_fmt"],
    }


@contextlib.contextmanager
def recipe_args(recipe: dict[str, Any] | None, folder: Path) -> Iterator[tuple[list[str], list[str]]]:
    """ffmpeg's extra (input, output) arguments that embed `recipe` as an SEI and as comment tags.

    The values travel in small files beside the video (`-/bsf:v FILE` reads an option from a file),
    so a 20,000-character prompt never meets the limit of one command-line argument.
    """
    if recipe is None:
        yield [], []
        return
    from i2v_daemon.work import recipe as recipes

    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    meta, bsf = folder / f".recipe-{tag}.ffmeta", folder / f".recipe-{tag}.bsf"
    try:
        meta.write_text(recipes.ffmetadata(recipe), encoding="utf-8")
        bsf.write_text(recipes.sei_option(recipe), encoding="utf-8")
        yield (["-f", "ffmetadata", "-i", str(meta)],
               ["-map", "0:v", "-map_metadata", "1", "-/bsf:v", str(bsf)])
    finally:
        for made in (meta, bsf):
            with contextlib.suppress(FileNotFoundError):
                made.unlink()


def append_xmp(path: Path, recipe: dict[str, Any]) -> None:
    """Append the recipe's XMP `uuid` box at the end of the file: no offset inside the file moves."""
    from i2v_daemon.work import recipe as recipes

    with open(path, "ab") as fh:
        fh.write(recipes.xmp_box(recipe))


def _encode(
    frames: np.ndarray, target: Path, fps: int, inputs: Sequence[str] = (), outputs: Sequence[str] = (),
) -> None:
    """Pipe raw RGB frames through ffmpeg into `target`; raise TransientError when ffmpeg fails."""
    num_frames, height, width, _ = frames.shape
    # The input rate equals the output rate, so ffmpeg neither duplicates nor drops a frame.
    cmd = [
        _ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
        *inputs, *outputs,
        "-an", "-c:v", "libx264", "-preset", "medium", "-crf", str(CRF), "-pix_fmt", "yuv420p",
        "-movflags", "+faststart",
        "-f", "mp4",  # the temp name's .part suffix says nothing about the format
        str(target),
    ]  # fmt: skip
    timeout = TIMEOUT_BASE_S + TIMEOUT_PER_FRAME_S * num_frames
    _run(cmd, timeout=timeout, what=f"encoding {num_frames} frames to {target}", stdin=frames)


def _run(cmd: list[str], timeout: float, what: str, stdin: np.ndarray | None = None) -> Any:
    """Run ffmpeg to completion, turning any failure into a TransientError that quotes it."""
    # imageio_ffmpeg.write_frames would let ffmpeg's stderr go to ours and never checks its exit
    # status, so a failure at the end (disk full while +faststart rewrites) would pass unseen.
    data = memoryview(stdin).cast("B") if stdin is not None else None  # type: ignore[arg-type]  # no copy
    try:
        result = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise TransientError(f"ffmpeg took longer than {timeout:.0f} s {what}; it was stopped.") from err
    except OSError as err:  # the binary is missing or not executable, or the pipe broke
        raise TransientError(f"ffmpeg could not run for {what}: {err}") from err
    if result.returncode < 0:
        raise TransientError(f"ffmpeg was killed by signal {-result.returncode} while {what}.")
    if result.returncode != 0:
        log = result.stderr.decode(errors="replace")
        raise TransientError(f"ffmpeg failed (exit {result.returncode}) while {what}: {_tail(log)}")
    return result


def _check_frames(frames: np.ndarray) -> np.ndarray:
    """Frames as a C-contiguous uint8 (F, H, W, 3) array, or a ValueError saying what is wrong."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be a non-empty uint8 array (F, H, W, 3), got {frames.dtype} {frames.shape}")
    return np.ascontiguousarray(frames)


def _even_sized(frames: np.ndarray) -> np.ndarray:
    """Drop a last odd row or column, which yuv420p cannot hold."""
    _, height, width, _ = frames.shape
    if height % 2 == 0 and width % 2 == 0:
        return frames
    return np.ascontiguousarray(frames[:, : height - height % 2, : width - width % 2])


def _ffmpeg() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg (or $IMAGEIO_FFMPEG_EXE)."""
    return str(imageio_ffmpeg.get_ffmpeg_exe())


def _fsync_file(path: Path) -> None:
    """Make the file's bytes durable before the rename makes it visible."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tail(log: str, lines: int = 5) -> str:
    """The last few non-empty lines of an ffmpeg log, joined on one line."""
    kept = [line.strip() for line in log.splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "no message"
