"""Frame interpolation to the delivered frame rate (INTERFACE.md §5): generated frames in, one mp4 out.

`motion` (ffmpeg's minterpolate) and `blend` (ffmpeg's framerate) need only the ffmpeg that
imageio-ffmpeg ships; `rife` runs the learned IFNet of models/rife.py, imported (with torch) only
on that path. For an integer multiple k = output_fps / fps the delivered video has exactly
(F-1)*k+1 frames and generated frame i is delivered frame i*k: the filters' own frames at those
places are checked against the generated ones and then replaced by them, so they differ only by
the final encoding.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import numpy as np

from i2v_daemon.errors import I2VError
from i2v_daemon.params import INTERPOLATIONS as MODES
from i2v_daemon.work.video import CRF, _ffmpeg, _tail, append_xmp, probe_mp4, recipe_args

#: Seconds allowed per delivered frame of 512x512 (scaled by size) for ffmpeg, on top of a fixed
#: allowance: generous, since minterpolate and x264 make about 35 such frames a second on two cores.
#: RIFE itself has no timeout (torch cannot be interrupted); its progress feeds the caller's watchdog.
TIMEOUT_BASE_S = 120.0
TIMEOUT_PER_FRAME_S = {"motion": 2.0, "blend": 1.0, "encode": 1.0}
#: A filter's frame at i*k must match generated frame i to this mean difference (0..255 levels):
#: colour conversion costs about 0.5; a frame from the wrong time differs by far more where anything moves.
ALIGN_TOLERANCE = 4.0
PROGRESS_EVERY_S = 0.5


class InterpolationError(I2VError):
    """Interpolation failed; the job keeps its generated video as the delivered one, and says why."""

    kind = "interpolation"


@dataclass(frozen=True)
class Interpolated:
    """What was delivered: for the manifest's `postprocess` entry and `effective`."""

    mode: str
    output_fps: int
    output_frames: int  # counted by decoding the written file
    exact: bool  # the integer-multiple guarantee held: (F-1)*k+1 frames, generated frame i at i*k
    seconds: float
    peak_vram_bytes: int | None  # RIFE on CUDA only
    notes: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "notes": list(self.notes)}


def multiple(fps: int, output_fps: int) -> int | None:
    """k when output_fps is an integer multiple k of fps, else None."""
    return output_fps // fps if fps > 0 and output_fps % fps == 0 else None


def delivered_times(num_frames: int, fps: int, output_fps: int) -> list[Fraction]:
    """Where each delivered frame falls, in generated frames (0..F-1): every 1/output_fps s up to the last one."""
    step = Fraction(fps, output_fps)
    return [n * step for n in range(int((num_frames - 1) / step) + 1)]


