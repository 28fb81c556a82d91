"""Sidecar parsing: the three formats, every rejection's message, and properties over arbitrary input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from i2v_daemon.errors import InputError
from i2v_daemon.intake.sidecar import (
    FLOAT_RANGES,
    INT_RANGES,
    KEYS,
    MAX_TEXT_CHARS,
    SIDECAR_SUFFIXES,
    Sidecar,
    parse_sidecar,
    parse_sidecar_bytes,
)
from tests.conftest import finishes

FULL_JSON = {
    "prompt": "  the cat turns its head  ",
    "negative_prompt": "blurry",
    "preset": "high",
    "resolution": 512,
    "width": 640,
    "height": 384,
    "num_frames": 16,
    "steps": 30,
    "guidance_scale": 7,
    "fps": 8,
    "seed": 2**63 - 1,
    "priority": -5,
}


def reject(data: bytes | str, suffix: str = ".json", name: str = "cat.json") -> str:
    """Parse and return the InputError's message, failing if it parses or raises anything else."""
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(InputError) as caught:
        parse_sidecar_bytes(raw, suffix, name=name)
    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message
    return message


def json_with(**values: Any) -> str:
    return json.dumps({"prompt": "a cat", **values})


# --- the three formats, good ---------------------------------------------------------------


def test_a_txt_sidecar_is_the_trimmed_prompt() -> None:
    sidecar = parse_sidecar_bytes(b"\n  a cat turns its head\r\n\n", ".txt")
    assert sidecar == Sidecar(prompt="a cat turns its head", values={}, notes=())


def test_a_json_sidecar_with_every_key_is_accepted() -> None:
    sidecar = parse_sidecar_bytes(json.dumps(FULL_JSON).encode(), ".json")
    assert sidecar.prompt == "the cat turns its head"
    expected = {k: v for k, v in FULL_JSON.items() if k != "prompt"} | {"guidance_scale": 7.0}
    assert dict(sidecar.values) == expected
    assert isinstance(sidecar.values["guidance_scale"], float)
    assert sidecar.notes == ()


def test_a_toml_sidecar_is_accepted() -> None:
    text = 'prompt = """\nwaves roll in\n"""\nnegative_prompt = "text"\nsteps = 20\nguidance_scale = 9.5\nseed = 0\n'
    sidecar = parse_sidecar_bytes(text.encode(), ".toml")
    assert sidecar.prompt == "waves roll in"
    assert dict(sidecar.values) == {"negative_prompt": "text", "steps": 20, "guidance_scale": 9.5, "seed": 0}


def test_only_keys_the_user_set_appear_in_values() -> None:
    assert dict(parse_sidecar_bytes(b'{"prompt": "x"}', ".json").values) == {}


def test_the_suffix_is_case_insensitive() -> None:
    assert parse_sidecar_bytes(b'{"prompt": "x"}', ".JSON").prompt == "x"
    assert parse_sidecar_bytes(b"x", ".Txt").prompt == "x"


def test_values_cannot_be_changed() -> None:
    sidecar = parse_sidecar_bytes(json_with(steps=3).encode(), ".json")
    with pytest.raises(TypeError):
        sidecar.values["steps"] = 4  # type: ignore[index]


@pytest.mark.parametrize("suffix", [".txt", ".json", ".toml"])
def test_an_empty_prompt_is_allowed_and_noted(suffix: str) -> None:
    data = {".txt": b"  \n ", ".json": b'{"prompt": ""}', ".toml": b'prompt = ""'}[suffix]
    sidecar = parse_sidecar_bytes(data, suffix)
    assert sidecar.prompt == ""
    assert any("empty" in note for note in sidecar.notes)


@pytest.mark.parametrize("suffix", [".txt", ".json", ".toml"])
def test_a_utf8_byte_order_mark_is_stripped_and_noted(suffix: str) -> None:
    data = {".txt": "chat qui tourne", ".json": '{"prompt": "chat"}', ".toml": 'prompt = "chat"'}[suffix]
    sidecar = parse_sidecar_bytes(b"\xef\xbb\xbf" + data.encode(), suffix)
    assert sidecar.prompt.startswith("chat")
    assert sidecar.notes == ("UTF-8 byte-order mark ignored",)


def test_non_ascii_utf8_is_kept() -> None:
    assert parse_sidecar_bytes("ネコが振り向く 🐈".encode(), ".txt").prompt == "ネコが振り向く 🐈"


