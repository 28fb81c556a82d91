"""Reading an mp4's video track from its boxes (ISO/IEC 14496-12): size, frame count, rate, codec, chroma.

The worker checks every video it writes this way instead of decoding it again with a second
ffmpeg: the sample table (`stsz`) is what the encoder wrote, one sample per frame.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

#: Boxes we descend into on the way to the video track's sample table.
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}
#: H.264 profiles whose SPS carries chroma_format_idc (the others are 4:2:0 by definition).
_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}
_CHROMA = {0: "gray", 1: "yuv420p", 2: "yuv422p", 3: "yuv444p"}


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each box in data[start:end]."""
    out = []
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"a broken {kind!r} box at byte {pos}")
        out.append((kind, pos + header, pos + size))
        pos += size
    return out


def _find_moov(fh: BinaryIO) -> bytes:
    """The moov box's payload, read without loading the media data."""
    fh.seek(0, 2)
    total = fh.tell()
    pos = 0
    while pos + 8 <= total:
        fh.seek(pos)
        size, kind = struct.unpack(">I4s", fh.read(8))
        header = 8
        if size == 1:
            size = struct.unpack(">Q", fh.read(8))[0]
            header = 16
        elif size == 0:
            size = total - pos
        if size < header:
            raise ValueError(f"a broken {kind!r} box at byte {pos}")
        if kind == b"moov":
            fh.seek(pos + header)
            return fh.read(size - header)
        pos += size
    raise ValueError("no moov box (the file is incomplete)")


def read_video_track(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        moov = _find_moov(fh)
    for kind, start, end in _boxes(moov):
        if kind != b"trak":
            continue
        track = _track(moov, start, end)
        if track is not None:
            return track
    raise ValueError("no video track")


def _track(data: bytes, start: int, end: int) -> dict[str, Any] | None:
    found: dict[bytes, tuple[int, int]] = {}

    def walk(s: int, e: int) -> None:
        for kind, a, b in _boxes(data, s, e):
            found.setdefault(kind, (a, b))
            if kind in _CONTAINERS:
                walk(a, b)

    walk(start, end)
    if b"hdlr" not in found or data[found[b"hdlr"][0] + 8:found[b"hdlr"][0] + 12] != b"vide":
        return None
    a, _ = found[b"tkhd"]
    version = data[a]
    off = a + (96 if version == 1 else 84)  # width and height are the last two 16.16 fields
    width, height = (v >> 16 for v in struct.unpack(">II", data[off - 8:off]))
    a, _ = found[b"mdhd"]
    version = data[a]
    if version == 1:
        timescale, duration = struct.unpack(">IQ", data[a + 20:a + 32])
    else:
        timescale, duration = struct.unpack(">II", data[a + 12:a + 20])
    a, _ = found[b"stsz"]
    _sample_size, count = struct.unpack(">II", data[a + 4:a + 12])
    a, _ = found[b"stts"]
    entries = struct.unpack(">I", data[a + 4:a + 8])[0]
    deltas = [struct.unpack(">II", data[a + 8 + 8 * i:a + 16 + 8 * i]) for i in range(min(entries, 64))]
    main_delta = max(deltas, key=lambda d: d[0])[1] if deltas else 0
    a, b = found[b"stsd"]
    codec, pix_fmt = _sample_entry(data, a + 8, b)
    return {
        "width": width, "height": height, "num_frames": count,
        "fps": round(timescale / main_delta, 3) if main_delta else None,
        "codec": codec, "pix_fmt": pix_fmt, "duration_seconds": round(duration / timescale, 3) if timescale else None,
    }


def _sample_entry(data: bytes, start: int, end: int) -> tuple[str, str | None]:
    entry = _boxes(data, start, end)[0]
    kind, a, b = entry
    codec = {b"avc1": "h264", b"avc3": "h264", b"hvc1": "hevc", b"hev1": "hevc"}.get(kind, kind.decode("latin-1"))
    if codec != "h264":
        return codec, None
    for sub, s, _e in _boxes(data, a + 78, b):  # the visual sample entry's fixed fields are 78 bytes
        if sub == b"avcC":
            return codec, _chroma(data, s)
    return codec, None


def _chroma(data: bytes, at: int) -> str | None:
    """chroma_format_idc of the first SPS in an avcC record."""
    profile = data[at + 1]
    if profile not in _HIGH_PROFILES:
        return "yuv420p"
    n_sps = data[at + 5] & 0x1F
    if not n_sps:
        return None
    length = struct.unpack(">H", data[at + 6:at + 8])[0]
    sps = _unescape(data[at + 8:at + 8 + length])
    bits = _Bits(sps[4:])  # after the NAL header, profile_idc, constraint flags and level_idc
    bits.ue()  # seq_parameter_set_id
    return _CHROMA.get(bits.ue())


def _unescape(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def bit(self) -> int:
        byte = self.data[self.pos // 8]
        value = (byte >> (7 - self.pos % 8)) & 1
        self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("a broken exp-Golomb code in the SPS")
        value = 1
        for _ in range(zeros):
            value = value << 1 | self.bit()
        return value - 1