def interpolate_to_mp4(
    frames: np.ndarray, *, fps: int, output_fps: int, mode: str, path: Path, rife_model: Path | None = None,
    device: str = "cpu", on_progress: Callable[[int, int], None] | None = None, recipe: dict[str, Any] | None = None,
) -> Interpolated:
    """Write `frames` (F, H, W, 3) uint8 at `fps` as an H.264 mp4 at `output_fps` at `path`, atomically.

    Raises InterpolationError (nothing left behind) when anything fails; whatever `on_progress`
    raises (a cancel) passes through unchanged.
    """
    started = time.monotonic()
    if mode not in MODES or fps < 1 or output_fps <= fps:
        raise InterpolationError(f"cannot interpolate {fps} fps to {output_fps} fps with {mode!r}")
    frames, notes = _prepared(frames)
    k = multiple(fps, output_fps)
    times = delivered_times(len(frames), fps, output_fps)
    path = Path(path)
    # A short temp name of our own: "<long name>.part" could pass the 255-byte limit of a file name.
    temp = path.with_name(f".interp-{os.getpid()}-{secrets.token_hex(4)}.mp4.part")
    report = _Reporter(on_progress, len(times))
    height, width = frames.shape[1:3]
    pixels = len(times) * height * width / 512**2  # delivered frames, in 512x512 units
    peak: int | None = None
    try:
        with recipe_args(recipe, path.parent) as extra:
            if len(frames) == 1:  # nothing between frames: the one frame, at the delivered rate
                _encode(iter(frames), temp, output_fps, TIMEOUT_BASE_S, None, extra)
            elif mode == "rife":
                from i2v_daemon.models.rife import run_rife  # torch, only for this mode

                made, peak = run_rife(frames, times, rife_model, device, on_progress=lambda done, _: report(done))
                _encode(iter(made), temp, output_fps, TIMEOUT_BASE_S + TIMEOUT_PER_FRAME_S["encode"] * pixels, None,
                        extra)
            else:
                limit = TIMEOUT_BASE_S + TIMEOUT_PER_FRAME_S[mode] * pixels
                _encode(_filtered(frames, fps, output_fps, mode, len(times), k, limit), temp, output_fps, limit,
                        report, extra)
        report(len(times), final=True)
        counted = probe_mp4(temp)["num_frames"]
        if counted != len(times):
            raise InterpolationError(f"the encoder wrote {counted} frames instead of {len(times)}")
        if recipe is not None:
            append_xmp(temp, recipe)
        _fsync(temp)
        os.replace(temp, path)
        _fsync(path.parent)
    except _CallerError as err:
        raise err.error from None
    except InterpolationError:
        raise
    except Exception as err:  # ffmpeg, torch, the disk: the job goes on with its generated video
        what = str(err) if isinstance(err, I2VError) else f"{type(err).__name__}: {err}"
        raise InterpolationError(f"{mode} interpolation failed: {what}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    if k is None:
        notes.append(f"{output_fps} fps is not a whole multiple of {fps} fps: {counted} frames made from "
                     f"{len(frames)}, not every generated one among them")
    seconds = round(time.monotonic() - started, 3)
    return Interpolated(mode, output_fps, counted, k is not None, seconds, peak, tuple(notes))


def _encode(
    produced: Iterator[np.ndarray], temp: Path, fps: int, timeout: float, report: _Reporter | None,
    extra: tuple[list[str], list[str]] = ([], []),
) -> None:
    """Encode every frame `produced` yields into `temp`; on any failure stop both sides and re-raise."""
    first = next(produced)
    encoder = _Encoder(temp, first.shape[1], first.shape[0], fps, timeout, extra)
    try:
        encoder.write(first)
        for n, frame in enumerate(produced, start=2):
            encoder.write(frame)
            if report is not None:
                report(n)
    except BaseException:
        encoder.close(check=False)
        close = getattr(produced, "close", None)
        if close is not None:  # stops the filter's ffmpeg now rather than when collected
            close()
        raise
    encoder.close()


def _prepared(frames: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Frames as contiguous uint8 with even sides (yuv420p needs them, as write_mp4 does), and what changed."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise InterpolationError(f"need uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        frames = frames[:, : height - height % 2, : width - width % 2]
        return np.ascontiguousarray(frames), [f"cropped to {width - width % 2}x{height - height % 2} (even sides)"]
    return np.ascontiguousarray(frames), []


class _CallerError(Exception):
    """Carries an exception raised by the caller's on_progress (a cancel) past the error translation."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Reporter:
    """Calls on_progress at most every PROGRESS_EVERY_S, and once at the end with (total, total)."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self.callback, self.total, self.last, self.ended = callback, total, -PROGRESS_EVERY_S, False

    def __call__(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.callback is None or self.ended or (not final and now - self.last < PROGRESS_EVERY_S):
            return
        self.last, self.ended = now, final
        try:
            self.callback(min(done, self.total), self.total)
        except BaseException as err:
            raise _CallerError(err) from err


class _Process:
    """An ffmpeg child with its log in a temp file (never a full pipe), killed if it overruns `timeout`."""

    def __init__(self, cmd: list[str], timeout: float, what: str, stdout: int | None = None) -> None:
        self.what, self.timeout, self.timed_out = what, timeout, False
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=stdout or subprocess.DEVNULL,
                                         stderr=self.log)
        except OSError as err:
            self.log.close()
            raise InterpolationError(f"ffmpeg could not run for {what}: {err}") from err
        self.timer = threading.Timer(timeout, self._overrun)
        self.timer.daemon = True
        self.timer.start()

    def _overrun(self) -> None:
        self.timed_out = True
        self.proc.kill()

    def close(self, check: bool = True) -> None:
        """Wait for the end (after closing stdin; killed first unless `check`); raise if it failed and `check`."""
        if self.log.closed:
            return
        if not check:  # first: a writer blocked on a full pipe would hold stdin's lock until ffmpeg ends
            self.proc.kill()
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        code = self.proc.wait()
        self.timer.cancel()
        self.log.seek(0)
        log = self.log.read()[-20000:].decode(errors="replace")
        self.log.close()
        if not check:
            return
        if self.timed_out:
            raise InterpolationError(f"ffmpeg took longer than {self.timeout:.0f} s {self.what}; it was stopped")
        if code != 0:
            raise InterpolationError(f"ffmpeg failed (exit {code}) while {self.what}: {_tail(log)}")


class _Encoder(_Process):
    """Raw RGB frames in, H.264/yuv420p mp4 out, as video.write_mp4 encodes them."""

    def __init__(self, target: Path, width: int, height: int, fps: int, timeout: float,
                 extra: tuple[list[str], list[str]] = ([], [])) -> None:
        cmd = [
            _ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
            *extra[0], *extra[1],
            "-an", "-c:v", "libx264", "-preset", "medium", "-crf", str(CRF), "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", "-f", "mp4", str(target),
        ]  # fmt: skip
        super().__init__(cmd, timeout, f"encoding {target.name}")

    def write(self, frame: np.ndarray) -> None:
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame).data.cast("B"))  # type: ignore[union-attr]
        except BrokenPipeError:  # the encoder died: close() raises with its own words
            self.close()
            raise InterpolationError(f"ffmpeg stopped reading while {self.what}") from None


