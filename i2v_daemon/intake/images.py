"""Check and load the images users drop: format by content, a pixel cap read from the header, one full decode."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile

from i2v_daemon.errors import InputError, first_line
from i2v_daemon.fsutil import open_regular

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_MAX_PIXELS = 40_000_000
MIN_SIDE = 16

_SUFFIX_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_FORMAT_NAME = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
# Modes whose samples run 0..65535; convert("RGB") would clip them at 255.
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored left to right"),
    3: (Image.Transpose.ROTATE_180, "rotated 180°"),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, "flipped top to bottom"),
    5: (Image.Transpose.TRANSPOSE, "mirrored and rotated 90° counter-clockwise"),
    6: (Image.Transpose.ROTATE_270, "rotated 90° clockwise"),
    7: (Image.Transpose.TRANSVERSE, "mirrored and rotated 90° clockwise"),
    8: (Image.Transpose.ROTATE_90, "rotated 90° counter-clockwise"),
}
_FOREIGN_MAGIC = (
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"BM", "a BMP image"),
    (b"8BPS", "a Photoshop (PSD) file"),
    (b"%PDF", "a PDF document"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"qoif", "a QOI image"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
)
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"})

# PIL's limits are process-wide globals; this lock keeps our save-set-restore of them from interleaving.
_PIL_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageInfo:
    """What an image file holds: its size as displayed (after EXIF orientation) and notes for the job's log."""

    width: int
    height: int
    format: str
    mode: str
    frames: int
    notes: tuple[str, ...] = ()


def inspect_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> ImageInfo:
    """Check an image (format, pixel cap, full decode) and describe it; raise InputError if it is unusable.

    `name`: the file's name as the user knows it, when `path` is a temporary copy (an upload).
    """
    return _read(path, max_pixels, want_rgb=False, name=name)[0]


def load_rgb(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, tuple[str, ...]]:
    """Check an image as inspect_image does and return its first frame as upright 8-bit RGB, plus notes."""
    info, rgb = _read(path, max_pixels, want_rgb=True)
    assert rgb is not None
    return rgb, info.notes


def sniff_format(head: bytes) -> str | None:
    """'PNG', 'JPEG' or 'WEBP' when the file's first bytes are one of those, else None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _read(
    path: Path, max_pixels: int, *, want_rgb: bool, name: str | None = None,
) -> tuple[ImageInfo, Image.Image | None]:
    name = name or path.name
    suffix = Path(name).suffix
    with open_regular(path) as (fh, _size):
        head = fh.read(64)
        if not head:
            raise InputError(
                f"{name}: the file is empty (0 bytes); it may still be copying or its save failed — drop it again"
            )
        fmt = sniff_format(head)
        if fmt is None:
            raise InputError(_foreign_message(name, head))
        notes: list[str] = []
        expected = _SUFFIX_FORMAT.get(suffix.lower())
        if expected is not None and expected != fmt:
            notes.append(
                f"{name} holds a {_FORMAT_NAME[fmt]} image despite its {suffix} extension; read it as one"
            )
        # PIL's WebP reader allocates the whole canvas while opening, so check the header ourselves first.
        webp_size = _webp_canvas_size(head) if fmt == "WEBP" else None
        if webp_size is not None:
            _check_pixels(name, webp_size, max_pixels)
        fh.seek(0)
        with _pil_limits():
            img = _open_pil(fh, fmt, name)
            with img:
                _check_pixels(name, img.size, max_pixels)
                _check_min_side(name, img.size)
                _decode(img, fmt, name)
                return _describe(img, fmt, name, notes, want_rgb=want_rgb)


@contextlib.contextmanager
def _pil_limits() -> Iterator[None]:
    """Let our own pixel cap govern and make PIL refuse truncated data, for one open-and-decode."""
    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        # Our cap was checked against the header already; PIL's default (about 89 MP) would otherwise
        # warn on, or refuse, images that max_image_pixels allows.
        Image.MAX_IMAGE_PIXELS = None
        # Another library may have switched this on; a half-decoded input must fail here, not in the model.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _open_pil(fh: BinaryIO, fmt: str, name: str) -> Image.Image:
    """Hand the bytes to the one decoder their signature names, and no other."""
    try:
        return Image.open(fh, formats=[fmt])
    except MemoryError:
        raise
    except Image.DecompressionBombError as err:
        # Only reachable if a plugin checks limits we did not foresee; still the user's problem to fix.
        raise InputError(f"{name}: {err}; scale the image down or raise max_image_pixels") from None
    except Exception as err:
        raise InputError(_damaged(name, fmt, err)) from None


def _decode(img: Image.Image, fmt: str, name: str) -> None:
    """Decode the first frame in full, so truncated or corrupt data fails now."""
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as err:
        raise InputError(_damaged(name, fmt, err)) from None


def _describe(
    img: Image.Image, fmt: str, name: str, notes: list[str], *, want_rgb: bool
) -> tuple[ImageInfo, Image.Image | None]:
    """Build the ImageInfo (and, if asked, the RGB image) from a decoded image."""
    frames = getattr(img, "n_frames", 1)
    if isinstance(frames, int) and frames > 1:
        notes.append(f"animated image with {frames} frames: only the first frame is used")
    orientation, orientation_note = _orientation(img)
    notes.extend(orientation_note)
    try:
        rgba = _alpha_version(img)
        if img.mode in _WIDE_MODES:
            notes.append("16-bit image scaled to 8 bits per channel")
        if img.mode == "CMYK":
            notes.append("CMYK colours converted to RGB; they may shift slightly")
        elif img.mode in _PLAIN_NOTES:
            notes.append(_PLAIN_NOTES[img.mode])
        low = rgba.getchannel("A").getextrema()[0] if rgba is not None else 255
        if isinstance(low, int | float) and low < 255:
            notes.append("transparent areas filled with white")
        rgb = _to_rgb(img, rgba, orientation) if want_rgb else None
    except ValueError as err:
        raise InputError(
            f"{name}: its colour mode {img.mode} cannot be converted to RGB ({err}); save it as 8-bit RGB"
        ) from None
    width, height = img.size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    info = ImageInfo(
        width=width,
        height=height,
        format=fmt,
        mode=img.mode,
        frames=frames if isinstance(frames, int) else 1,
        notes=tuple(notes),
    )
    return info, rgb


#: Colour modes converted to RGB as they are, each with what that means for the video.
_PLAIN_NOTES = {
    "P": "palette image converted to RGB",
    "PA": "palette image converted to RGB",
    "L": "greyscale image converted to RGB",
    "LA": "greyscale image converted to RGB",
    "1": "black-and-white (1-bit) image converted to RGB",
}


def _orientation(img: Image.Image) -> tuple[int, list[str]]:
    """The EXIF orientation (1 when absent or unreadable) and a note when it changes the picture."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except MemoryError:
        raise
    except Exception:
        return 1, ["EXIF data could not be read; orientation left as stored"]
    if value not in _TRANSPOSE:
        return 1, []
    return value, [f"EXIF orientation {value} applied: picture {_TRANSPOSE[value][1]}"]


