"""Image checks: every accepted kind of picture, every refusal, and the pixel cap read from the header."""

from __future__ import annotations

import io
import os
import random
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from i2v_daemon.errors import InputError
from i2v_daemon.intake.images import IMAGE_SUFFIXES, ImageInfo, _webp_canvas_size, inspect_image, load_rgb
from tests.conftest import finishes

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def save(img: Image.Image, path: Path, fmt: str | None = None, **options: object) -> Path:
    img.save(path, fmt, **options)
    return path


def refuse(path: Path, **kwargs: int) -> str:
    """inspect_image and load_rgb must both refuse the file; return the message, checked for form."""
    with pytest.raises(InputError) as caught:
        inspect_image(path, **kwargs)
    with pytest.raises(InputError) as again:
        load_rgb(path, **kwargs)
    message = str(caught.value)
    assert message == str(again.value)
    assert message.startswith(path.name)
    assert "\n" not in message
    return message


def close_to(pixel: tuple[int, ...], expected: tuple[int, ...], slack: int = 40) -> bool:
    return all(abs(a - b) <= slack for a, b in zip(pixel, expected, strict=True))


def noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Incompressible pixels, so that cutting the file short really cuts the image data."""
    rng = random.Random(7)
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * len(mode)))


def png_with_declared_size(tmp_path: Path, width: int, height: int) -> Path:
    """A small real PNG whose IHDR claims another size (CRC fixed), as a decompression bomb would."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    # Signature (8) + IHDR length (4) + b"IHDR" (4): width and height follow.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    return path


# --- accepted ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_each_supported_format_is_inspected_and_loaded(tmp_path: Path, suffix: str, fmt: str) -> None:
    path = save(Image.new("RGB", (64, 48), RED), tmp_path / f"cat{suffix}", fmt)
    assert inspect_image(path) == ImageInfo(width=64, height=48, format=fmt, mode="RGB", frames=1, notes=())
    rgb, notes = load_rgb(path)
    assert (rgb.mode, rgb.size, notes) == ("RGB", (64, 48), ())
    assert close_to(rgb.getpixel((10, 10)), RED)


def test_the_suffix_list_is_the_contracts() -> None:
    assert IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".webp")


def test_an_upper_case_extension_is_no_mismatch(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (32, 32)), tmp_path / "CAT.JPG", "JPEG")
    assert inspect_image(path).notes == ()


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    img = Image.new("I;16", (32, 32))
    for x, value in enumerate([0, 257, 32896, 65535]):
        img.putpixel((x, 0), value)
    path = save(img, tmp_path / "deep.png")
    info = inspect_image(path)
    assert info.mode.startswith("I")
    assert "16-bit image scaled to 8 bits per channel" in info.notes
    rgb, _ = load_rgb(path)
    assert [rgb.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_a_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), tmp_path / "print.jpg")
    info = inspect_image(path)
    assert info.mode == "CMYK"
    assert any("CMYK" in note for note in info.notes)
    rgb, _ = load_rgb(path)
    assert close_to(rgb.getpixel((5, 5)), RED, slack=60)


def test_a_palette_png_with_a_transparent_index_is_put_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([*RED, *BLUE])
    img.putpixel((0, 0), 1)
    path = save(img, tmp_path / "pal.png", transparency=1)
    info = inspect_image(path)
    assert info.mode == "P"
    assert "transparent areas filled with white" in info.notes
    rgb, _ = load_rgb(path)
    assert rgb.getpixel((0, 0)) == WHITE
    assert rgb.getpixel((1, 1)) == RED


def test_an_rgba_png_is_composited_onto_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 255, 0))
    img.putpixel((1, 0), (255, 0, 0, 128))
    path = save(img, tmp_path / "alpha.png")
    rgb, notes = load_rgb(path)
    assert "transparent areas filled with white" in notes
    assert rgb.getpixel((0, 0)) == WHITE
    assert close_to(rgb.getpixel((1, 0)), (255, 127, 127), slack=2)
    assert rgb.getpixel((5, 5)) == RED


def test_an_opaque_rgba_image_gets_no_transparency_note(tmp_path: Path) -> None:
    path = save(Image.new("RGBA", (32, 32), (1, 2, 3, 255)), tmp_path / "opaque.webp", lossless=True)
    rgb, notes = load_rgb(path)
    assert notes == ()
    assert rgb.getpixel((0, 0)) == (1, 2, 3)


