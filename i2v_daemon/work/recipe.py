"""A job's recipe inside its mp4: the effective parameters that made the video, where they survive.

The encoder step writes three copies, each surviving something the others do not:

    XMP      a top-level `uuid` box (the XMP UUID of ISO 16684 / XMP part 3), appended to the encoded
             file before it is renamed into place: kept by uploads that strip `udta` but keep the
             file's boxes (Discord today); dropped by any remux.
    SEI      H.264 "user data unregistered" in the first access unit: part of the video stream, so it
             survives a remux (`ffmpeg -c copy -map_metadata -1`); dropped by a re-encode.
    tags     `comment` (the recipe as JSON) and `description` (one sentence) in `udta`, which players
             show; dropped with `udta`.

The same recipe goes into the C2PA manifest as a custom assertion (`provenance.py`). `read` finds the
first copy that is there; `as_sidecar` turns it back into a sidecar that makes the job again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import zlib
from html import escape, unescape
from pathlib import Path
from typing import Any

from i2v_daemon import __version__
from i2v_daemon.params import SCHEDULERS

#: The recipe's format; a reader refuses a newer one it cannot know.
VERSION = 1
#: The XMP box's type: ISO BMFF `uuid` with Adobe's XMP UUID BE7ACFCB-97A9-42E8-9C71-999491E3AFAC.
XMP_UUID = bytes.fromhex("be7acfcb97a942e89c71999491e3afac")
#: Our SEI's UUID (no zero byte in it, so H.264 emulation prevention never splits it).
SEI_UUID = "a8f1f0e4-1c3b-4c55-9f3c-3b1e8a2f0c11"
SEI_PREFIX = b"I2VR1"
#: XMP namespace of the recipe's own properties.
NS = "urn:i2v-daemon:recipe:1/"
#: IPTC's term for media made by a trained model (the label C2PA and the EU AI Act practice use).
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
#: Bytes read at a time while looking for the SEI in the media data.
_CHUNK = 1 << 20
#: How far into a file the SEI is looked for (it is in the first frame; a remux keeps it near the start).
_SEI_SCAN_LIMIT = 64 << 20
#: The most an SEI recipe can take (two 20,000-character prompts, compressed, in base64).
_SEI_MAX_BYTES = 1 << 20

#: Keys of a recipe that a sidecar takes back as they are.
_SIDECAR_KEYS = ("prompt", "negative_prompt", "seed", "width", "height", "num_frames", "steps", "guidance_scale",
                 "fps", "output_fps", "interpolation", "motion", "lora", "lora_scale")


def build(job_name: str, prompt: str, negative_prompt: str, effective: dict[str, Any], *, model_id: str | None,
          input_file: Path | None) -> dict[str, Any]:
    """The recipe of one job from what it actually ran with (its `effective` values)."""
    recipe: dict[str, Any] = {
        "i2v_recipe": VERSION,
        "generator": f"i2v-daemon {__version__}",
        "name": job_name,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
    }
    for key in ("seed", "width", "height", "num_frames", "steps", "guidance_scale", "fps", "output_fps",
                "interpolation", "scheduler", "motion", "lora", "lora_scale"):
        if effective.get(key) is not None:
            recipe[key] = effective[key]
    recipe["model"] = effective.get("model") or "default"
    recipe["model_id"] = model_id
    recipe["family"] = effective.get("family")
    if input_file is not None:
        recipe["input"] = {"name": input_file.name, "sha256": sha256_file(input_file)}
    return recipe


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def summary(recipe: dict[str, Any]) -> str:
    """One sentence for players' `description`: that it is AI-made, by what, and from which prompt."""
    made = f"{recipe.get('width')}x{recipe.get('height')}, {recipe.get('num_frames')} frames"
    model = recipe.get("model_id") or recipe.get("model")
    prompt = " ".join(str(recipe.get("prompt") or "").split()) or "(no prompt)"  # one line, whatever was typed
    return (f"AI-generated video ({recipe.get('generator')}, model {model}, {made}, seed {recipe.get('seed')}): "
            f"{prompt}")


# ---- writing -----------------------------------------------------------------------------------------


def compact(recipe: dict[str, Any]) -> str:
    return json.dumps(recipe, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def xmp_packet(recipe: dict[str, Any]) -> bytes:
    """An XMP packet with the recipe (JSON in i2v:recipe), the prompt, the tool and IPTC's AI label."""
    text = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        f'    xmlns:i2v="{NS}"\n'
        f'    xmp:CreatorTool="{_attr(str(recipe.get("generator", "")))}"\n'
        f'    Iptc4xmpExt:DigitalSourceType="{TRAINED_ALGORITHMIC_MEDIA}">\n'
        f'   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">{_attr(summary(recipe))}</rdf:li></rdf:Alt>'
        '</dc:description>\n'
        f'   <i2v:recipe>{_attr(compact(recipe))}</i2v:recipe>\n'
        '  </rdf:Description>\n'
        ' </rdf:RDF>\n'
        '</x:xmpmeta>\n'
        '<?xpacket end="r"?>'
    )
    return text.encode("utf-8")


def xmp_box(recipe: dict[str, Any]) -> bytes:
    """The top-level ISO BMFF `uuid` box that carries `xmp_packet(recipe)`."""
    payload = XMP_UUID + xmp_packet(recipe)
    return struct.pack(">I4s", 8 + len(payload), b"uuid") + payload


def sei_option(recipe: dict[str, Any]) -> str:
    """ffmpeg's h264_metadata bitstream filter, told to put the recipe into an SEI of the first frame."""
    data = base64.urlsafe_b64encode(zlib.compress(compact(recipe).encode("utf-8"), 9)).decode().rstrip("=")
    return f"h264_metadata=sei_user_data={SEI_UUID}+{SEI_PREFIX.decode()}{data}"