def test_guidance_scale_takes_a_whole_number_and_returns_a_float() -> None:
    assert parse_sidecar_bytes(json_with(guidance_scale=9).encode(), ".json").values["guidance_scale"] == 9.0


def test_the_range_bounds_themselves_are_accepted() -> None:
    low = {key: lo for key, (lo, _) in INT_RANGES.items()} | {"guidance_scale": 0}
    high = {key: hi for key, (_, hi) in INT_RANGES.items()} | {"guidance_scale": 50.0}
    for values in (low, high):
        assert dict(parse_sidecar_bytes(json_with(**values).encode(), ".json").values)["seed"] == values["seed"]


# --- encodings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "label"),
    [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32"), ("utf-32-be", "UTF-32")],
)
def test_a_utf16_or_utf32_file_is_refused_with_a_hint_to_save_as_utf8(encoding: str, label: str) -> None:
    data = "\ufeffa cat".encode(encoding) if encoding.endswith("-be") else "a cat".encode(encoding)
    message = reject(data, ".txt", "cat.txt")
    assert label in message
    assert "save it as UTF-8" in message


def test_undecodable_bytes_are_refused_with_their_offset() -> None:
    message = reject(b"caf\xe9 au lait", ".txt", "cat.txt")
    assert "byte offset 3" in message
    assert "0xe9" in message
    assert "save it as UTF-8" in message


def test_the_offset_counts_the_byte_order_mark() -> None:
    assert "byte offset 5" in reject(b"\xef\xbb\xbfab\xff", ".txt", "cat.txt")


def test_an_encoded_surrogate_is_not_utf8() -> None:
    assert "not valid UTF-8" in reject(b'{"prompt": "\xed\xa0\x80"}')


def test_a_nul_byte_is_refused_with_its_offset() -> None:
    message = reject(b"a c\x00at", ".txt", "cat.txt")
    assert "NUL byte at byte offset 3" in message
    assert "UTF-8" in message


def test_utf16_without_a_byte_order_mark_is_caught_by_its_nul_bytes() -> None:
    assert "UTF-16" in reject("a cat".encode("utf-16-le"), ".txt", "cat.txt")


# --- JSON and TOML structure ----------------------------------------------------------------------


def test_a_json_syntax_error_gives_line_and_column() -> None:
    message = reject('{\n  "prompt": "a cat",\n  "steps": 30,\n}')
    assert "not valid JSON at line 4, column 1" in message


def test_a_toml_syntax_error_gives_line_and_column() -> None:
    message = reject('prompt = "a cat"\nsteps = = 3\n', ".toml", "cat.toml")
    assert "not valid TOML" in message
    assert "line 2" in message


@pytest.mark.parametrize(("doc", "what"), [("[]", "a list"), ('"a cat"', "'a cat'"), ("3", "3"), ("null", "null")])
def test_json_must_be_one_object(doc: str, what: str) -> None:
    message = reject(doc)
    assert "one JSON object" in message
    assert message.endswith(f"got {what}")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_are_refused(token: str) -> None:
    assert f"{token} is not allowed in JSON" in reject(f'{{"prompt": "x", "guidance_scale": {token}}}')


def test_a_json_number_too_large_for_a_float_is_refused_as_infinite() -> None:
    assert "'guidance_scale' must be a number between 0 and 50, got inf" in reject(
        '{"prompt": "x", "guidance_scale": 1e999}'
    )


def test_a_duplicate_json_key_is_refused_by_name() -> None:
    assert "key 'steps' appears more than once" in reject('{"prompt": "x", "steps": 3, "steps": 4}')


def test_a_duplicate_toml_key_is_refused() -> None:
    assert "not valid TOML" in reject('prompt = "x"\nsteps = 3\nsteps = 4\n', ".toml", "cat.toml")


def test_deeply_nested_json_is_refused_without_a_recursion_error() -> None:
    assert "nested too deeply" in reject('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}")


def test_deeply_nested_toml_is_refused_without_a_recursion_error() -> None:
    message = reject("prompt = " + "[" * 50_000 + "]" * 50_000, ".toml", "cat.toml")
    assert "nested too deeply" in message or "not valid TOML" in message


def test_a_number_with_thousands_of_digits_is_refused() -> None:
    assert "too many digits" in reject('{"prompt": "x", "seed": ' + "9" * 5000 + "}")
    assert "too many digits" in reject('prompt = "x"\nseed = ' + "9" * 5000, ".toml", "cat.toml")


# --- keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("step", "steps"),
        ("Steps", "steps"),
        ("num_frame", "num_frames"),
        ("negative", "negative_prompt"),
        ("cfg", "guidance_scale"),
        ("num_inference_steps", "steps"),
    ],
)
def test_an_unknown_key_is_refused_with_the_closest_known_key(typo: str, meant: str) -> None:
    assert f"unknown key '{typo}' — did you mean '{meant}'?" in reject(json_with(**{typo: 3}))


