"""Forty kinds of bad or unusual input in one inbox, one `run --once`: each ends as the README says,
and every byte that was dropped is still somewhere in inbox/, output/ or failed/."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from i2v_daemon.work.video import probe_mp4
from tests.conftest import Env, age

pytestmark = pytest.mark.slow


def png(size=(96, 64), mode="RGB", **save) -> bytes:
    img = Image.new(mode, size)
    if mode in ("RGB", "RGBA"):
        arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
        img = Image.fromarray(arr, mode)
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def encoded(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png16() -> bytes:
    img = Image.new("I;16", (96, 64))
    img.putdata([(i * 11) % 65536 for i in range(96 * 64)])
    return encoded(img, "PNG")


def palette_with_transparency() -> bytes:
    img = Image.new("P", (96, 64), 1)
    img.paste(0, (0, 0, 48, 64))  # the left half is palette index 0, the transparent one
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return encoded(img, "PNG", transparency=0)


def exif_rotated() -> bytes:
    img = Image.new("RGB", (96, 64), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: stored 96x64, shown 64x96
    return encoded(img, "JPEG", exif=exif.tobytes())


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (96, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100)


def bomb_png() -> bytes:
    """A valid PNG whose header claims 100000 x 100000 pixels (10 gigapixels)."""
    data = bytearray(png((16, 16)))
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


JSON = lambda **kw: json.dumps({"prompt": "x", **kw})  # noqa: E731


@dataclass
class Case:
    stem: str
    files: dict[str, bytes | Callable[[Path], None]]  # name -> bytes, or a function making it
    outcome: str  # "output" | "failed" | "inbox"
    needle: str = ""  # in the failed manifest's error, or in the succeeded job.log


CASES = [
    # --- images that must be refused ---------------------------------------------------------
    Case("bomb", {"bomb.png": bomb_png(), "bomb.txt": b"x"}, "failed", "max_image_pixels"),
    Case("truncated", {"truncated.png": png()[:200], "truncated.txt": b"x"}, "failed", "damaged or incomplete"),
    Case("corruptjpeg", {"corruptjpeg.jpg": b"\xff\xd8\xff\xe0" + os.urandom(500), "corruptjpeg.txt": b"x"},
         "failed", "corruptjpeg.jpg"),
    Case("empty", {"empty.png": b"", "empty.txt": b"x"}, "failed", "empty"),
    Case("noise", {"noise.png": os.urandom(2048), "noise.txt": b"x"}, "failed", "noise.png"),
    Case("gif", {"gif.png": encoded(Image.new("RGB", (96, 64)), "GIF"), "gif.txt": b"x"}, "failed", "GIF"),
    Case("bmp", {"bmp.jpg": encoded(Image.new("RGB", (96, 64)), "BMP"), "bmp.txt": b"x"}, "failed", "BMP"),
    Case("speck", {"speck.png": png((8, 8)), "speck.txt": b"x"}, "failed", "at least 16"),
    Case("link", {"link.png": lambda p: os.symlink("/etc/passwd", p), "link.txt": b"x"}, "failed",
         "symbolic link"),
    Case("pipe", {"pipe.png": lambda p: os.mkfifo(p), "pipe.txt": b"x"}, "failed", "FIFO"),
    Case("twoimages", {"twoimages.png": png(), "twoimages.jpg": encoded(Image.new("RGB", (96, 64)), "JPEG"),
                       "twoimages.txt": b"x"}, "failed", "several images"),
    # --- unusual images that work (and say what was done) ----------------------------------------
    Case("deep", {"deep.png": png16(), "deep.txt": b"x"}, "output", "16-bit"),
    Case("cmyk", {"cmyk.jpg": encoded(Image.new("CMYK", (96, 64), (0, 80, 160, 10)), "JPEG"),
                  "cmyk.txt": b"x"}, "output", "CMYK"),
    Case("palette", {"palette.png": palette_with_transparency(), "palette.txt": b"x"}, "output", "transparent"),
    Case("alpha", {"alpha.png": png(mode="RGBA"), "alpha.txt": b"x"}, "output", "transparent"),
    Case("greyalpha", {"greyalpha.png": encoded(Image.new("LA", (96, 64), (128, 100)), "PNG"),
                       "greyalpha.txt": b"x"}, "output", "transparent"),
    Case("onebit", {"onebit.png": encoded(Image.new("1", (96, 64), 1), "PNG"), "onebit.txt": b"x"}, "output"),
    Case("rotated", {"rotated.jpg": exif_rotated(), "rotated.txt": b"x"}, "output", "EXIF orientation 6"),
    Case("animated", {"animated.webp": animated_webp(), "animated.txt": b"x"}, "output", "first frame"),
    Case("liar", {"liar.png": encoded(Image.new("RGB", (96, 64), (9, 9, 9)), "JPEG"), "liar.txt": b"x"},
         "output", "despite its .png extension"),
    Case("SHOUT", {"SHOUT.PNG": png(), "SHOUT.TXT": b"upper-case extensions"}, "output"),
    # --- sidecars that must be refused -----------------------------------------------------------
    Case("huge", {"huge.png": png(), "huge.txt": b"x" * 70_000}, "failed", "max_sidecar_bytes"),
    Case("nan", {"nan.png": png(), "nan.json": b'{"prompt": "x", "guidance_scale": NaN}'}, "failed", "NaN"),
    Case("inf", {"inf.png": png(), "inf.json": b'{"prompt": "x", "guidance_scale": Infinity}'}, "failed",
         "Infinity"),
    Case("utf16", {"utf16.png": png(), "utf16.txt": "a cat".encode("utf-16")}, "failed", "UTF-16"),
    Case("latin1", {"latin1.png": png(), "latin1.txt": "café au lait".encode("latin-1")}, "failed",
         "not valid UTF-8"),
    Case("dupkey", {"dupkey.png": png(), "dupkey.json": b'{"prompt": "a", "prompt": "b"}'}, "failed",
         "more than once"),
    Case("typo", {"typo.png": png(), "typo.json": JSON(step=3).encode()}, "failed", "did you mean 'steps'"),
    Case("wordy", {"wordy.png": png(), "wordy.json": JSON(num_frames="sixteen").encode()}, "failed",
         "num_frames"),
    Case("zero", {"zero.png": png(), "zero.json": JSON(steps=0).encode()}, "failed", "steps"),
    Case("halfsize", {"halfsize.png": png(), "halfsize.json": JSON(width=512).encode()}, "failed", "height"),
    Case("nopreset", {"nopreset.png": png(), "nopreset.json": JSON(preset="ultra").encode()}, "failed",
         "unknown preset"),
    Case("nested", {"nested.png": png(), "nested.toml": b'prompt = "x"\n[extra]\na = 1\n'}, "failed", "extra"),
    Case("array", {"array.png": png(), "array.json": b'["a cat"]'}, "failed", "object"),
    Case("badtoml", {"badtoml.png": png(), "badtoml.toml": b'prompt = "unterminated\n'}, "failed", "line 1"),
    Case("twosidecars", {"twosidecars.png": png(), "twosidecars.txt": b"x", "twosidecars.json": JSON().encode()},
         "failed", "exactly one"),
    Case("sidelink", {"sidelink.png": png(), "sidelink.txt": lambda p: os.symlink("/etc/hostname", p)},
         "failed", "symbolic link"),
    # --- sidecars that work, with a note --------------------------------------------------------
    Case("bom", {"bom.png": png(), "bom.txt": b"\xef\xbb\xbfa cat with a BOM"}, "output", "byte-order mark"),
    Case("blank", {"blank.png": png(), "blank.txt": b"   \n"}, "output", "the prompt is empty"),
    Case("longprompt", {"longprompt.png": png(), "longprompt.txt": ("a cat turns its head " * 30).encode()},
         "output", "the rest is ignored"),
    # --- things that are not jobs and stay in the inbox -----------------------------------------
    Case("orphan", {"orphan.json": JSON().encode()}, "inbox"),
    Case("readme", {"readme.md": b"# not an image"}, "inbox"),
    Case("hidden", {".hidden.png": png(), "partial.png.part": png(), "download.jpg.crdownload": b"x"}, "inbox"),
]


def _make(env: Env) -> dict[str, tuple[str, bytes | str]]:
    """Create every case's files; return name -> (kind, content) for the no-loss check."""
    made: dict[str, tuple[str, bytes | str]] = {}
    for case in CASES:
        for name, content in case.files.items():
            path = env.inbox / name
            if callable(content):
                content(path)
                st = os.lstat(path)
                made[name] = ("link", os.readlink(path)) if stat.S_ISLNK(st.st_mode) else ("fifo", "")
            else:
                path.write_bytes(content)
                made[name] = ("file", content)
            if not stat.S_ISFIFO(os.lstat(path).st_mode) and not os.path.islink(path):
                age(path)
            else:
                t = os.lstat(path).st_mtime - 60
                os.utime(path, (t, t), follow_symlinks=False)
    sub = env.inbox / "subfolder.png"
    sub.mkdir()
    (sub / "inner.png").write_bytes(png())
    return made