def ffmetadata(recipe: dict[str, Any]) -> str:
    """An FFMETADATA1 file giving the mp4 its `comment` (the recipe) and `description` (one sentence)."""
    return f";FFMETADATA1\ncomment={_ffescape('i2v-recipe ' + compact(recipe))}\n" \
           f"description={_ffescape(summary(recipe))}\n"


def _ffescape(text: str) -> str:
    return re.sub(r"([=;#\\\n])", r"\\\1", text)


def _attr(text: str) -> str:
    """Text safe inside an XML attribute or element; XML 1.0 cannot hold most control characters at all."""
    text = "".join(ch if ch in "\t\n\r" or ord(ch) >= 0x20 else f"\\u{ord(ch):04x}" for ch in text)
    return escape(text, quote=True)


# ---- reading -----------------------------------------------------------------------------------------


def read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The recipe in a video file and where it was found ("xmp", "sei", "comment"); (None, None) if none."""
    with open(path, "rb") as fh:
        found = _from_boxes(fh)
        if found is not None:
            return found
        sei = _from_sei(fh)
    if sei is not None:
        return sei, "sei"
    return None, None


def parse(text: str) -> dict[str, Any] | None:
    """A recipe from its JSON, or None when it is not one (or is from a newer i2v-daemon)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("i2v_recipe"), int) or value["i2v_recipe"] > VERSION:
        return None
    return value


def from_xmp(packet: bytes) -> dict[str, Any] | None:
    match = re.search(rb"<i2v:recipe>(.*?)</i2v:recipe>", packet, re.S)
    return parse(unescape(match.group(1).decode("utf-8", "replace"))) if match else None


def from_sei_payload(data: bytes) -> dict[str, Any] | None:
    """The recipe from the SEI's string (what follows its UUID), or None."""
    if not data.startswith(SEI_PREFIX):
        return None
    match = re.match(rb"[A-Za-z0-9_-]+", data[len(SEI_PREFIX):])
    if not match:
        return None
    text = match.group(0)
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4)))
    except (binascii.Error, zlib.error, ValueError):
        return None
    return parse(raw.decode("utf-8", "replace"))


def _from_boxes(fh: Any) -> tuple[dict[str, Any], str] | None:
    """The XMP `uuid` box at the top level, else the `comment` tag in moov/udta."""
    fh.seek(0, 2)
    total = fh.tell()
    pos = 0
    comment: dict[str, Any] | None = None
    while pos + 8 <= total:
        fh.seek(pos)
        head = fh.read(16)
        size, kind = struct.unpack(">I4s", head[:8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", head[8:16])[0]
            header = 16
        elif size == 0:
            size = total - pos
        if size < header or pos + size > total:
            break
        if kind == b"uuid" and size - header <= 16 << 20:
            fh.seek(pos + header)
            body = fh.read(size - header)
            if body[:16] == XMP_UUID:
                recipe = from_xmp(body[16:])
                if recipe is not None:
                    return recipe, "xmp"
        elif kind == b"moov" and size <= 256 << 20:
            fh.seek(pos + header)
            comment = _comment(fh.read(size - header))
        pos += size
    return (comment, "comment") if comment is not None else None


def _comment(moov: bytes) -> dict[str, Any] | None:
    """The recipe in the iTunes `©cmt` tag (moov/udta/meta/ilst/©cmt/data)."""
    at = moov.find(b"\xa9cmt")
    while at >= 0:
        data_at = moov.find(b"data", at)
        if data_at > 0:
            size = struct.unpack(">I", moov[data_at - 4:data_at])[0]
            text = moov[data_at + 12:data_at - 4 + size].decode("utf-8", "replace")
            if text.startswith("i2v-recipe "):
                return parse(text.removeprefix("i2v-recipe "))
        at = moov.find(b"\xa9cmt", at + 4)
    return None


def _from_sei(fh: Any) -> dict[str, Any] | None:
    """Look for our SEI's UUID in the file (it sits in the first frame's NAL units) and decode what follows."""
    needle = bytes.fromhex(SEI_UUID.replace("-", ""))
    start = 0  # the file offset of buf[0]
    carry = b""
    while start < _SEI_SCAN_LIMIT:
        fh.seek(start + len(carry))
        chunk = fh.read(_CHUNK)
        if not chunk:
            return None
        buf = carry + chunk
        at = buf.find(needle)
        while at >= 0:
            fh.seek(start + at + 16)
            recipe = from_sei_payload(_unescape(fh.read(_SEI_MAX_BYTES)))
            if recipe is not None:
                return recipe
            at = buf.find(needle, at + 1)
        keep = len(needle) - 1
        start += len(buf) - keep
        carry = buf[-keep:]
    return None


def _unescape(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


# ---- back to a sidecar ---------------------------------------------------------------------------------


def as_sidecar(recipe: dict[str, Any]) -> dict[str, Any]:
    """A sidecar (.json) that makes the same job again from the same image: every value explicit."""
    out = {k: recipe[k] for k in _SIDECAR_KEYS if recipe.get(k) is not None}
    out.setdefault("prompt", "")
    if not out.get("negative_prompt"):
        out.pop("negative_prompt", None)
    if "fps" in out:
        out.setdefault("output_fps", out["fps"])  # a preset's own output_fps must not add an interpolation
    if out.get("output_fps") == out.get("fps"):
        out.pop("interpolation", None)
    scheduler = recipe.get("scheduler")
    if scheduler in SCHEDULERS and scheduler != "default":
        out["scheduler"] = scheduler
    if recipe.get("model") not in (None, "default"):
        out["model"] = recipe["model"]
    return out