def test_an_unknown_key_with_no_near_match_lists_the_known_keys() -> None:
    message = reject(json_with(zzz=1, qqq=2))
    assert "unknown key 'zzz' (and 1 more unknown)" in message
    assert "guidance_scale" in message


def test_a_toml_table_is_an_unknown_key() -> None:
    assert "unknown key 'extra'" in reject('prompt = "x"\n[extra]\nsteps = 3\n', ".toml", "cat.toml")


def test_prompt_is_required_in_json_and_toml() -> None:
    assert "'prompt' is missing" in reject('{"steps": 3}')
    assert "'prompt' is missing; add a line like prompt = " in reject("steps = 3", ".toml", "cat.toml")


@pytest.mark.parametrize(
    ("value", "what"),
    [(3, "3"), (None, "null"), (True, "true"), (["a"], "a list"), ({"text": "a"}, "an object")],
)
def test_prompt_must_be_a_string(value: Any, what: str) -> None:
    assert f"'prompt' must be text in quotes, got {what}" in reject(json.dumps({"prompt": value}))


@pytest.mark.parametrize("key", ["negative_prompt", "preset"])
def test_negative_prompt_and_preset_must_be_strings(key: str) -> None:
    assert f"'{key}' must be text in quotes, got 5" in reject(json_with(**{key: 5}))


def test_an_empty_preset_is_refused() -> None:
    assert "'preset' must name a preset" in reject(json_with(preset="  "))


@pytest.mark.parametrize("key", ["prompt", "negative_prompt"])
def test_text_over_the_character_limit_is_refused(key: str) -> None:
    doc = {"prompt": "x", key: "y" * (MAX_TEXT_CHARS + 1)}
    assert f"'{key}' is 20,001 characters long; the limit is 20,000" in reject(json.dumps(doc))


def test_a_txt_prompt_over_the_character_limit_is_refused() -> None:
    assert "'prompt' is 20,001 characters long" in reject("é" * (MAX_TEXT_CHARS + 1), ".txt", "cat.txt")


def test_a_nul_escape_inside_a_string_is_refused() -> None:
    assert "'negative_prompt' contains a NUL character" in reject(r'{"prompt": "x", "negative_prompt": "a\u0000b"}')


def test_an_unpaired_surrogate_escape_is_refused() -> None:
    assert "'prompt' contains an unpaired surrogate \\ud800 at character 1" in reject(r'{"prompt": "a\ud800"}')


@pytest.mark.parametrize("key", sorted(INT_RANGES))
@pytest.mark.parametrize(
    ("value", "what"),
    [
        ("sixteen", "'sixteen'"),
        (16.0, "16.0"),
        (True, "true"),
        (None, "null"),
        ([16], "a list"),
        ({"value": 16}, "an object"),
    ],
)
def test_whole_number_keys_refuse_other_types(key: str, value: Any, what: str) -> None:
    low, high = INT_RANGES[key]
    expected = f"cat.json: '{key}' must be a whole number between {low} and {high}, got {what}"
    doc = {"prompt": "x", key: value} | ({"width": 64, "height": 64} if key in ("width", "height") else {})
    doc[key] = value
    assert reject(json.dumps(doc)) == expected


@pytest.mark.parametrize("key", sorted(INT_RANGES))
def test_whole_number_keys_refuse_values_out_of_range(key: str) -> None:
    low, high = INT_RANGES[key]
    for value in (low - 1, high + 1):
        doc = {"prompt": "x", "width": 64, "height": 64, key: value}
        message = reject(json.dumps(doc))
        assert f"'{key}' must be a whole number between {low} and {high}, got {value}" in message


def test_the_example_message_from_the_brief() -> None:
    assert (
        reject(json_with(num_frames="sixteen"))
        == "cat.json: 'num_frames' must be a whole number between 1 and 512, got 'sixteen'"
    )


