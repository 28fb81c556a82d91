"""Frames to mp4 and back: exact frame count, size, rate and format, and no debris on failure."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from i2v_daemon.errors import TransientError
from i2v_daemon.work import video
from i2v_daemon.work.video import probe_mp4, write_mp4


def _frames(count: int, height: int, width: int) -> np.ndarray:
    """Random uint8 RGB frames: hard to compress, so an encoder cannot cheat by merging them."""
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def _fake_ffmpeg(tmp_path: Path, body: str) -> str:
    """A stand-in ffmpeg that writes a partial output file, then runs `body`."""
    script = tmp_path / "fake-ffmpeg"
    script.write_text(f'#!/bin/sh\nfor last; do :; done\nprintf partial > "$last"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.mark.parametrize(("count", "height", "width", "fps"), [(8, 96, 64, 8), (25, 64, 128, 12), (1, 64, 64, 8)])
def test_the_mp4_holds_exactly_the_frames_at_the_size_and_rate_given(
    tmp_path: Path, count: int, height: int, width: int, fps: int
) -> None:
    target = tmp_path / "clip.mp4"
    write_mp4(_frames(count, height, width), target, fps)
    assert probe_mp4(target) == {
        "width": width,
        "height": height,
        "num_frames": count,
        "fps": fps,
        "codec": "h264",
        "pix_fmt": "yuv420p",
    }


def test_only_the_finished_file_is_left_in_the_folder(tmp_path: Path) -> None:
    write_mp4(_frames(4, 64, 64), tmp_path / "clip.mp4", 8)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_odd_sizes_lose_their_last_row_and_column(tmp_path: Path) -> None:
    write_mp4(_frames(3, 65, 97), tmp_path / "clip.mp4", 8)
    probe = probe_mp4(tmp_path / "clip.mp4")
    assert (probe["width"], probe["height"], probe["num_frames"]) == (96, 64, 3)


def test_frames_that_are_not_uint8_rgb_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(np.zeros((2, 64, 64, 3), dtype=np.float32), tmp_path / "clip.mp4", 8)


def test_a_failing_encoder_raises_a_transient_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fake = _fake_ffmpeg(tmp_path, 'echo "No space left on device" >&2; exit 1')
    monkeypatch.setattr(video, "_ffmpeg", lambda: fake)
    with pytest.raises(TransientError, match="No space left on device"):
        write_mp4(_frames(4, 64, 64), out / "clip.mp4", 8)
    assert list(out.iterdir()) == []


def test_a_killed_encoder_raises_a_transient_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fake = _fake_ffmpeg(tmp_path, "kill -9 $$")
    monkeypatch.setattr(video, "_ffmpeg", lambda: fake)
    with pytest.raises(TransientError, match="killed by signal 9"):
        write_mp4(_frames(4, 64, 64), out / "clip.mp4", 8)
    assert list(out.iterdir()) == []


def test_probing_a_file_that_is_not_a_video_is_a_transient_error(tmp_path: Path) -> None:
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(TransientError, match=r"clip\.mp4"):
        probe_mp4(broken)