def _filtered(
    frames: np.ndarray, fps: int, output_fps: int, mode: str, count: int, k: int | None, timeout: float
) -> Iterator[np.ndarray]:
    """The `count` frames ffmpeg's filter makes, generated frames put back at i*k (checked first)."""
    height, width = frames.shape[1:3]
    # The last frame is repeated once: minterpolate stops at the last input frame's time and would
    # drop the tail; both filters then run past it, so trim keeps exactly `count`.
    if mode == "motion":
        interp = f"minterpolate=fps={output_fps}:mi_mode=mci:scd=none"
    else:  # every frame a true blend: no copying near source frames, no scene-change detection
        interp = f"framerate=fps={output_fps}:interp_start=0:interp_end=255:scene=100"
    graph = f"format=yuv444p,tpad=stop_mode=clone:stop=1,{interp},trim=end_frame={count}"
    cmd = [
        _ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
        "-vf", graph, "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
    ]  # fmt: skip
    proc = _Process(cmd, timeout, f"interpolating ({mode})", stdout=subprocess.PIPE)
    feeder = threading.Thread(target=_feed, args=(proc, frames), name="interpolate-feed", daemon=True)
    feeder.start()
    size, made, ok = height * width * 3, 0, False
    try:
        while made < count:
            data = proc.proc.stdout.read(size)  # type: ignore[union-attr]
            if len(data) < size:
                break
            frame = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
            if k is not None and made % k == 0:
                frame = _checked(frame, frames[made // k], made // k, mode)
            made += 1
            yield frame
        ok = True
    finally:
        if not ok:  # stopped early (an error, or the consumer gave up): end ffmpeg before waiting on the feeder
            proc.close(check=False)
        feeder.join(timeout=5.0)
        proc.close(check=ok)
    if made < count:
        raise InterpolationError(f"ffmpeg's {mode} filter made {made} frames, {count} were needed")


def _feed(proc: _Process, frames: np.ndarray) -> None:
    """Write every frame to ffmpeg's stdin, then close it; a broken pipe means ffmpeg ended (close() says why)."""
    with contextlib.suppress(BrokenPipeError, OSError, ValueError):
        for frame in frames:
            proc.proc.stdin.write(frame.data.cast("B"))  # type: ignore[union-attr]
        proc.proc.stdin.close()  # type: ignore[union-attr]


def _checked(made: np.ndarray, generated: np.ndarray, i: int, mode: str) -> np.ndarray:
    """The generated frame, once the filter's frame at its place is shown to be the same moment."""
    diff = float(np.abs(made.astype(np.int16) - generated.astype(np.int16)).mean())
    if diff > ALIGN_TOLERANCE:
        raise InterpolationError(
            f"ffmpeg's {mode} filter put another moment where generated frame {i} belongs "
            f"(mean difference {diff:.1f} levels); this ffmpeg build cannot keep the frames exact"
        )
    return generated


def _fsync(path: Path) -> None:
    """Make a file's bytes, or a rename in a folder, durable."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
