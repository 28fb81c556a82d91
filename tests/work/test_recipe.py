"""The recipe inside the mp4: written by the encoder as XMP, SEI and tags, read back after remuxes that drop some."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from i2v_daemon.params import check_values
from i2v_daemon.work import recipe
from i2v_daemon.work.video import mp4_info, probe_mp4, write_mp4

RECIPE = {
    "i2v_recipe": 1, "generator": "i2v-daemon 0.1.0", "name": "cat",
    "prompt": 'a cat says "hi" & <waves>; #1 = best\\ok\nnext line', "negative_prompt": "blurry",
    "seed": 42, "width": 64, "height": 96, "num_frames": 4, "steps": 2, "guidance_scale": 2.0, "fps": 4,
    "output_fps": 4, "scheduler": "ddim", "model": "default", "model_id": "/models/tiny", "family": "i2vgen-xl",
    "input": {"name": "cat.png", "sha256": "ab" * 32},
}


def _frames(count: int = 4, height: int = 96, width: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def _ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture()
def video(tmp_path: Path) -> Path:
    path = tmp_path / "cat.mp4"
    write_mp4(_frames(), path, 4, recipe=RECIPE)
    return path


def test_the_encoder_writes_the_recipe_as_xmp_and_reads_it_back_unchanged(video: Path) -> None:
    assert recipe.read(video) == (RECIPE, "xmp")
    assert b"trainedAlgorithmicMedia" in video.read_bytes()
    assert [p.name for p in video.parent.iterdir()] == ["cat.mp4"]  # no temp files left beside it


def test_a_video_with_a_recipe_is_still_exactly_the_frames_asked_for(video: Path) -> None:
    assert probe_mp4(video)["num_frames"] == 4
    assert mp4_info(video)["num_frames"] == 4


def test_a_remux_that_drops_every_tag_and_box_still_gives_the_recipe_from_the_sei(video: Path, tmp_path: Path) -> None:
    remuxed = tmp_path / "remuxed.mp4"
    _ffmpeg("-i", str(video), "-map_metadata", "-1", "-c", "copy", str(remuxed))
    assert b"i2v-recipe" not in remuxed.read_bytes()  # the comment tag is gone …
    assert recipe.XMP_UUID not in remuxed.read_bytes()  # … and so is the XMP box
    assert recipe.read(remuxed) == (RECIPE, "sei")


def test_a_remux_that_keeps_tags_gives_the_recipe_from_the_comment(video: Path, tmp_path: Path) -> None:
    remuxed = tmp_path / "remuxed.mp4"
    _ffmpeg("-i", str(video), "-c", "copy", "-bsf:v", "filter_units=remove_types=6", str(remuxed))  # no SEI
    assert recipe.read(remuxed) == (RECIPE, "comment")


def test_a_re_encode_loses_the_recipe_and_read_says_none(video: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.mp4"
    _ffmpeg("-i", str(video), "-map_metadata", "-1", "-c:v", "libx264", str(again))
    assert recipe.read(again) == (None, None)


def test_a_long_prompt_in_any_script_survives_every_copy(tmp_path: Path) -> None:
    made = {**RECIPE, "prompt": "日本語のプロンプト🐈 " * 1500}
    path = tmp_path / "long.mp4"
    write_mp4(_frames(), path, 4, recipe=made)
    assert recipe.read(path) == (made, "xmp")
    remuxed = tmp_path / "remuxed.mp4"
    _ffmpeg("-i", str(path), "-map_metadata", "-1", "-c", "copy", str(remuxed))
    assert recipe.read(remuxed) == (made, "sei")


def test_a_file_without_a_recipe_has_none(tmp_path: Path) -> None:
    plain = tmp_path / "plain.mp4"
    write_mp4(_frames(), plain, 4)
    assert recipe.read(plain) == (None, None)


def test_a_recipe_from_a_newer_release_is_not_taken_for_ours() -> None:
    assert recipe.parse('{"i2v_recipe": 99, "prompt": "x"}') is None
    assert recipe.parse("not json") is None


def test_the_sidecar_made_from_a_recipe_is_a_valid_sidecar_with_every_value_explicit() -> None:
    side = recipe.as_sidecar({**RECIPE, "lora": "style", "lora_scale": 0.5, "model": "svd"})
    assert check_values(side) == side
    assert side["width"] == 64 and side["height"] == 96 and side["seed"] == 42 and side["output_fps"] == 4
    assert "interpolation" not in side and side["scheduler"] == "ddim" and side["model"] == "svd"
    assert "resolution" not in side and "preset" not in side


def test_an_interpolated_recipe_asks_for_the_same_interpolation() -> None:
    side = recipe.as_sidecar({**RECIPE, "output_fps": 12, "interpolation": "blend"})
    assert (side["fps"], side["output_fps"], side["interpolation"]) == (4, 12, "blend")