def test_an_la_png_is_composited_onto_white(tmp_path: Path) -> None:
    img = Image.new("LA", (32, 32), (0, 255))
    img.putpixel((0, 0), (0, 0))
    path = save(img, tmp_path / "la.png")
    assert inspect_image(path).mode == "LA"
    rgb, _ = load_rgb(path)
    assert rgb.getpixel((0, 0)) == WHITE
    assert rgb.getpixel((3, 3)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["1", "L"])
def test_bilevel_and_grey_pngs_become_rgb(tmp_path: Path, mode: str) -> None:
    img = Image.new(mode, (32, 32), 0)
    img.putpixel((0, 0), 255 if mode == "L" else 1)
    path = save(img, tmp_path / f"grey-{mode}.png")
    assert inspect_image(path).mode == mode
    rgb, notes = load_rgb(path)
    assert (rgb.mode, rgb.getpixel((0, 0)), rgb.getpixel((1, 1))) == ("RGB", WHITE, (0, 0, 0))
    assert notes == ({"1": "black-and-white (1-bit) image", "L": "greyscale image"}[mode] + " converted to RGB",)


def test_an_opaque_palette_png_becomes_rgb_and_says_so(tmp_path: Path) -> None:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([*RED, *BLUE])
    rgb, notes = load_rgb(save(img, tmp_path / "pal.png"))
    assert rgb.getpixel((1, 1)) == RED and notes == ("palette image converted to RGB",)


@pytest.mark.parametrize(("suffix", "options"), [(".webp", {"lossless": True}), (".png", {})])
def test_an_animated_image_is_accepted_and_its_first_frame_used(
    tmp_path: Path, suffix: str, options: dict[str, object]
) -> None:
    frames = [Image.new("RGB", (32, 32), color) for color in (RED, GREEN, BLUE)]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **options)
    info = inspect_image(path)
    assert info.frames == 3
    assert "animated image with 3 frames: only the first frame is used" in info.notes
    rgb, _ = load_rgb(path)
    assert rgb.getpixel((5, 5)) == RED


def test_exif_orientation_6_swaps_width_and_height_and_turns_the_picture(tmp_path: Path) -> None:
    img = Image.new("RGB", (64, 32), RED)
    img.paste(BLUE, (32, 0, 64, 32))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(img, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    info = inspect_image(path)
    assert (info.width, info.height) == (32, 64)
    assert any(note.startswith("EXIF orientation 6 applied") for note in info.notes)
    rgb, _ = load_rgb(path)
    assert rgb.size == (32, 64)
    # Orientation 6 means "turn 90° clockwise to view": the stored left edge becomes the top.
    assert close_to(rgb.getpixel((16, 5)), RED)
    assert close_to(rgb.getpixel((16, 58)), BLUE)


def test_exif_orientation_1_is_no_change_and_no_note(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    path = save(Image.new("RGB", (64, 32)), tmp_path / "upright.jpg", exif=exif.tobytes())
    info = inspect_image(path)
    assert (info.width, info.height, info.notes) == (64, 32, ())


def test_a_jpeg_named_png_is_accepted_with_a_note(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (32, 32), GREEN), tmp_path / "cat.png", "JPEG")
    info = inspect_image(path)
    assert info.format == "JPEG"
    assert info.notes == ("cat.png holds a JPEG image despite its .png extension; read it as one",)
    assert close_to(load_rgb(path)[0].getpixel((3, 3)), GREEN)


def test_the_loaded_image_outlives_its_file(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (32, 32), BLUE), tmp_path / "gone.png")
    rgb, _ = load_rgb(path)
    path.unlink()
    assert rgb.getpixel((0, 0)) == BLUE
    assert rgb.copy().size == (32, 32)


# --- refused: content --------------------------------------------------------------------------------


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"")
    assert "the file is empty (0 bytes)" in refuse(path)


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "cat.jpg"
    path.write_bytes(b"\x13\x37" + random.Random(1).randbytes(4000))
    assert refuse(path) == (
        "cat.jpg is not a PNG, JPEG or WebP image (its content matches none of them); save it as one of those"
    )


@pytest.mark.parametrize(("fmt", "what"), [("GIF", "a GIF image"), ("BMP", "a BMP image"), ("TIFF", "a TIFF image")])
def test_another_format_under_an_image_name_is_named(tmp_path: Path, fmt: str, what: str) -> None:
    path = save(Image.new("RGB", (32, 32)), tmp_path / "cat.png", fmt)
    assert refuse(path) == f"cat.png is really {what}; save it as PNG, JPEG or WebP"


