"""Read and check the sidecar (`S.txt`, `S.json`, `S.toml`) that carries a job's prompt and settings."""

from __future__ import annotations

import codecs
import datetime as dt
import difflib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .choices import lora_name_problem
from .errors import InputError
from .fsutil import open_regular

SIDECAR_SUFFIXES = (".txt", ".json", ".toml")
DEFAULT_MAX_BYTES = 65536
MAX_TEXT_CHARS = 20_000

KEYS = (
    "prompt",
    "negative_prompt",
    "preset",
    "resolution",
    "width",
    "height",
    "num_frames",
    "steps",
    "guidance_scale",
    "fps",
    "seed",
    "priority",
    "model",
    "motion",
    "lora",
    "lora_scale",
)
STRING_KEYS = ("prompt", "negative_prompt", "preset", "model", "lora")
#: Inclusive bounds of every whole-number key.
INT_RANGES: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "resolution": (64, 2048),
        "width": (64, 4096),
        "height": (64, 4096),
        "num_frames": (1, 512),
        "steps": (1, 1000),
        "fps": (1, 120),
        "seed": (0, 2**63 - 1),
        "priority": (-1000, 1000),
    }
)
INT_KEYS = tuple(INT_RANGES)
#: Inclusive bounds of every key that takes any finite number.
FLOAT_RANGES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {"guidance_scale": (0.0, 50.0), "motion": (0.0, 1.0), "lora_scale": (-4.0, 4.0)}
)
FLOAT_KEYS = tuple(FLOAT_RANGES)

# Names other tools use for our keys: offered as suggestions only, never accepted.
_ALIASES = MappingProxyType(
    {
        "cfg": "guidance_scale",
        "cfg_scale": "guidance_scale",
        "num_inference_steps": "steps",
        "frame_rate": "fps",
        "framerate": "fps",
        "frames": "num_frames",
        "negative": "negative_prompt",
        "size": "resolution",
        "motion_bucket_id": "motion",
        "checkpoint": "model",
        "lora_weight": "lora_scale",
        "lora_strength": "lora_scale",
    }
)

# UTF-32 LE starts with the UTF-16 LE mark, so it must be tested first.
_FOREIGN_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


@dataclass(frozen=True)
class Sidecar:
    """A checked sidecar: the prompt, the other keys the user set, and notes for the job's log."""

    prompt: str
    values: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A read-only view keeps the frozen value frozen all the way down.
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))


class _Bad(Exception):
    """A problem in the sidecar, worded without the file name (added once, at the edge)."""


