"""Read and check the sidecar (`S.txt`, `S.json`, `S.toml`) that carries a job's prompt and settings."""

from __future__ import annotations

import codecs
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from i2v_daemon import params
from i2v_daemon.errors import InputError
from i2v_daemon.fsutil import open_regular
from i2v_daemon.params import MAX_TEXT_CHARS, clip, describe

__all__ = [
    "FLOAT_RANGES", "INT_RANGES", "KEYS", "MAX_TEXT_CHARS", "SIDECAR_SUFFIXES", "Sidecar", "parse_sidecar",
    "parse_sidecar_bytes", "parse_values",
]

SIDECAR_SUFFIXES = (".txt", ".json", ".toml")
DEFAULT_MAX_BYTES = 65536

#: The keys, their bounds and their friendly messages come from the one parameter schema.
KEYS = params.KEYS
INT_RANGES: Mapping[str, tuple[int, int]] = MappingProxyType(params.INT_RANGES)
FLOAT_RANGES: Mapping[str, tuple[float, float]] = MappingProxyType(params.FLOAT_RANGES)
INT_KEYS = tuple(INT_RANGES)
FLOAT_KEYS = tuple(FLOAT_RANGES)

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


_Bad = params.Bad  # a problem in the sidecar, worded without the file name (added once, at the edge)


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
            raise _Bad(f"key {clip(key)} appears more than once; keep only one")
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
    """Check a parsed JSON/TOML document against the one parameter schema."""
    if not isinstance(table, dict):
        raise _Bad(f'the file must hold one JSON object such as {{"prompt": "..."}}, got {describe(table, kind)}')
    values = params.check_values(table, kind)
    if "prompt" not in values:
        example = '"prompt": "the cat turns its head"' if kind == ".json" else 'prompt = "the cat turns its head"'
        raise _Bad(f"'prompt' is missing; add a line like {example}")
    prompt = values.pop("prompt")
    return Sidecar(prompt=prompt, values=values, notes=notes + _empty_prompt_note(prompt))


def parse_values(table: Any, *, name: str = "params") -> Sidecar:
    """The API's `params` (an already parsed JSON object), checked exactly as a `.json` sidecar is."""
    try:
        return _from_table(table, ".json", ())
    except _Bad as err:
        raise InputError(f"{name}: {err}") from None


def _text(key: str, value: Any, kind: str) -> str:
    """A `.txt` sidecar's prompt, checked like the prompt key of a `.json` one."""
    if not isinstance(value, str):
        raise _Bad(f"'{key}' must be text in quotes, got {describe(value, kind)}")
    text: str = params.check_values({key: value}, kind)[key]
    return text


def _empty_prompt_note(prompt: str) -> tuple[str, ...]:
    return () if prompt else ("the prompt is empty; the video follows the image alone",)