def _alpha_version(img: Image.Image) -> Image.Image | None:
    """An RGBA copy when the image carries alpha or a transparent colour, else None."""
    if img.mode in _ALPHA_MODES or ("transparency" in img.info and img.mode in ("1", "L", "P", "RGB")):
        return img.convert("RGBA")
    return None


def _to_rgb(img: Image.Image, rgba: Image.Image | None, orientation: int) -> Image.Image:
    """First frame as 8-bit RGB, transparency on white, turned upright; always a new image."""
    if img.mode in _WIDE_MODES:
        # Scale 0..65535 to 0..255 with rounding; PIL's own conversion clips instead.
        rgb = img.convert("I").point(lambda v: v * (1 / 257) + 0.5).convert("L").convert("RGB")
    elif rgba is not None:
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        rgb = img.convert("RGB")
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation][0])
    return rgb


def _check_pixels(name: str, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise InputError(
            f"{name}: the image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (setting max_image_pixels); scale it down or raise max_image_pixels"
        )


def _check_min_side(name: str, size: tuple[int, int]) -> None:
    width, height = size
    if min(width, height) < MIN_SIDE:
        raise InputError(
            f"{name}: the image is {width}x{height} pixels; each side must be at least {MIN_SIDE} — use a larger image"
        )


def _webp_canvas_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from a WebP file's first chunk header, or None if it is not one we recognise."""
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def _foreign_message(name: str, head: bytes) -> str:
    """Say what a file that is not PNG, JPEG or WebP really is, when we can tell."""
    what = next((phrase for magic, phrase in _FOREIGN_MAGIC if head.startswith(magic)), None)
    if what is None and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            what = "an AVIF image"
        elif brand in _HEIF_BRANDS:
            what = "a HEIC image"
        else:
            what = "an MP4 or QuickTime video"
    if what is None and head.startswith(b"RIFF"):
        what = "a RIFF file (such as AVI or WAV), not a WebP image"
    if what is None and head.lstrip().startswith((b"<svg", b"<?xml")):
        what = "an SVG or other XML file"
    if what is None:
        return f"{name} is not a PNG, JPEG or WebP image (its content matches none of them); save it as one of those"
    return f"{name} is really {what}; save it as PNG, JPEG or WebP"


def _damaged(name: str, fmt: str, err: Exception) -> str:
    detail = first_line(err)
    if len(detail) > 120:
        detail = detail[:117] + "…"
    return (
        f"{name}: the {_FORMAT_NAME[fmt]} data is damaged or incomplete ({detail}); "
        "export the image again, or wait until it has finished copying"
    )