def parse_sidecar(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Sidecar:
    """Read one sidecar file (regular files only, at most `max_bytes`) and check it."""
    name = path.name
    with open_regular(path) as (fh, size):
        if size > max_bytes:
            raise InputError(_too_big(name, f"{size:,} bytes", max_bytes))
        # Bounded read: the file may have grown since fstat.
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(_too_big(name, f"more than {max_bytes:,} bytes", max_bytes))
    return parse_sidecar_bytes(data, path.suffix, name=name)


def parse_sidecar_bytes(data: bytes, suffix: str, *, name: str = "sidecar") -> Sidecar:
    """Check a sidecar's bytes, read as `.txt`, `.json` or `.toml` by `suffix`; raise InputError."""
    kind = suffix.lower()
    if kind not in SIDECAR_SUFFIXES:
        raise InputError(f"{name}: a sidecar must end in .txt, .json or .toml, not {suffix!r}; rename it")
    try:
        text, notes = _decode_utf8(data)
        if kind == ".txt":
            prompt = _text("prompt", text, kind)
            return Sidecar(prompt=prompt, values={}, notes=notes + _empty_prompt_note(prompt))
        table = _load_json(text) if kind == ".json" else _load_toml(text)
        return _from_table(table, kind, notes)
    except _Bad as err:
        raise InputError(f"{name}: {err}") from None


def _too_big(name: str, size: str, max_bytes: int) -> str:
    return (
        f"{name}: the sidecar is {size}, over the limit of {max_bytes:,} bytes (max_sidecar_bytes); "
        "a prompt needs only a few kilobytes — shorten it"
    )


def _decode_utf8(data: bytes) -> tuple[str, tuple[str, ...]]:
    """Strict UTF-8, with a leading UTF-8 byte-order mark dropped and noted."""
    for bom, encoding in _FOREIGN_BOMS:
        if data.startswith(bom):
            raise _Bad(
                f"the file is saved as {encoding} (it starts with a {encoding} byte-order mark); save it as UTF-8"
            )
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    notes = ("UTF-8 byte-order mark ignored",) if start else ()
    nul = data.find(b"\0", start)
    if nul >= 0:
        raise _Bad(
            f"contains a NUL byte at byte offset {nul}, so it looks like UTF-16 or binary data; save it as UTF-8 text"
        )
    try:
        return data[start:].decode("utf-8"), notes
    except UnicodeDecodeError as err:
        offset = start + err.start
        raise _Bad(f"byte 0x{data[offset]:02x} at byte offset {offset} is not valid UTF-8; save it as UTF-8") from None


def _reject_constant(token: str) -> Any:
    """json.loads hook: NaN and the infinities are not JSON, whatever Python's parser allows."""
    raise _Bad(f"{token} is not allowed in JSON; write a finite number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads hook: a key given twice is a mistake, not 'last one wins'."""
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise _Bad(f"key {_clip(key)} appears more than once; keep only one")
        table[key] = value
    return table


def _load_json(text: str) -> Any:
    """Parse strict JSON; say where a syntax error is."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise _Bad(f"not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix it") from None
    except RecursionError:
        raise _Bad("not valid here: values are nested too deeply; use one flat object") from None
    except ValueError:
        # Python refuses integers of more than 4300 digits (int_max_str_digits).
        raise _Bad("a number in it has far too many digits; fix it") from None


def _load_toml(text: str) -> Any:
    """Parse TOML; tomllib's messages already give line and column."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _Bad(f"not valid TOML: {err}; fix it") from None
    except RecursionError:
        raise _Bad("not valid here: values are nested too deeply; use plain key = value lines") from None
    except ValueError:
        raise _Bad("a number in it has far too many digits; fix it") from None


def _from_table(table: Any, kind: str, notes: tuple[str, ...]) -> Sidecar:
    """Check a parsed JSON/TOML document against the contract's keys, types and ranges."""
    if not isinstance(table, dict):
        raise _Bad(f'the file must hold one JSON object such as {{"prompt": "..."}}, got {_describe(table, kind)}')
    unknown = [key for key in table if key not in KEYS]
    if unknown:
        raise _Bad(_unknown_key_message(unknown))
    if "prompt" not in table:
        example = '"prompt": "the cat turns its head"' if kind == ".json" else 'prompt = "the cat turns its head"'
        raise _Bad(f"'prompt' is missing; add a line like {example}")
    prompt = _text("prompt", table["prompt"], kind)
    values: dict[str, Any] = {}
    for key in KEYS[1:]:
        if key in table:
            values[key] = _check_value(key, table[key], kind)
    if ("width" in values) != ("height" in values):
        given, missing = ("width", "height") if "width" in values else ("height", "width")
        raise _Bad(f"'{given}' is set but '{missing}' is not; set both, or neither and use 'resolution'")
    if "lora_scale" in values and "lora" not in values:
        raise _Bad("'lora_scale' is set but 'lora' is not; name the LoRA file with 'lora', or remove 'lora_scale'")
    return Sidecar(prompt=prompt, values=values, notes=notes + _empty_prompt_note(prompt))


def _check_value(key: str, value: Any, kind: str) -> Any:
    """One key's value, checked and normalised (guidance_scale becomes a float)."""
    if key in INT_RANGES:
        return _whole_number(key, value, kind)
    if key in FLOAT_RANGES:
        return _number(key, value, kind)
    return _text(key, value, kind)


def _whole_number(key: str, value: Any, kind: str) -> int:
    low, high = INT_RANGES[key]
    # bool is an int subclass and 16.0 is a float: neither is a whole number the user meant.
    if type(value) is not int or not low <= value <= high:
        raise _Bad(f"'{key}' must be a whole number between {low} and {high}, got {_describe(value, kind)}")
    return value


def _number(key: str, value: Any, kind: str) -> float:
    low, high = FLOAT_RANGES[key]
    ok = type(value) in (int, float) and (type(value) is int or math.isfinite(value))
    # Compare before float(): a huge int would overflow it.
    if not ok or not low <= value <= high:
        raise _Bad(f"'{key}' must be a number between {low:g} and {high:g}, got {_describe(value, kind)}")
    return float(value)


def _text(key: str, value: Any, kind: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"'{key}' must be text in quotes, got {_describe(value, kind)}")
    value = value.strip()
    if len(value) > MAX_TEXT_CHARS:
        raise _Bad(f"'{key}' is {len(value):,} characters long; the limit is {MAX_TEXT_CHARS:,} — shorten it")
    if "\0" in value:
        raise _Bad(f"'{key}' contains a NUL character (\\u0000); remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        # JSON's \ud800-style escapes can smuggle in half a character that nothing downstream can store.
        raise _Bad(
            f"'{key}' contains an unpaired surrogate \\u{ord(value[err.start]):04x} at character {err.start}; "
            "remove it or write the whole character"
        ) from None
    if key == "preset" and not value:
        raise _Bad("'preset' must name a preset such as 'fast', 'standard' or 'high', got an empty string")
    if key == "model" and not value:
        raise _Bad("'model' must name one of the config's models, such as 'default', got an empty string")
    if key == "lora":
        problem = lora_name_problem(value)
        if problem:
            raise _Bad(f"'lora' {problem}, got {_clip(value)}")
    return value


def _empty_prompt_note(prompt: str) -> tuple[str, ...]:
    return () if prompt else ("the prompt is empty; the video follows the image alone",)


def _unknown_key_message(unknown: list[str]) -> str:
    key = unknown[0]
    more = f" (and {len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
    guess = _ALIASES.get(key.lower()) or next(iter(difflib.get_close_matches(key.lower(), KEYS, n=1)), None)
    if guess:
        return f"unknown key {_clip(key)} — did you mean '{guess}'?{more}"
    return f"unknown key {_clip(key)}{more}; the keys are {', '.join(KEYS)}"


def _describe(value: Any, kind: str) -> str:
    """How a value reads in the user's own format, short enough for one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "…"
    if isinstance(value, dict):
        return "an object" if kind == ".json" else "a table"
    if isinstance(value, list):
        return "a list" if kind == ".json" else "an array"
    if isinstance(value, dt.date | dt.time):
        return "a date/time"
    return f"a {type(value).__name__}"


def _clip(text: str, limit: int = 40) -> str:
    """repr() of text, cut short; repr also escapes newlines and lone surrogates."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "…"