@pytest.mark.parametrize(
    ("value", "what"),
    [("9", "'9'"), (True, "true"), (None, "null"), ([9], "a list"), (-0.5, "-0.5"), (50.01, "50.01"), (51, "51")],
)
def test_guidance_scale_must_be_a_number_in_range(value: Any, what: str) -> None:
    low, high = FLOAT_RANGES["guidance_scale"]
    assert f"'guidance_scale' must be a number between {low:g} and {high:g}, got {what}" in reject(
        json_with(guidance_scale=value)
    )


@pytest.mark.parametrize(("toml_value", "what"), [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf")])
def test_toml_nan_and_infinity_are_refused_for_guidance_scale(toml_value: str, what: str) -> None:
    message = reject(f'prompt = "x"\nguidance_scale = {toml_value}\n', ".toml", "cat.toml")
    assert message.endswith(f"'guidance_scale' must be a number between 0 and 50, got {what}")


@pytest.mark.parametrize("toml_value", ["1979-05-27T07:32:00Z", "1979-05-27", "07:32:00"])
def test_a_toml_date_is_the_wrong_type(toml_value: str) -> None:
    message = reject(f'prompt = "x"\nseed = {toml_value}\n', ".toml", "cat.toml")
    assert "'seed' must be a whole number between 0 and 9223372036854775807, got a date/time" in message


def test_a_toml_inline_table_or_array_is_the_wrong_type() -> None:
    assert "'steps' must be a whole number between 1 and 1000, got a table" in reject(
        'prompt = "x"\nsteps = { n = 3 }\n', ".toml", "cat.toml"
    )
    assert "'prompt' must be text in quotes, got an array" in reject('prompt = ["x"]\n', ".toml", "cat.toml")


@pytest.mark.parametrize(("given", "missing"), [("width", "height"), ("height", "width")])
def test_width_and_height_come_together(given: str, missing: str) -> None:
    assert f"'{given}' is set but '{missing}' is not" in reject(json_with(**{given: 512}))


def test_an_unknown_suffix_is_refused() -> None:
    assert "must end in .txt, .json or .toml" in reject(b"prompt: x", ".yaml", "cat.yaml")


# --- files ------------------------------------------------------------------------------------------


def test_parse_sidecar_reads_a_file_and_names_it_in_errors(tmp_path: Path) -> None:
    good = tmp_path / "cat.toml"
    good.write_text('prompt = "a cat"\nfps = 12\n', encoding="utf-8")
    assert parse_sidecar(good) == Sidecar(prompt="a cat", values={"fps": 12})
    bad = tmp_path / "dog.json"
    bad.write_text('{"prompt": "a dog", "fps": 0}', encoding="utf-8")
    with pytest.raises(InputError, match=r"^dog\.json: 'fps' must be a whole number between 1 and 120, got 0$"):
        parse_sidecar(bad)


def test_a_sidecar_over_the_byte_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    huge = tmp_path / "cat.txt"
    with huge.open("wb") as fh:
        fh.truncate(10**12)  # sparse: a terabyte that reading would never finish
    with pytest.raises(InputError, match=r"cat\.txt: the sidecar is 1,000,000,000,000 bytes, over the limit of 65,536"):
        parse_sidecar(huge)


def test_the_byte_limit_is_a_parameter(tmp_path: Path) -> None:
    path = tmp_path / "cat.txt"
    path.write_bytes(b"x" * 101)
    assert parse_sidecar(path, max_bytes=101).prompt == "x" * 101
    with pytest.raises(InputError, match="over the limit of 100 bytes"):
        parse_sidecar(path, max_bytes=100)


def test_a_symlinked_sidecar_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.txt"
    target.write_text("a cat")
    link = tmp_path / "cat.txt"
    link.symlink_to(target)
    with pytest.raises(InputError, match=r"^cat\.txt: is a symbolic link"):
        parse_sidecar(link)


def test_a_fifo_sidecar_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "cat.json"
    os.mkfifo(fifo)
    raised = finishes(lambda: parse_sidecar(fifo))
    assert isinstance(raised, InputError)
    assert "named pipe" in str(raised)


def test_a_folder_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cat.txt").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        parse_sidecar(tmp_path / "cat.txt")
    with pytest.raises(InputError, match="the file is gone"):
        parse_sidecar(tmp_path / "dog.txt")


# --- properties ----------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
clean_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00\ufeff"), max_size=60)


@settings(max_examples=400)
@given(data=st.binary(max_size=300), suffix=st.sampled_from(SIDECAR_SUFFIXES))
def test_arbitrary_bytes_give_a_sidecar_or_an_input_error(data: bytes, suffix: str) -> None:
    try:
        assert isinstance(parse_sidecar_bytes(data, suffix), Sidecar)
    except InputError as err:
        assert "\n" not in str(err)


syntax_soup = st.text(st.sampled_from(list("{}[]\",:=.#0123456789-+eE_ \n\t\\'tfnaliprompstv\ud7ff\x7f")), max_size=120)


@settings(max_examples=400)
@given(text=syntax_soup, suffix=st.sampled_from(SIDECAR_SUFFIXES))
def test_arbitrary_near_json_or_toml_text_gives_a_sidecar_or_an_input_error(text: str, suffix: str) -> None:
    try:
        assert isinstance(parse_sidecar_bytes(text.encode(), suffix), Sidecar)
    except InputError as err:
        assert "\n" not in str(err)


@settings(max_examples=400)
@given(doc=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), json_values, max_size=6))
def test_arbitrary_json_objects_give_a_sidecar_or_an_input_error(doc: dict[str, Any]) -> None:
    try:
        parse_sidecar_bytes(json.dumps(doc).encode(), ".json")
    except InputError as err:
        assert "\n" not in str(err)


