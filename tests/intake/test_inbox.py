"""The inbox scanner's stability and pairing rules, with time passed in, and intake's requests and keys."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from i2v_daemon.intake.inbox import (
    NETWORK_FS,
    InboxScanner,
    ScanResult,
    filesystem_type,
    is_ignored_name,
    needs_polling,
)
from i2v_daemon.intake.staging import build_request, intake_key
from i2v_daemon.settings import Settings
from tests.conftest import make_image

STABLE, SIDECAR_WAIT = 2.0, 10.0
T = TypeVar("T")


@pytest.fixture()
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture()
def skipped() -> list[tuple[str, str]]:
    return []


@pytest.fixture()
def scanner(inbox: Path, skipped: list[tuple[str, str]]) -> InboxScanner:
    return InboxScanner(
        inbox, stable_seconds=STABLE, sidecar_wait_seconds=SIDECAR_WAIT,
        on_skip=lambda name, why: skipped.append((name, why)),
    )


def put(inbox: Path, *names: str, body: bytes = b"data") -> list[Path]:
    paths = []
    for name in names:
        path = inbox / name
        path.write_bytes(body)
        paths.append(path)
    return paths


def ready_stems(result: ScanResult) -> list[str]:
    return [g.stem for g in result.ready]


# ---- stability ----------------------------------------------------------------------------------


def test_a_file_is_not_ready_until_size_and_mtime_stayed_unchanged_for_stable_seconds(
    scanner: InboxScanner, inbox: Path
) -> None:
    put(inbox, "cat.png", "cat.txt")
    first = scanner.scan(now=100.0)
    assert first.ready == [] and first.pending == 1
    assert scanner.scan(now=101.9).ready == []
    result = scanner.scan(now=102.1)
    assert ready_stems(result) == ["cat"] and result.pending == 0
    group = result.ready[0]
    assert group.images == [inbox / "cat.png"] and group.sidecars == [inbox / "cat.txt"]


def test_a_change_in_size_resets_the_stability_clock(scanner: InboxScanner, inbox: Path) -> None:
    (image,) = put(inbox, "cat.png")
    put(inbox, "cat.txt")
    scanner.scan(now=0.0)
    scanner.scan(now=1.5)
    with image.open("ab") as fh:  # still being written
        fh.write(b"more")
    assert scanner.scan(now=1.6).ready == []
    assert scanner.scan(now=3.5).ready == []  # only 1.9 s since the change
    assert ready_stems(scanner.scan(now=3.7)) == ["cat"]


def test_a_change_in_mtime_alone_resets_the_stability_clock(scanner: InboxScanner, inbox: Path) -> None:
    image, side = put(inbox, "cat.png", "cat.txt")
    wall = 1_000_100.0  # the files' mtimes are recent on this clock: no fast path for old files
    os.utime(image, (wall, wall))
    os.utime(side, (wall, wall))
    scanner.scan(now=0.0, wall_now=wall)
    os.utime(image, (wall + 1.9, wall + 1.9))  # same size, new mtime (written just now)
    assert scanner.scan(now=1.9, wall_now=wall + 1.9).ready == []
    assert scanner.scan(now=3.8, wall_now=wall + 3.8).ready == []
    assert ready_stems(scanner.scan(now=4.0, wall_now=wall + 4.0)) == ["cat"]


def test_a_renamed_in_file_with_an_old_mtime_is_taken_on_the_second_look_that_finds_it_unchanged(
    scanner: InboxScanner, inbox: Path
) -> None:
    for p in put(inbox, "old.png", "old.txt"):
        os.utime(p, (5_000, 5_000))
    first = scanner.scan(now=0.0, wall_now=9_999.0)
    assert first.ready == [] and first.next_check is not None and first.next_check <= 0.1
    assert ready_stems(scanner.scan(now=0.2, wall_now=9_999.2)) == ["old"]


def test_an_old_image_renamed_in_still_waits_for_its_sidecar_from_when_it_was_first_seen(
    scanner: InboxScanner, inbox: Path
) -> None:
    (image,) = put(inbox, "cat.png")
    os.utime(image, (5_000, 5_000))
    scanner.scan(now=0.0, wall_now=9_999.0)
    assert scanner.scan(now=5.0, wall_now=10_004.0).ready == []  # its sidecar may still come
    assert ready_stems(scanner.scan(now=SIDECAR_WAIT + 0.2, wall_now=10_010.0)) == ["cat"]


def test_a_file_in_a_presets_folder_is_a_group_of_that_folder(inbox: Path) -> None:
    scanner = InboxScanner(inbox, stable_seconds=STABLE, sidecar_wait_seconds=SIDECAR_WAIT, preset_folders=("fast",))
    (inbox / "fast").mkdir()
    (inbox / "album").mkdir()
    put(inbox / "fast", "cat.png", "cat.txt")
    put(inbox / "album", "dog.png", "dog.txt")
    put(inbox, "cat.png", "cat.txt")
    result = scanner.scan(now=0.0, wall_now=1e10, once=True)
    assert sorted((g.folder, g.stem) for g in result.ready) == [("", "cat"), ("fast", "cat")]
    fast = next(g for g in result.ready if g.folder == "fast")
    assert fast.images == [inbox / "fast" / "cat.png"]


def test_a_presets_folder_that_is_a_symlink_is_not_followed(inbox: Path, tmp_path: Path) -> None:
    scanner = InboxScanner(inbox, stable_seconds=STABLE, sidecar_wait_seconds=SIDECAR_WAIT, preset_folders=("fast",))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    put(elsewhere, "cat.png", "cat.txt")
    (inbox / "fast").symlink_to(elsewhere)
    assert scanner.scan(now=0.0, wall_now=1e10, once=True).ready == []


def test_a_file_replaced_under_the_same_name_resets_the_stability_clock(scanner: InboxScanner, inbox: Path) -> None:
    image, _ = put(inbox, "cat.png", "cat.txt")
    st = image.stat()
    scanner.scan(now=0.0)
    replacement = inbox / ".cat.png"
    replacement.write_bytes(b"data")  # same size
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only the inode differs
    replacement.rename(image)
    assert scanner.scan(now=1.5).ready == []
    assert scanner.scan(now=3.4).ready == []
    assert ready_stems(scanner.scan(now=3.6)) == ["cat"]


def test_once_mode_treats_files_whose_mtime_is_old_enough_as_stable(scanner: InboxScanner, inbox: Path) -> None:
    old = put(inbox, "old.png", "old.txt")
    fresh = put(inbox, "new.png", "new.txt")
    for p in old:
        os.utime(p, (5_000, 5_000))
    for p in fresh:
        os.utime(p, (5_059, 5_059))
    result = scanner.scan(now=0.0, wall_now=5_060.0, once=True)
    assert ready_stems(result) == ["old"]
    assert result.pending == 1  # `new` is one second old
    assert result.next_check is not None and 0 < result.next_check <= STABLE


def test_without_once_an_old_mtime_does_not_make_a_file_stable(scanner: InboxScanner, inbox: Path) -> None:
    for p in put(inbox, "old.png", "old.txt"):
        os.utime(p, (5_000, 5_000))
    assert scanner.scan(now=0.0, wall_now=9_999.0).ready == []


def test_a_file_that_vanishes_is_forgotten_and_starts_over_when_it_returns(scanner: InboxScanner, inbox: Path) -> None:
    put(inbox, "cat.png", "cat.txt")
    scanner.scan(now=0.0)
    (inbox / "cat.png").unlink()
    assert scanner.scan(now=1.0).ready == []
    put(inbox, "cat.png")
    assert scanner.scan(now=2.5).ready == []
    assert ready_stems(scanner.scan(now=4.6)) == ["cat"]


def test_forget_makes_a_file_wait_again(scanner: InboxScanner, inbox: Path) -> None:
    put(inbox, "cat.png", "cat.txt")
    scanner.scan(now=0.0)
    assert ready_stems(scanner.scan(now=2.5)) == ["cat"]
    scanner.forget(["cat.png", "cat.txt"])
    assert scanner.scan(now=3.0).ready == []


# ---- pairing ------------------------------------------------------------------------------------


def test_an_image_waits_for_its_sidecar_then_becomes_ready_alone(scanner: InboxScanner, inbox: Path) -> None:
    put(inbox, "lonely.png")
    scanner.scan(now=0.0)
    waiting = scanner.scan(now=STABLE + 0.1)
    assert waiting.ready == [] and waiting.pending == 1
    assert waiting.next_check == pytest.approx(SIDECAR_WAIT - 0.1)
    assert scanner.scan(now=STABLE + SIDECAR_WAIT - 0.1).ready == []
    result = scanner.scan(now=STABLE + SIDECAR_WAIT + 0.1)
    assert ready_stems(result) == ["lonely"]
    assert result.ready[0].images == [inbox / "lonely.png"] and result.ready[0].sidecars == []


def test_an_image_and_its_sidecar_are_ready_together_without_the_sidecar_wait(
    scanner: InboxScanner, inbox: Path
) -> None:
    put(inbox, "cat.PNG", "cat.json")
    scanner.scan(now=0.0)
    result = scanner.scan(now=STABLE + 0.1)
    assert ready_stems(result) == ["cat"]
    assert result.ready[0].images == [inbox / "cat.PNG"] and result.ready[0].sidecars == [inbox / "cat.json"]


def test_a_sidecar_that_arrives_late_still_joins_its_waiting_image(scanner: InboxScanner, inbox: Path) -> None:
    put(inbox, "cat.png")
    scanner.scan(now=0.0)
    scanner.scan(now=5.0)
    put(inbox, "cat.toml")
    assert scanner.scan(now=5.0).ready == []
    assert scanner.scan(now=6.9).ready == []  # the sidecar is not stable yet
    result = scanner.scan(now=7.1)
    assert ready_stems(result) == ["cat"] and result.ready[0].sidecars == [inbox / "cat.toml"]


def test_all_files_of_one_stem_travel_together_so_intake_can_reject_them(scanner: InboxScanner, inbox: Path) -> None:
    put(inbox, "twice.png", "twice.jpg", "twice.txt", "twice.json")
    scanner.scan(now=0.0)
    (group,) = scanner.scan(now=STABLE + 0.1).ready
    assert [p.name for p in group.images] == ["twice.jpg", "twice.png"]
    assert [p.name for p in group.sidecars] == ["twice.json", "twice.txt"]


def test_a_sidecar_without_an_image_is_not_ready_and_is_reported_once(
    scanner: InboxScanner, inbox: Path, skipped: list[tuple[str, str]]
) -> None:
    put(inbox, "orphan.txt")
    for t in (0.0, 50.0, 100.0):
        assert scanner.scan(now=t, wall_now=1e10, once=True).ready == []
    assert [name for name, _ in skipped] == ["orphan.txt"]
    assert "without an image" in skipped[0][1]


# ---- what is never taken ------------------------------------------------------------------------

IGNORED = [
    ".cat.png", ".cat.txt", "cat.png.part", "cat.png.PART", "dog.tmp", "dog.png.Tmp", "owl.png.crdownload",
    "owl.png.CRDOWNLOAD", "fox.png.filepart", "fox.png.FilePart",
]


@pytest.mark.parametrize("name", IGNORED)
def test_hidden_and_temporary_names_are_ignored(name: str) -> None:
    assert is_ignored_name(name)


@pytest.mark.parametrize("name", ["cat.png", "cat.part.png", "a.tmp.txt", "partial.json", "x.crdownload.jpg"])
def test_ordinary_names_are_not_ignored(name: str) -> None:
    assert not is_ignored_name(name)


def test_hidden_and_temporary_files_are_never_taken_nor_reported(
    scanner: InboxScanner, inbox: Path, skipped: list[tuple[str, str]]
) -> None:
    for p in put(inbox, *IGNORED):
        os.utime(p, (1_000, 1_000))
    for t in (0.0, 100.0):
        result = scanner.scan(now=t, wall_now=1e10, once=True)
        assert result.ready == [] and result.pending == 0
    assert skipped == []


def test_files_in_subfolders_are_left_alone(scanner: InboxScanner, inbox: Path) -> None:
    sub = inbox / "album"
    sub.mkdir()
    put(sub, "cat.png", "cat.txt")
    (inbox / "folder.png").mkdir()  # a folder with an image's name
    for t in (0.0, 100.0):
        result = scanner.scan(now=t, wall_now=1e10, once=True)
        assert result.ready == [] and result.pending == 0
    assert (sub / "cat.png").exists()


def _promptly(fn: Callable[[], T]) -> T:
    """Run `fn` in a thread: one that would block opening a FIFO fails the test instead of hanging it."""
    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "blocked: a FIFO was opened"
    return out[0]


def test_symlinks_and_fifos_are_never_opened_and_travel_as_rejected_jobs(
    scanner: InboxScanner, inbox: Path, tmp_path: Path, skipped: list[tuple[str, str]], settings: Settings
) -> None:
    outside_fifo = tmp_path / "outside.fifo"
    os.mkfifo(outside_fifo)
    (inbox / "link.png").symlink_to(outside_fifo)  # following it would block on the FIFO
    (inbox / "alias.png").symlink_to(make_image(tmp_path / "real.png"))
    os.mkfifo(inbox / "pipe.png")
    make_image(inbox / "cat.png")
    os.mkfifo(inbox / "cat.txt")  # a FIFO posing as a sidecar
    for t in (0.0, 100.0):
        result = _promptly(lambda t=t: scanner.scan(now=t, wall_now=1e10, once=True))
    assert skipped == []
    groups = {g.stem: g for g in result.ready}
    assert sorted(groups) == ["alias", "cat", "link", "pipe"] and result.pending == 0

    why = {}
    for stem, group in groups.items():
        files = group.images + group.sidecars
        key = _promptly(lambda files=files: intake_key(inbox, files))
        req = _promptly(lambda g=group, key=key: build_request(g.stem, g.images, g.sidecars, settings, key))
        assert req.rejection is not None and req.params is None, stem
        assert req.rejection["type"] == "invalid_input"
        why[stem] = req.rejection["message"]
    assert why["alias"].startswith("alias.png: ") and "symbolic link" in why["alias"]
    assert why["link"].startswith("link.png: ") and "symbolic link" in why["link"]
    assert why["pipe"].startswith("pipe.png: ") and "FIFO" in why["pipe"]
    assert why["cat"].startswith("cat.txt: ") and "FIFO" in why["cat"]
    assert groups["cat"].sidecars == [inbox / "cat.txt"]


def test_unknown_extensions_are_skipped_and_reported_once_not_every_scan(
    scanner: InboxScanner, inbox: Path, skipped: list[tuple[str, str]]
) -> None:
    for p in put(inbox, "notes.docx", "clip.gif", "README"):
        os.utime(p, (1_000, 1_000))
    for t in (0.0, 10.0, 20.0, 30.0):
        assert scanner.scan(now=t, wall_now=1e10, once=True).ready == []
    assert sorted(name for name, _ in skipped) == ["README", "clip.gif", "notes.docx"]
    assert all("not an image" in why for _, why in skipped)


def test_a_missing_inbox_gives_an_empty_scan(tmp_path: Path) -> None:
    scanner = InboxScanner(tmp_path / "nowhere", stable_seconds=STABLE, sidecar_wait_seconds=SIDECAR_WAIT)
    result = scanner.scan(now=0.0)
    assert result.ready == [] and result.pending == 0 and result.next_check is None


# ---- when to look again -------------------------------------------------------------------------


def test_next_check_is_a_positive_wait_no_longer_than_the_rule_being_waited_for(
    scanner: InboxScanner, inbox: Path
) -> None:
    assert scanner.scan(now=0.0).next_check is None  # nothing pending: no need to look early
    put(inbox, "cat.png", "cat.txt")
    assert scanner.scan(now=10.0).next_check == pytest.approx(STABLE)
    assert scanner.scan(now=10.5).next_check == pytest.approx(STABLE - 0.5)
    put(inbox, "dog.png")
    result = scanner.scan(now=11.0)
    assert result.pending == 2 and result.next_check == pytest.approx(1.0)  # the nearer of the two
    result = scanner.scan(now=13.5)  # cat is taken; dog waits for a sidecar
    assert ready_stems(result) == ["cat"]
    assert 0 < result.next_check <= SIDECAR_WAIT  # type: ignore[operator]


def test_next_check_waits_for_the_least_stable_file_of_a_group(scanner: InboxScanner, inbox: Path) -> None:
    put(inbox, "cat.png")
    scanner.scan(now=0.0)
    put(inbox, "cat.txt")
    result = scanner.scan(now=1.9)  # the image is nearly stable, the sidecar has just arrived
    assert result.ready == []
    # The group cannot be ready before the sidecar has been stable for STABLE seconds.
    assert result.next_check == pytest.approx(STABLE)


def test_filesystem_type_of_a_test_folder_is_a_mount_type_from_the_mount_table(tmp_path: Path) -> None:
    fstype = filesystem_type(tmp_path)
    known = {line.split()[2] for line in Path("/proc/self/mounts").read_text().splitlines() if line.strip()}
    assert fstype in known
    assert needs_polling(tmp_path) is (fstype in NETWORK_FS or fstype.startswith("fuse"))
    assert filesystem_type(Path("/proc")) == "proc"


def test_filesystem_type_of_a_path_that_does_not_exist_is_that_of_its_mount(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path / "not" / "yet") == filesystem_type(tmp_path)


# ---- intake: keys -------------------------------------------------------------------------------


@pytest.fixture()
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("I2V_"):
            monkeypatch.delenv(key)
    mine = {"resolution": 256, "num_frames": 4, "steps": 7, "guidance_scale": 5.0, "fps": 4}
    return Settings(data_dir=tmp_path / "data", presets={"mine": mine})


def test_the_same_files_seen_twice_give_the_same_intake_key(inbox: Path) -> None:
    files = [make_image(inbox / "cat.png"), *put(inbox, "cat.txt")]
    assert intake_key(inbox, files) == intake_key(inbox, files)
    assert intake_key(inbox, files) == intake_key(inbox, files[::-1])  # order does not matter
    assert len(intake_key(inbox, files)) == 64


def test_a_touched_file_gives_a_different_intake_key(inbox: Path) -> None:
    image = make_image(inbox / "cat.png")
    (sidecar,) = put(inbox, "cat.txt")
    before = intake_key(inbox, [image, sidecar])
    st = sidecar.stat()
    os.utime(sidecar, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert intake_key(inbox, [image, sidecar]) != before


def test_the_same_name_dropped_again_gives_a_different_intake_key(inbox: Path) -> None:
    image = make_image(inbox / "cat.png")
    before = intake_key(inbox, [image])
    st = image.stat()
    image.rename(inbox / "gone.png")
    make_image(inbox / "cat.png")
    os.utime(inbox / "cat.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert intake_key(inbox, [inbox / "cat.png"]) != before  # a new inode: a new instance


def test_intake_key_of_a_file_that_left_raises_file_not_found(inbox: Path) -> None:
    with pytest.raises(FileNotFoundError):
        intake_key(inbox, [inbox / "gone.png"])


# ---- intake: requests ---------------------------------------------------------------------------


def test_a_sidecar_overrides_its_preset_which_fills_the_rest(inbox: Path, settings: Settings) -> None:
    image = make_image(inbox / "cat.png")
    sidecar = inbox / "cat.json"
    sidecar.write_text(json.dumps({
        "prompt": " a cat turns ", "negative_prompt": "blur", "preset": "fast", "steps": 7, "seed": 3, "priority": 4,
    }))
    req = build_request("cat", [image], [sidecar], settings, "key")
    assert req.rejection is None
    assert (req.name, req.inputs, req.intake_key) == ("cat", ("cat.png", "cat.json"), "key")
    assert req.prompt == "a cat turns" and req.negative_prompt == "blur" and req.priority == 4
    p = req.params
    assert p is not None
    assert (p.preset, p.resolution, p.num_frames, p.steps, p.guidance_scale, p.fps, p.seed) == (
        "fast", 512, 8, 7, 9.0, 8, 3
    )
    assert (p.width, p.height) == (None, None)


def test_a_text_sidecar_uses_the_default_preset(inbox: Path, settings: Settings) -> None:
    image = make_image(inbox / "cat.png")
    (sidecar,) = put(inbox, "cat.txt", body=b"  the cat blinks\n")
    req = build_request("cat", [image], [sidecar], settings, "key")
    assert req.prompt == "the cat blinks" and req.params is not None
    assert (req.params.preset, req.params.num_frames, req.params.steps) == ("standard", 16, 50)
    assert not any("no sidecar" in n for n in req.notes)


def test_a_preset_from_the_config_can_be_named_in_a_sidecar(inbox: Path, settings: Settings) -> None:
    image = make_image(inbox / "cat.png")
    sidecar = inbox / "cat.toml"
    sidecar.write_text('prompt = "x"\npreset = "mine"\nfps = 6\n')
    params = build_request("cat", [image], [sidecar], settings, "k").params
    assert params is not None
    assert (params.preset, params.resolution, params.num_frames, params.steps, params.fps) == ("mine", 256, 4, 7, 6)


def test_an_unknown_preset_is_a_rejection_that_names_the_known_presets(inbox: Path, settings: Settings) -> None:
    image = make_image(inbox / "cat.png")
    sidecar = inbox / "cat.json"
    sidecar.write_text(json.dumps({"prompt": "x", "preset": "ultra"}))
    req = build_request("cat", [image], [sidecar], settings, "key")
    assert req.params is None and req.rejection is not None
    assert req.rejection["type"] == "invalid_input"
    message = req.rejection["message"]
    assert "ultra" in message and "fast, high, mine, standard" in message and "cat.json" in message
    assert req.inputs == ("cat.png", "cat.json")  # the files still travel with the rejected job


def test_two_sidecars_for_one_image_are_a_rejection(inbox: Path, settings: Settings) -> None:
    image = make_image(inbox / "cat.png")
    sidecars = put(inbox, "cat.txt", "cat.json")
    req = build_request("cat", [image], sidecars, settings, "key")
    assert req.rejection is not None and req.rejection["type"] == "invalid_input"
    assert "exactly one" in req.rejection["message"]
    assert "cat.json" in req.rejection["message"] and "cat.txt" in req.rejection["message"]
    assert req.inputs == ("cat.png", "cat.json", "cat.txt")


def test_two_images_with_one_stem_are_a_rejection(inbox: Path, settings: Settings) -> None:
    images = [make_image(inbox / "cat.png"), make_image(inbox / "cat.jpg")]
    req = build_request("cat", images, [], settings, "key")
    assert req.rejection is not None and req.rejection["type"] == "invalid_input"
    assert "cat.jpg, cat.png" in req.rejection["message"]
    assert req.inputs == ("cat.jpg", "cat.png")


def test_an_image_without_a_sidecar_gets_a_note_saying_so(inbox: Path, settings: Settings) -> None:
    image = make_image(inbox / "cat.png")
    req = build_request("cat", [image], [], settings, "key")
    assert req.rejection is None and req.prompt == "" and req.params is not None
    assert req.params.preset == "standard"
    assert any("no sidecar" in note for note in req.notes)


def test_a_broken_image_is_a_rejection(inbox: Path, settings: Settings) -> None:
    (image,) = put(inbox, "cat.png", body=b"\x89PNG\r\n\x1a\n not really")
    req = build_request("cat", [image], [], settings, "key")
    assert req.rejection is not None and "cat.png" in req.rejection["message"]

