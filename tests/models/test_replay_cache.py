"""Replayed activation peaks kept on disk (models/replay_cache.py): read back for the same question only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from i2v_daemon.models import planner, replay_cache


def costs(folder: Path, size: int = 64) -> tuple[int, int]:
    got = planner._costs.__wrapped__(str(folder), "float32", size, size, 4)  # past the in-process cache
    return got.denoise, got.decode


@pytest.fixture
def kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "replays"
    monkeypatch.setenv("I2V_REPLAY_CACHE", str(where))
    return where


def test_a_replay_is_kept_and_read_back_for_the_same_question_only(kept: Path, tiny_i2vgen_dir: Path,
                                                                   tmp_path: Path):
    first = costs(tiny_i2vgen_dir)
    [file] = kept.glob("*.json")
    assert json.loads(file.read_text()) == {"denoise": first[0], "decode": first[1]} and min(first) > 0
    file.write_text(json.dumps({"denoise": 123, "decode": 456}))  # what is kept is what is answered
    assert costs(tiny_i2vgen_dir) == (123, 456)
    assert costs(tiny_i2vgen_dir, size=96) != (123, 456) and len(list(kept.glob("*.json"))) == 2  # another size
    copy = tmp_path / "copy"
    shutil.copytree(tiny_i2vgen_dir, copy)
    assert costs(copy) == (123, 456)  # the same configs in another folder: the same question
    unet = copy / "unet" / "config.json"
    config = json.loads(unet.read_text())
    config["block_out_channels"] = [c * 2 for c in config["block_out_channels"]]
    unet.write_text(json.dumps(config))
    changed = costs(copy)
    assert changed != (123, 456) and changed[0] > first[0]  # a changed config is a new question, replayed


def test_a_damaged_entry_is_replayed_and_a_folder_that_cannot_be_written_costs_only_the_speed(
    kept: Path, tiny_i2vgen_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
):
    first = costs(tiny_i2vgen_dir)
    [file] = kept.glob("*.json")
    for damage in ("{not json", json.dumps({"denoise": -1, "decode": 5}), json.dumps([1, 2])):
        file.write_text(damage)
        assert costs(tiny_i2vgen_dir) == first
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("I2V_REPLAY_CACHE", str(blocker / "replays"))  # mkdir fails: not a folder
    assert costs(tiny_i2vgen_dir) == first
    monkeypatch.setenv("I2V_REPLAY_CACHE", "off")
    assert replay_cache.folder() is None and costs(tiny_i2vgen_dir) == first


def test_the_default_folder_is_the_users_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("I2V_REPLAY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert replay_cache.folder() == tmp_path / "i2v-daemon" / "replays"


def test_a_user_without_a_home_keeps_nothing_and_still_gets_an_answer(monkeypatch: pytest.MonkeyPatch,
                                                                      tiny_i2vgen_dir: Path):
    monkeypatch.delenv("I2V_REPLAY_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")  # Python 3.12+, HOME unset, no passwd entry

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert replay_cache.folder() is None
    assert min(costs(tiny_i2vgen_dir)) > 0