@settings(max_examples=300)
@given(doc=json_values)
def test_arbitrary_json_documents_give_a_sidecar_or_an_input_error(doc: Any) -> None:
    try:
        assert isinstance(parse_sidecar_bytes(json.dumps(doc).encode(), ".json"), Sidecar)
    except InputError as err:
        assert "\n" not in str(err)


@st.composite
def valid_sidecars(draw: st.DrawFn) -> dict[str, Any]:
    """A dict that the contract accepts, with any subset of the optional keys."""
    doc: dict[str, Any] = {"prompt": draw(clean_text)}
    for key in ("negative_prompt",):
        if draw(st.booleans()):
            doc[key] = draw(clean_text)
    if draw(st.booleans()):
        doc["preset"] = draw(st.sampled_from(["fast", "standard", "high", "my-preset"]))
    for key, (low, high) in INT_RANGES.items():
        if key not in ("width", "height") and draw(st.booleans()):
            doc[key] = draw(st.integers(low, high))
    if draw(st.booleans()):
        doc["width"] = draw(st.integers(*INT_RANGES["width"]))
        doc["height"] = draw(st.integers(*INT_RANGES["height"]))
    if draw(st.booleans()):
        low, high = FLOAT_RANGES["guidance_scale"]
        doc["guidance_scale"] = draw(st.floats(low, high) | st.integers(int(low), int(high)))
    return doc


def expected_values(doc: dict[str, Any]) -> dict[str, Any]:
    values = {key: value for key, value in doc.items() if key != "prompt"}
    if "negative_prompt" in values:
        values["negative_prompt"] = values["negative_prompt"].strip()
    if "guidance_scale" in values:
        values["guidance_scale"] = float(values["guidance_scale"])
    return values


def to_toml(doc: dict[str, Any]) -> str:
    """A minimal TOML writer for flat str/int/float tables (no TOML writer is installed)."""
    lines = []
    for key, value in doc.items():
        if isinstance(value, str):
            # JSON string escapes are TOML basic-string escapes, except that TOML wants DEL escaped too.
            text = json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


@settings(max_examples=300)
@given(doc=valid_sidecars())
def test_valid_json_round_trips(doc: dict[str, Any]) -> None:
    sidecar = parse_sidecar_bytes(json.dumps(doc).encode(), ".json")
    assert sidecar.prompt == doc["prompt"].strip()
    assert dict(sidecar.values) == expected_values(doc)


@settings(max_examples=300)
@given(doc=valid_sidecars())
def test_valid_toml_round_trips(doc: dict[str, Any]) -> None:
    sidecar = parse_sidecar_bytes(to_toml(doc).encode(), ".toml")
    assert sidecar.prompt == doc["prompt"].strip()
    assert dict(sidecar.values) == expected_values(doc)


@settings(max_examples=300)
@given(text=clean_text)
def test_any_utf8_text_round_trips_as_a_txt_prompt(text: str) -> None:
    assert parse_sidecar_bytes(text.encode(), ".txt").prompt == text.strip()