def _where(env: Env, name: str) -> list[Path]:
    return [p for p in [env.inbox / name, *env.data.glob(f"*/*/input/{name}")] if os.path.lexists(p)]


def test_forty_kinds_of_bad_or_unusual_input_each_end_as_documented_and_nothing_is_lost(env: Env):
    made = _make(env)
    proc = env.cli("run", "--once", check=True, timeout=600)
    assert proc.returncode == 0

    problems = []
    for case in CASES:
        if case.outcome == "inbox":
            for name in case.files:
                if not os.path.lexists(env.inbox / name):
                    problems.append(f"{case.stem}: {name} should have stayed in the inbox")
            continue
        folder = (env.output if case.outcome == "output" else env.failed) / case.stem
        if not (folder / "job.json").exists():
            elsewhere = [str(p.relative_to(env.data)) for p in env.data.glob(f"*/{case.stem}*")]
            problems.append(f"{case.stem}: expected in {case.outcome}/, found {elsewhere}")
            continue
        manifest = json.loads((folder / "job.json").read_text())
        if case.outcome == "failed":
            message = (manifest.get("error") or {}).get("message", "")
            if manifest["status"] != "failed" or case.needle not in message:
                problems.append(f"{case.stem}: status {manifest['status']}, error {message!r} lacks {case.needle!r}")
        else:
            log = (folder / "job.log").read_text()
            video = folder / manifest["output"]
            if manifest["status"] != "succeeded" or not video.exists() or case.needle not in log:
                problems.append(f"{case.stem}: status {manifest['status']}, log lacks {case.needle!r}")
            if len(set(manifest["notes"])) != len(manifest["notes"]):
                problems.append(f"{case.stem}: a note twice in {manifest['notes']}")
    assert not problems, "\n".join(problems)

    # EXIF orientation really applied: stored 96x64, displayed (and generated) 64x96.
    rotated = probe_mp4(env.output / "rotated" / "rotated.mp4")
    assert (rotated["width"], rotated["height"]) == (64, 96)
    # The FIFO and symlinks were moved, never opened or followed: they arrive as what they were.
    assert stat.S_ISFIFO(os.lstat(env.failed / "pipe" / "input" / "pipe.png").st_mode)
    assert os.readlink(env.failed / "link" / "input" / "link.png") == "/etc/passwd"
    # The subfolder is left alone.
    assert (env.inbox / "subfolder.png" / "inner.png").exists()

    # Nothing lost: every dropped name is in exactly one place, with its bytes.
    for name, (kind, content) in made.items():
        places = _where(env, name)
        assert len(places) == 1, f"{name} is in {places}"
        place = places[0]
        if kind == "file":
            assert place.read_bytes() == content, name
        elif kind == "link":
            assert os.readlink(place) == content, name
        else:
            assert stat.S_ISFIFO(os.lstat(place).st_mode), name

    counts = env.status()["counts"]
    jobs = [c for c in CASES if c.outcome != "inbox"]
    assert counts["failed"] == sum(c.outcome == "failed" for c in jobs)
    assert counts["succeeded"] == sum(c.outcome == "output" for c in jobs)
    assert len(CASES) >= 40