def test_a_heic_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cat.jpg"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    assert refuse(path) == "cat.jpg is really a HEIC image; save it as PNG, JPEG or WebP"


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")])
def test_a_truncated_image_is_refused(tmp_path: Path, suffix: str, fmt: str) -> None:
    buffer = io.BytesIO()
    noise((128, 128)).save(buffer, fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    message = refuse(path)
    assert "data is damaged or incomplete" in message
    assert "export the image again" in message


def test_a_truncated_png_is_refused_even_if_another_library_allowed_truncation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    buffer = io.BytesIO()
    noise((128, 128)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:-5000])
    assert "damaged or incomplete" in refuse(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_a_png_signature_followed_by_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(2).randbytes(500))
    assert "the PNG data is damaged or incomplete" in refuse(path)


def test_an_image_under_16_pixels_a_side_is_refused(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (15, 400)), tmp_path / "thin.png")
    assert "the image is 15x400 pixels; each side must be at least 16" in refuse(path)


# --- refused: the pixel cap -------------------------------------------------------------------------------


def test_a_png_declaring_ten_billion_pixels_is_refused_from_its_header(tmp_path: Path) -> None:
    path = png_with_declared_size(tmp_path, 100_000, 100_000)
    raised = finishes(lambda: inspect_image(path), seconds=5)
    assert isinstance(raised, InputError)
    assert str(raised) == (
        "bomb.png: the image is 100000x100000 = 10,000,000,000 pixels, over the limit of 40,000,000 "
        "(setting max_image_pixels); scale it down or raise max_image_pixels"
    )


def test_a_webp_declaring_a_huge_canvas_is_refused_before_pil_reads_it(tmp_path: Path) -> None:
    chunk = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (16382).to_bytes(3, "little") * 2
    path = tmp_path / "bomb.webp"
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk)
    assert "16383x16383 = 268,402,689 pixels" in refuse(path)


def test_the_cap_is_a_parameter(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (64, 64)), tmp_path / "cat.png")
    assert inspect_image(path, max_pixels=4096).width == 64
    assert "64x64 = 4,096 pixels, over the limit of 4,095" in refuse(path, max_pixels=4095)


def test_our_cap_governs_not_pils_own_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With PIL's limit at 100 pixels, Image.open alone would raise DecompressionBombError on 64x64.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = save(Image.new("RGB", (64, 64), RED), tmp_path / "cat.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert inspect_image(path).width == 64
        assert load_rgb(path)[0].getpixel((0, 0)) == RED
    assert Image.MAX_IMAGE_PIXELS == 100  # restored


def test_webp_canvas_sizes_are_read_from_all_three_headers(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    cases = {"lossy": {}, "lossless": {"lossless": True}, "extended": {"exif": exif.tobytes()}}
    for label, options in cases.items():
        buffer = io.BytesIO()
        Image.new("RGB", (300, 77)).save(buffer, "WEBP", **options)
        assert _webp_canvas_size(buffer.getvalue()[:64]) == (300, 77), label


# --- refused: not a regular file ----------------------------------------------------------------------


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    target = save(Image.new("RGB", (32, 32)), tmp_path / "real.png")
    link = tmp_path / "cat.png"
    link.symlink_to(target)
    assert refuse(link).startswith("cat.png: is a symbolic link")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "cat.png"
    os.mkfifo(fifo)
    for call in (inspect_image, load_rgb):
        raised = finishes(lambda call=call: call(fifo))
        assert isinstance(raised, InputError)
        assert str(raised).startswith("cat.png: is a named pipe (FIFO)")


def test_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cat.png").mkdir()
    assert refuse(tmp_path / "cat.png") == "cat.png: is a folder, not a file"


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    assert "the file is gone" in refuse(tmp_path / "cat.png")


# --- robustness --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupted_images_give_an_image_or_an_input_error_never_another_exception(tmp_path: Path) -> None:
    bases = []
    for fmt, options in [("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("WEBP", {"lossless": True})]:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), GREEN).save(buffer, fmt, **options)
        bases.append(buffer.getvalue())
    rng = random.Random(3)
    path = tmp_path / "fuzz.png"
    for _ in range(400):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            pos = rng.randrange(len(data))
            if rng.random() < 0.7:
                data[pos] = rng.randrange(256)
            else:
                del data[pos : pos + rng.randint(1, 40)]
        path.write_bytes(bytes(data))
        try:
            rgb, _ = load_rgb(path)
            assert rgb.mode == "RGB"
        except InputError as err:
            assert "\n" not in str(err)
