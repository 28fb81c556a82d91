"""Moving files without losing one: atomic writes, moves on one and across two filesystems, staging, names."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from i2v_daemon.files import free_name, move_file, move_tree, publish, stage_inputs, write_atomic, write_json

T = TypeVar("T")


@pytest.fixture()
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path (tmpfs /dev/shm), so rename(2) fails with EXDEV."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        pytest.skip("/dev/shm is not available to make a second filesystem")
    if shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm and the test folder are on one filesystem: no EXDEV to provoke")
    folder = Path(tempfile.mkdtemp(prefix="i2v-test-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def promptly(fn: Callable[[], T]) -> T:
    """Run `fn` in a thread: code that would block opening a FIFO fails the test instead of hanging it."""
    out: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as err:
            errors.append(err)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "blocked: a FIFO was opened"
    if errors:
        raise errors[0]
    return out[0]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file under root by relative path: its bytes, or '-> target' for a symlink, 'fifo' for a FIFO."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_fifo():
            out[rel] = "fifo"
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


# ---- atomic writes ------------------------------------------------------------------------------


def test_write_atomic_writes_the_bytes_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    write_atomic(tmp_path / "job.json", b"{}\n")
    assert (tmp_path / "job.json").read_bytes() == b"{}\n"
    assert os.listdir(tmp_path) == ["job.json"]


def test_write_atomic_replaces_the_file_whole_so_an_open_reader_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    write_atomic(path, b"old contents")
    old_inode = path.stat().st_ino
    with path.open("rb") as reader:
        write_atomic(path, b"new")
        assert reader.read() == b"old contents"  # a rename, not a rewrite in place
    assert path.read_bytes() == b"new"
    assert path.stat().st_ino != old_inode
    assert os.listdir(tmp_path) == ["job.json"]


def test_write_atomic_overwrites_a_temporary_file_left_by_a_crash(tmp_path: Path) -> None:
    (tmp_path / ".job.json.part").write_bytes(b"half a manifest from before the crash")
    write_atomic(tmp_path / "job.json", b"whole")
    assert (tmp_path / "job.json").read_bytes() == b"whole"
    assert os.listdir(tmp_path) == ["job.json"]


def test_write_json_keeps_non_ascii_text_and_ends_with_a_newline(tmp_path: Path) -> None:
    write_json(tmp_path / "job.json", {"prompt": "ein Kätzchen 🐈", "n": 1})
    text = (tmp_path / "job.json").read_text(encoding="utf-8")
    assert "Kätzchen 🐈" in text and text.endswith("\n")
    assert json.loads(text) == {"prompt": "ein Kätzchen 🐈", "n": 1}


# ---- moving one file ----------------------------------------------------------------------------


def test_move_file_on_one_filesystem_is_a_rename(tmp_path: Path) -> None:
    src = tmp_path / "inbox" / "cat.png"
    src.parent.mkdir()
    src.write_bytes(b"png bytes")
    inode = src.stat().st_ino
    dst = tmp_path / "work" / "1" / "input" / "cat.png"
    move_file(src, dst)  # creates the missing parents
    assert not src.exists()
    assert dst.read_bytes() == b"png bytes" and dst.stat().st_ino == inode


def test_move_file_of_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        move_file(tmp_path / "gone.png", tmp_path / "dst" / "gone.png")


def test_move_file_across_filesystems_copies_then_removes_the_source(tmp_path: Path, other_fs: Path) -> None:
    src = other_fs / "cat.png"
    data = os.urandom(3 << 20)  # more than one copy chunk
    src.write_bytes(data)
    os.utime(src, (1_600_000_000, 1_600_000_000))
    dst = tmp_path / "work" / "input" / "cat.png"
    move_file(src, dst)
    assert not src.exists()
    assert dst.read_bytes() == data
    assert dst.stat().st_mtime == 1_600_000_000  # the metadata came along
    assert os.listdir(dst.parent) == ["cat.png"]  # no temporary file left behind


def test_move_file_across_filesystems_recreates_symlinks_and_fifos_without_opening_them(
    tmp_path: Path, other_fs: Path
) -> None:
    fifo_target = other_fs / "target.fifo"
    os.mkfifo(fifo_target)
    (other_fs / "link.png").symlink_to(fifo_target)
    os.mkfifo(other_fs / "pipe.png")
    promptly(lambda: move_file(other_fs / "link.png", tmp_path / "input" / "link.png"))
    promptly(lambda: move_file(other_fs / "pipe.png", tmp_path / "input" / "pipe.png"))
    assert os.readlink(tmp_path / "input" / "link.png") == str(fifo_target)
    assert (tmp_path / "input" / "pipe.png").is_fifo()
    assert not os.path.lexists(other_fs / "link.png") and not os.path.lexists(other_fs / "pipe.png")


# ---- staging a job's inputs ---------------------------------------------------------------------


@pytest.fixture()
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    (path / "cat.png").write_bytes(b"png")
    (path / "cat.txt").write_bytes(b"a cat")
    return path


def test_stage_inputs_moves_the_files_into_the_job_folder_and_is_idempotent(inbox: Path, tmp_path: Path) -> None:
    job_dir = tmp_path / "work" / "1"
    assert stage_inputs(("cat.png", "cat.txt"), inbox, job_dir) == []
    assert tree(job_dir) == {"input/cat.png": b"png", "input/cat.txt": b"a cat"}
    assert list(inbox.iterdir()) == []
    assert stage_inputs(("cat.png", "cat.txt"), inbox, job_dir) == []
    assert tree(job_dir) == {"input/cat.png": b"png", "input/cat.txt": b"a cat"}


def test_stage_inputs_finishes_a_staging_that_was_interrupted(inbox: Path, tmp_path: Path) -> None:
    job_dir = tmp_path / "work" / "1"
    move_file(inbox / "cat.png", job_dir / "input" / "cat.png")  # the crash came after the first file
    assert stage_inputs(("cat.png", "cat.txt"), inbox, job_dir) == []
    assert tree(job_dir) == {"input/cat.png": b"png", "input/cat.txt": b"a cat"}


def test_stage_inputs_reports_the_names_it_cannot_find(inbox: Path, tmp_path: Path) -> None:
    job_dir = tmp_path / "work" / "1"
    assert stage_inputs(("cat.png", "cat.json", "dog.png"), inbox, job_dir) == ["cat.json", "dog.png"]
    assert tree(job_dir) == {"input/cat.png": b"png"}
    assert (inbox / "cat.txt").exists()  # not its input: left alone


def failed_folder(root: Path) -> Path:
    folder = root / "failed" / "cat"
    (folder / "input").mkdir(parents=True)
    (folder / "input" / "cat.png").write_bytes(b"png")
    (folder / "input" / "cat.txt").write_bytes(b"a cat")
    (folder / "job.json").write_text('{"status": "failed"}')
    (folder / "job.log").write_text("the first try\n")
    return folder


def test_stage_inputs_of_a_retried_job_brings_its_failed_folder_back_without_the_old_manifest(
    tmp_path: Path,
) -> None:
    previous = failed_folder(tmp_path)
    job_dir = tmp_path / "work" / "7"
    empty_inbox = tmp_path / "inbox"
    empty_inbox.mkdir()
    assert stage_inputs(("cat.png", "cat.txt"), empty_inbox, job_dir, previous) == []
    assert not previous.exists()
    assert tree(job_dir) == {"input/cat.png": b"png", "input/cat.txt": b"a cat", "job.log": b"the first try\n"}
    # Again, as after a crash right after the move: nothing changes, nothing is reported missing.
    assert stage_inputs(("cat.png", "cat.txt"), empty_inbox, job_dir, previous) == []
    assert tree(job_dir) == {"input/cat.png": b"png", "input/cat.txt": b"a cat", "job.log": b"the first try\n"}


def test_stage_inputs_of_a_retried_job_takes_single_files_when_its_work_folder_exists(tmp_path: Path) -> None:
    previous = failed_folder(tmp_path)
    job_dir = tmp_path / "work" / "7"
    (job_dir / "input").mkdir(parents=True)
    (job_dir / "input" / "cat.png").write_bytes(b"png")
    (previous / "input" / "cat.png").unlink()
    assert stage_inputs(("cat.png", "cat.txt"), tmp_path / "no-inbox", job_dir, previous) == []
    assert tree(job_dir)["input/cat.txt"] == b"a cat"


def test_stage_inputs_is_idempotent_for_a_symlink_whose_target_does_not_resolve(inbox: Path, tmp_path: Path) -> None:
    (inbox / "rel.png").symlink_to("cat.png")  # relative: resolves in the inbox, not in work/1/input/
    (inbox / "dangling.txt").symlink_to(tmp_path / "nowhere")
    job_dir = tmp_path / "work" / "1"
    assert stage_inputs(("rel.png", "dangling.txt"), inbox, job_dir) == []
    assert stage_inputs(("rel.png", "dangling.txt"), inbox, job_dir) == []


# ---- names --------------------------------------------------------------------------------------


def test_free_name_picks_the_name_then_numbered_ones(tmp_path: Path) -> None:
    assert free_name(tmp_path, "cat") == tmp_path / "cat"
    (tmp_path / "cat").mkdir()
    assert free_name(tmp_path, "cat") == tmp_path / "cat-2"
    (tmp_path / "cat-2").mkdir()
    assert free_name(tmp_path, "cat") == tmp_path / "cat-3"


def test_free_name_skips_names_already_taken_by_other_jobs(tmp_path: Path) -> None:
    assert free_name(tmp_path, "cat", {str(tmp_path / "cat")}) == tmp_path / "cat-2"
    (tmp_path / "cat").mkdir()
    taken = {str(tmp_path / "cat-2"), str(tmp_path / "cat-3")}
    assert free_name(tmp_path, "cat", taken) == tmp_path / "cat-4"


def test_free_name_counts_a_file_in_the_way_as_taken(tmp_path: Path) -> None:
    (tmp_path / "cat").write_bytes(b"someone's file")
    assert free_name(tmp_path, "cat") == tmp_path / "cat-2"


# ---- moving a job folder ------------------------------------------------------------------------


def job_folder(root: Path) -> Path:
    folder = root / "work" / "3"
    (folder / "input").mkdir(parents=True)
    (folder / "input" / "cat.png").write_bytes(b"png")
    (folder / "cat.mp4").write_bytes(b"video" * 1000)
    (folder / "job.json").write_text("{}")
    return folder


def test_move_tree_onto_a_path_that_does_not_exist(tmp_path: Path) -> None:
    src = job_folder(tmp_path)
    before = tree(src)
    (tmp_path / "output").mkdir()
    move_tree(src, tmp_path / "output" / "cat")
    assert not src.exists()
    assert tree(tmp_path / "output" / "cat") == before


def test_move_tree_onto_an_empty_reserved_folder(tmp_path: Path) -> None:
    src = job_folder(tmp_path)
    before = tree(src)
    dst = tmp_path / "output" / "cat"
    dst.mkdir(parents=True)
    move_tree(src, dst)
    assert not src.exists()
    assert tree(dst) == before


def test_move_tree_finishes_over_a_half_done_copy(tmp_path: Path) -> None:
    src = job_folder(tmp_path)
    before = tree(src)
    dst = tmp_path / "output" / "cat"
    dst.mkdir(parents=True)
    (dst / "cat.mp4").write_bytes(b"vid")  # a copy cut short by a crash
    (dst / ".job.json.part").write_text("{")
    move_tree(src, dst)
    assert not src.exists()
    assert {k: v for k, v in tree(dst).items() if not k.startswith(".")} == before


def test_move_tree_across_filesystems_copies_every_file_then_removes_the_source(
    tmp_path: Path, other_fs: Path
) -> None:
    src = job_folder(other_fs)
    before = tree(src)
    (tmp_path / "output").mkdir()
    move_tree(src, tmp_path / "output" / "cat")
    assert not src.exists()
    assert tree(tmp_path / "output" / "cat") == before


def test_move_tree_across_filesystems_keeps_a_symlink_a_symlink(tmp_path: Path, other_fs: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not the user's to read")
    src = other_fs / "work" / "9"
    (src / "input").mkdir(parents=True)
    (src / "input" / "link.png").symlink_to(secret)
    dst = tmp_path / "failed" / "link"
    dst.parent.mkdir()
    move_tree(src, dst)
    assert not src.exists()
    assert tree(dst) == {"input/link.png": f"-> {secret}"}


def test_move_tree_across_filesystems_moves_a_fifo_without_opening_it(tmp_path: Path, other_fs: Path) -> None:
    src = other_fs / "work" / "9"
    (src / "input").mkdir(parents=True)
    os.mkfifo(src / "input" / "pipe.png")
    (src / "job.json").write_text("{}")
    dst = tmp_path / "failed" / "pipe"
    dst.parent.mkdir()
    promptly(lambda: move_tree(src, dst))
    assert not src.exists()
    assert tree(dst) == {"input/pipe.png": "fifo", "job.json": b"{}"}


def test_publish_moves_the_job_folder_into_its_reserved_place(tmp_path: Path) -> None:
    src = job_folder(tmp_path)
    before = tree(src)
    dst = tmp_path / "output" / "cat-2"  # output/ does not exist yet
    publish(src, dst)
    assert not src.exists() and tree(dst) == before


def test_publish_after_a_crash_that_followed_the_rename_is_a_no_op(tmp_path: Path) -> None:
    src = job_folder(tmp_path)
    dst = tmp_path / "output" / "cat"
    publish(src, dst)
    after = tree(dst)
    publish(src, dst)  # the restarted worker finishes the job again
    assert tree(dst) == after
    assert not src.exists()
