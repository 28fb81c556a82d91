"""Interpolation to the delivered rate: exact counts and positions, what each mode makes, and failing cleanly."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from i2v_daemon.errors import InputError, JobCanceled
from i2v_daemon.params import check_interpolation
from i2v_daemon.work import interpolate, video
from i2v_daemon.work.interpolate import (
    InterpolationError,
    delivered_times,
    interpolate_to_mp4,
    multiple,
)
from i2v_daemon.work.video import probe_mp4

#: H.264 at CRF 18 costs about 1.7 levels (of 255) of mean difference on these frames; the
#: generated video written by video.write_mp4 shows the same. A delivered frame i*k must be
#: within this of generated frame i, and nearer to it than any other delivered frame.
TOLERANCE = 3.0
SQUARE = 16 * 12  # pixels of the moving square


def moving_square(count: int = 8, height: int = 48, width: int = 64, step: int = 6) -> np.ndarray:
    """Frames with visible motion: a yellow square crossing a smooth gradient, `step` pixels a frame."""
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    frames[..., 0] = 60
    frames[..., 1] = np.arange(width)[None, :] * 150 // width
    frames[..., 2] = np.arange(height)[:, None] * 150 // height
    for i in range(count):
        frames[i, 16:32, 4 + i * step : 16 + i * step] = (250, 250, 20)
    return frames


def decode(path: Path) -> np.ndarray:
    """Every frame of an mp4 as uint8 RGB, decoded by the same ffmpeg."""
    info = probe_mp4(path)
    cmd = [video._ffmpeg(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, info["height"], info["width"], 3)


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def square_x(frame: np.ndarray) -> tuple[int, float]:
    """How many pixels are clearly the yellow square, and the mean column of them."""
    mask = (frame[..., 0] > 170) & (frame[..., 1] > 170) & (frame[..., 2] < 110)
    return int(mask.sum()), float(np.nonzero(mask)[1].mean()) if mask.any() else -1.0


@pytest.fixture(scope="module")
def rife_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from i2v_daemon.models.rife import save_random_rife

    return save_random_rife(tmp_path_factory.mktemp("rife") / "ifnet.safetensors")


@pytest.mark.parametrize("mode", ["motion", "blend", "rife"])
@pytest.mark.parametrize("k", [2, 3])
def test_an_integer_multiple_delivers_every_generated_frame_at_i_times_k(
    tmp_path: Path, rife_weights: Path, mode: str, k: int
) -> None:
    frames = moving_square()
    target = tmp_path / "clip.mp4"
    result = interpolate_to_mp4(frames, fps=8, output_fps=8 * k, mode=mode, path=target, rife_model=rife_weights)
    expected = (len(frames) - 1) * k + 1
    assert (result.mode, result.output_fps, result.output_frames, result.exact) == (mode, 8 * k, expected, True)
    assert result.peak_vram_bytes is None  # the CPU
    info = probe_mp4(target)
    assert (info["num_frames"], info["fps"], info["codec"], info["pix_fmt"]) == (expected, 8 * k, "h264", "yuv420p")
    delivered = decode(target)
    for i, generated in enumerate(frames):
        diffs = [mean_diff(frame, generated) for frame in delivered]
        assert diffs[i * k] <= TOLERANCE, (i, diffs[i * k])
        assert int(np.argmin(diffs)) == i * k
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


@pytest.mark.parametrize("k", [2, 3])
def test_blend_makes_each_in_between_frame_the_weighted_mix_of_its_neighbours(tmp_path: Path, k: int) -> None:
    frames = moving_square().astype(np.float64)
    interpolate_to_mp4(frames.astype(np.uint8), fps=8, output_fps=8 * k, mode="blend", path=tmp_path / "b.mp4")
    delivered = decode(tmp_path / "b.mp4")
    for i in range(len(frames) - 1):
        for j in range(1, k):
            mix = ((k - j) * frames[i] + j * frames[i + 1]) / k
            assert mean_diff(delivered[i * k + j], mix) <= TOLERANCE, (i, j)


@pytest.mark.parametrize("k", [2, 3])
def test_motion_moves_the_square_through_the_in_between_frames_instead_of_fading_it(tmp_path: Path, k: int) -> None:
    interpolate_to_mp4(moving_square(), fps=8, output_fps=8 * k, mode="motion", path=tmp_path / "m.mp4")
    seen = [square_x(frame) for frame in decode(tmp_path / "m.mp4")]
    xs = [x for _, x in seen]
    assert all(a < b for a, b in itertools.pairwise(xs)), xs  # always on its way, never back or still
    # Mostly whole in every frame, where a cross-fade would show two half-strength squares.
    assert min(count for count, _ in seen) >= 0.6 * SQUARE, seen


@pytest.mark.parametrize("mode", ["motion", "blend", "rife"])
def test_a_ratio_that_is_not_a_multiple_reports_the_frames_it_made(
    tmp_path: Path, rife_weights: Path, mode: str
) -> None:
    target = tmp_path / "clip.mp4"
    result = interpolate_to_mp4(moving_square(), fps=8, output_fps=20, mode=mode, path=target, rife_model=rife_weights)
    assert result.exact is False
    assert result.output_frames == probe_mp4(target)["num_frames"] == 18  # every 1/20 s through 7/8 s
    assert any("is not a whole multiple of 8 fps: 18 frames made from 8" in note for note in result.notes)


def test_progress_reaches_every_delivered_frame_and_never_goes_back(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    interpolate_to_mp4(moving_square(), fps=8, output_fps=24, mode="motion", path=tmp_path / "c.mp4",
                       on_progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (22, 22)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert {total for _, total in calls} == {22}


@pytest.mark.parametrize("length", [240, 255])
def test_a_file_name_near_the_255_byte_limit_is_written_without_a_longer_temp_name(tmp_path: Path, length: int) -> None:
    name = "é" * ((length - 4) // 2) + "x" * ((length - 4) % 2) + ".mp4"  # two bytes a letter in UTF-8
    assert len(name.encode()) == length
    result = interpolate_to_mp4(moving_square(), fps=8, output_fps=16, mode="blend", path=tmp_path / name)
    assert result.output_frames == 15
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_odd_sides_lose_their_last_row_and_column_as_the_generated_video_does(tmp_path: Path) -> None:
    frames = np.ascontiguousarray(np.pad(moving_square(), ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge"))
    result = interpolate_to_mp4(frames, fps=8, output_fps=16, mode="motion", path=tmp_path / "odd.mp4")
    info = probe_mp4(tmp_path / "odd.mp4")
    assert (info["width"], info["height"], info["num_frames"]) == (64, 48, 15)
    assert any("64x48" in note for note in result.notes)


# ---- failing ------------------------------------------------------------------------------------


def test_rife_without_usable_weights_fails_naming_rife_model_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(InterpolationError, match="rife_model") as err:
        interpolate_to_mp4(moving_square(), fps=8, output_fps=24, mode="rife", path=tmp_path / "r.mp4",
                           rife_model=tmp_path / "missing.safetensors")
    assert err.value.as_dict()["type"] == "interpolation"
    assert list(tmp_path.iterdir()) == []


def _ffmpeg_failing_to_encode(tmp_path: Path, body: str) -> str:
    """The real ffmpeg for the filter (output to a pipe); for the encoder (output to a file), `body`."""
    script = tmp_path / "bin" / "ffmpeg"
    script.parent.mkdir()
    real = video._ffmpeg()
    script.write_text(f'#!/bin/sh\nfor last; do :; done\ncase "$last" in pipe:*) exec "{real}" "$@";; esac\n{body}\n')
    script.chmod(0o755)
    return str(script)


def test_an_encoder_failure_is_an_interpolation_error_quoting_it_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Part of an output file, a message, exit 1: what a full disk does to ffmpeg.
    body = 'printf partial > "$last"\necho "No space left on device" >&2\nexit 1'
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", _ffmpeg_failing_to_encode(tmp_path, body))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InterpolationError, match="No space left on device"):
        interpolate_to_mp4(moving_square(), fps=8, output_fps=24, mode="motion", path=out / "clip.mp4")
    assert list(out.iterdir()) == []


def test_an_ffmpeg_that_hangs_is_stopped_at_its_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hang = 'printf partial > "$last"\nexec sleep 60'  # never reads a frame, never exits
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", _ffmpeg_failing_to_encode(tmp_path, hang))
    monkeypatch.setattr(interpolate, "TIMEOUT_BASE_S", 0.5)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InterpolationError, match="took longer than"):
        interpolate_to_mp4(moving_square(), fps=8, output_fps=16, mode="blend", path=out / "clip.mp4")
    assert list(out.iterdir()) == []


def test_a_filter_that_puts_frames_at_the_wrong_time_is_caught_not_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real ffmpeg, but its filter graph starts one generated frame late: every frame i*k is off.
    script = tmp_path / "ffmpeg"
    script.write_text(
        f"#!{sys.executable}\nimport os, sys\nargs = [a.replace('tpad=', 'tpad=start=1:start_mode=clone:') "
        f"if a.startswith('format=') else a for a in sys.argv[1:]]\nos.execv({video._ffmpeg()!r}, ['ffmpeg', *args])\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(script))
    with pytest.raises(InterpolationError, match="another moment where generated frame 1 belongs"):
        interpolate_to_mp4(moving_square(), fps=8, output_fps=16, mode="blend", path=tmp_path / "late.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg"]


def test_a_cancel_raised_from_progress_passes_through_unchanged_and_leaves_nothing(tmp_path: Path) -> None:
    def cancel(done: int, total: int) -> None:
        raise JobCanceled("canceled while interpolating")

    with pytest.raises(JobCanceled):
        interpolate_to_mp4(moving_square(), fps=8, output_fps=24, mode="blend", path=tmp_path / "c.mp4",
                           on_progress=cancel)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["motion", "blend"])
def test_a_single_frame_is_delivered_as_one_frame_at_the_delivered_rate(tmp_path: Path, mode: str) -> None:
    # (1 − 1)·k + 1 = 1: exact, with nothing to interpolate.
    done = interpolate_to_mp4(moving_square(count=1), fps=8, output_fps=24, mode=mode, path=tmp_path / "c.mp4")
    assert (done.output_frames, done.exact) == (1, True)
    meta = probe_mp4(tmp_path / "c.mp4")
    assert (meta["num_frames"], meta["fps"]) == (1, 24)


def test_frames_that_are_not_uint8_video_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InterpolationError, match="need uint8 frames"):
        interpolate_to_mp4(moving_square().astype(np.float32), fps=8, output_fps=24, mode="motion",
                           path=tmp_path / "c.mp4")


# ---- requests -----------------------------------------------------------------------------------


def test_multiples_and_delivered_times() -> None:
    assert (multiple(8, 24), multiple(8, 8), multiple(8, 20)) == (3, 1, None)
    assert delivered_times(3, 8, 16) == [0, 0.5, 1, 1.5, 2]
    assert len(delivered_times(16, 8, 24)) == 46


@pytest.mark.parametrize(
    ("fps", "output_fps", "mode", "rife_model", "words"),
    [
        (8, 6, None, None, ["output_fps = 6", "fps = 8"]),
        (8, 8, "blend", None, ["interpolation = 'blend'", "output_fps"]),
        (8, None, "motion", None, ["interpolation = 'motion'", "output_fps"]),
        (8, 24, "rife", None, ["interpolation = 'rife'", "rife_model"]),
        (8, 24, "optical", None, ["interpolation = 'optical'", "motion, blend, rife"]),
        (8, 121, None, None, ["output_fps = 121", "1 to 120"]),
    ],
)
def test_requests_that_cannot_be_delivered_are_input_errors_naming_the_keys(
    fps: int, output_fps: int | None, mode: str | None, rife_model: Path | None, words: list[str]
) -> None:
    with pytest.raises(InputError) as err:
        check_interpolation(fps, output_fps, mode, rife_model)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    ("fps", "output_fps", "mode", "rife_model"),
    [(8, None, None, None), (8, 8, None, None), (8, 24, None, None), (8, 20, "blend", None),
     (8, 24, "rife", Path("/weights/ifnet.safetensors"))],
)
def test_requests_that_can_be_delivered_pass(
    fps: int, output_fps: int | None, mode: str | None, rife_model: Path | None
) -> None:
    check_interpolation(fps, output_fps, mode, rife_model)


@pytest.mark.parametrize("stop", ["database_gone", "canceled"])
def test_a_stop_that_comes_while_interpolating_is_not_taken_for_an_interpolation_failure(
    tmp_path: Path, stop: str,
) -> None:
    from types import SimpleNamespace

    from i2v_daemon.errors import DatabaseGone
    from i2v_daemon.logs import JobLog
    from i2v_daemon.work import postprocess

    error = DatabaseGone("the job database was deleted") if stop == "database_gone" else JobCanceled("stop")

    def alive(phase: str) -> None:
        raise error

    generated = tmp_path / "clip.generated.mp4"
    video.write_mp4(moving_square(), generated, 8)
    notes: list[str] = []
    with pytest.raises(type(error)):
        postprocess._interpolate(  # the progress write inside meets the stop: it reaches the worker as it is
            moving_square(), generated, tmp_path / "clip.mp4", 8, 24, "blend", SimpleNamespace(rife_model=None),
            "cpu", JobLog(tmp_path / "job.log", 1, "clip"), notes, alive,
        )
    assert notes == [] and not (tmp_path / "clip.mp4").exists()  # no fallback video, no "interpolation failed"
