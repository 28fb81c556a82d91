"""The one schema of a job's parameters: keys, types, ranges, defaults and the preset merge.

Sidecars (`.json`/`.toml`), the API's `params`, presets in the config, folder presets, `validate`
and the manifest's `requested` all go through the models here, and every rejection is worded
the same way ("'steps' must be a whole number between 1 and 1000, got 0", "did you mean").

    SidecarValues   what a user may send: every key optional, checked strictly (no 16.0 for 16)
    PresetValues    a `[presets.NAME]` table: the keys a preset may set
    Params          the merged parameters a job runs with (frozen): preset < sidecar
"""

from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo

from i2v_daemon.errors import InputError
from i2v_daemon.weights import WeightsKind

MAX_TEXT_CHARS = 20_000
INTERPOLATIONS = ("motion", "blend", "rife")
SCHEDULERS = ("default", "ddim", "dpm++")
#: Step caches (diffusers' cache hooks on a transformer): reuse blocks' work between steps, a speed for
#: quality trade-off. Others diffusers has are left out: MagCache needs per-model calibrated ratios,
#: FasterCache assumes cond and uncond in one batch (Wan runs them apart), TaylorSeer's default
#: patterns match no Wan attention (it would do nothing), SeaCache knows only Wan text-to-video.
CACHES = ("off", "first-block", "pab")
MAX_OUTPUT_FPS = 120
LORA_SUFFIX = ".safetensors"


def lora_name_problem(name: str) -> str | None:
    """Why `name` cannot name a file directly inside lora_dir, or None when it can."""
    if not name:
        return "is empty"
    if "/" in name or "\\" in name:
        return "must be a file name inside lora_dir, without folders ('/' or '\\')"
    if name in (".", "..") or name.startswith("."):
        return "must not start with '.'"
    if "\0" in name:
        return "contains a NUL character"
    return None


def check_interpolation(fps: int, output_fps: int | None, mode: str | None, rife_model: Path | None) -> None:
    """Raise InputError naming the keys when this rate and mode cannot be delivered; `mode` None: not asked for."""
    if mode is not None and mode not in INTERPOLATIONS:
        raise InputError(f"interpolation = {mode!r} is not a mode; use one of: {', '.join(INTERPOLATIONS)}")
    if output_fps is None:
        output_fps = fps
    if not 1 <= output_fps <= MAX_OUTPUT_FPS:
        raise InputError(f"output_fps = {output_fps} is out of range; use 1 to {MAX_OUTPUT_FPS}")
    if output_fps < fps:
        raise InputError(
            f"output_fps = {output_fps} is below fps = {fps}: the delivered rate cannot be lower than the "
            f"generated one; set output_fps to {fps} or more, or lower fps"
        )
    if mode is not None and output_fps == fps:
        if fps >= MAX_OUTPUT_FPS:
            raise InputError(
                f"interpolation = {mode!r} needs an output_fps above fps = {fps}, and {MAX_OUTPUT_FPS} is the "
                "most output_fps may be; lower fps, or leave out interpolation"
            )
        k = next((k for k in (3, 2) if fps * k <= MAX_OUTPUT_FPS), None)
        example = f"e.g. output_fps = {fps * k}" if k else f"at most {MAX_OUTPUT_FPS}"
        raise InputError(
            f"interpolation = {mode!r} needs an output_fps above fps = {fps} ({example}); "
            "set output_fps, or leave out interpolation"
        )
    if mode == "rife" and rife_model is None:
        raise InputError(
            "interpolation = 'rife' needs the config's rife_model (a local RIFE weights file; nothing is "
            "downloaded); ask the operator to set rife_model, or use interpolation = 'motion'"
        )


class Bad(Exception):
    """A problem in a set of values, worded without the file name (the caller adds where it came from)."""


def _text(value: str, info: ValidationInfo) -> str:
    key = info.field_name
    value = value.strip()
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"'{key}' is {len(value):,} characters long; the limit is {MAX_TEXT_CHARS:,} — shorten it")
    if "\0" in value:
        raise ValueError(f"'{key}' contains a NUL character (\\u0000); remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        # JSON's \ud800-style escapes can smuggle in half a character that nothing downstream can store.
        raise ValueError(
            f"'{key}' contains an unpaired surrogate \\u{ord(value[err.start]):04x} at character {err.start}; "
            "remove it or write the whole character"
        ) from None
    if key == "preset" and not value:
        raise ValueError("'preset' must name a preset such as 'fast', 'standard' or 'high', got an empty string")
    if key == "model" and not value:
        raise ValueError("'model' must name one of the config's models, such as 'default', got an empty string")
    if key == "lora":
        problem = lora_name_problem(value)
        if problem:
            raise ValueError(f"'lora' {problem}, got {clip(value)}")
    return value


Text = Annotated[str, AfterValidator(_text)]
Resolution = Annotated[int, Field(ge=64, le=2048)]
Side = Annotated[int, Field(ge=64, le=4096)]
NumFrames = Annotated[int, Field(ge=1, le=512)]
Steps = Annotated[int, Field(ge=1, le=1000)]
Fps = Annotated[int, Field(ge=1, le=120)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
Priority = Annotated[int, Field(ge=-1000, le=1000)]
Guidance = Annotated[float, Field(ge=0, le=50, allow_inf_nan=False)]
Motion = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
LoraScale = Annotated[float, Field(ge=-4, le=4, allow_inf_nan=False)]
Interpolation = Literal["motion", "blend", "rife"]
Scheduler = Literal["default", "ddim", "dpm++"]
Cache = Literal["off", "first-block", "pab"]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class SidecarValues(BaseModel):
    """Every key a sidecar (or the API's `params`) may hold; `model_fields_set` is what the user set."""

    model_config = _STRICT

    prompt: Text | None = None
    negative_prompt: Text | None = None
    preset: Text | None = None
    resolution: Resolution | None = None
    width: Side | None = None
    height: Side | None = None
    num_frames: NumFrames | None = None
    steps: Steps | None = None
    guidance_scale: Guidance | None = None
    fps: Fps | None = None
    seed: Seed | None = None
    priority: Priority | None = None
    model: Text | None = None
    motion: Motion | None = None
    lora: Text | None = None
    lora_scale: LoraScale | None = None
    output_fps: Fps | None = None
    interpolation: Interpolation | None = None
    scheduler: Scheduler | None = None


class PresetValues(BaseModel):
    """A `[presets.NAME]` table in the config: any of the keys a preset may set."""

    model_config = ConfigDict(extra="forbid", strict=True)

    resolution: Resolution | None = None
    num_frames: NumFrames | None = None
    steps: Steps | None = None
    guidance_scale: Guidance | None = None
    fps: Fps | None = None
    output_fps: Fps | None = None
    interpolation: Interpolation | None = None
    scheduler: Scheduler | None = None
    weights: WeightsKind | None = None  # the weights its jobs' model runs with; None: the model's own
    lora: Text | None = None  # a file name in lora_dir: a distillation LoRA with its steps and guidance, say
    lora_scale: LoraScale | None = None
    cache: Cache | None = None  # a step cache for this preset's jobs (the config's `cache` otherwise)
    notify: list[str] | None = None  # Apprise URLs told of this preset's jobs (besides the config's); never in Preset

    def values(self) -> dict[str, Any]:
        """The job parameters this table sets (what a Preset holds): every key but `notify`."""
        return self.model_dump(exclude_none=True, exclude={"notify"})


class Preset(BaseModel):
    """A complete preset: the five keys every preset has, and the optional round-2 ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: Resolution
    num_frames: NumFrames
    steps: Steps
    guidance_scale: Guidance
    fps: Fps
    output_fps: Fps | None = None
    interpolation: Interpolation | None = None
    scheduler: Scheduler | None = None
    weights: WeightsKind | None = None  # None: the model's own (its `models` entry, else the global `weights`)
    lora: Text | None = None  # a file name in lora_dir; a sidecar's own `lora` wins
    lora_scale: LoraScale | None = None
    cache: Cache | None = None


class Params(BaseModel):
    """Generation parameters after the preset and the sidecar are merged: what the job asked for."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    preset: str
    resolution: Resolution
    num_frames: NumFrames
    steps: Steps
    guidance_scale: Guidance
    fps: Fps
    width: Side | None = None
    height: Side | None = None
    seed: Seed | None = None
    model: str | None = None  # a name from the config's models; None: "default"
    motion: Motion | None = None  # 0..1, for families with a motion knob
    lora: str | None = None  # a file name in lora_dir
    lora_scale: LoraScale | None = None  # None with a lora: 1.0
    output_fps: Fps | None = None  # the delivered frame rate; None: fps (no interpolation)
    interpolation: Interpolation | None = None  # set only when output_fps > fps
    scheduler: Scheduler | None = None  # None / "default": the family's own
    weights: WeightsKind | None = None  # the preset's `weights`; None: the model's own
    cache: Cache | None = None  # None / "off": no step cache (only presets and the config set it)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @property
    def delivered_fps(self) -> int:
        return self.output_fps or self.fps


BUILTIN_PRESETS: dict[str, Preset] = {
    "fast": Preset(resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8),
    "standard": Preset(resolution=512, num_frames=16, steps=50, guidance_scale=9.0, fps=8),
    "high": Preset(resolution=768, num_frames=24, steps=80, guidance_scale=10.0, fps=8),
    # Wan with a step-distillation LoRA (lightx2v, CausVid): 4 steps without classifier-free guidance
    # (guidance 1 runs the transformer once a step, not twice), 832×480 × 81 frames at 16 fps.
    "wan-turbo": Preset(resolution=480, num_frames=81, steps=4, guidance_scale=1.0, fps=16),
}

#: Built-in presets made for a LoRA file the user must get themselves: name -> what it needs. Unset,
#: a job of the preset is refused and the preset cannot be `default_preset`, saying what to set.
NEEDS_LORA: dict[str, str] = {
    "wan-turbo": "a Wan step-distillation LoRA (lightx2v or CausVid, made for 4 steps at guidance 1)",
}


def lora_needed(name: str) -> str:
    """What to set so that preset `name` (one of NEEDS_LORA) has its LoRA, for messages."""
    return (f"preset {name!r} needs {NEEDS_LORA[name]}: put the file in lora_dir and set "
            f'lora = "FILE.safetensors" in the config\'s [presets.{name}] table')


KEYS: tuple[str, ...] = tuple(SidecarValues.model_fields)


def _bounds(name: str) -> tuple[Any, Any]:
    """The (ge, le) of a key, read from its annotated type (`X | None` keeps them on X)."""
    low = high = None
    for arg in typing.get_args(SidecarValues.model_fields[name].annotation):
        for meta in getattr(arg, "__metadata__", ()):
            for item in (meta, *getattr(meta, "metadata", ())):
                low = getattr(item, "ge", low)
                high = getattr(item, "le", high)
    return low, high


def _kind(name: str) -> str:
    args = getattr(SidecarValues.model_fields[name].annotation, "__args__", ())
    inner = next((a for a in args if a is not type(None)), None)
    origin = getattr(inner, "__origin__", inner)
    if getattr(inner, "__origin__", None) is Literal:
        return "choice"
    kinds: dict[Any, str] = {int: "int", float: "float", str: "text"}
    return kinds.get(origin, "text")


#: Inclusive bounds of every whole-number key, and of every key that takes any finite number.
INT_RANGES: dict[str, tuple[int, int]] = {k: _bounds(k) for k in KEYS if _kind(k) == "int"}
FLOAT_RANGES: dict[str, tuple[float, float]] = {k: _bounds(k) for k in KEYS if _kind(k) == "float"}
CHOICES: dict[str, tuple[str, ...]] = {"interpolation": INTERPOLATIONS, "scheduler": SCHEDULERS}

# Names other tools use for our keys: offered as suggestions only, never accepted.
ALIASES = {
    "cfg": "guidance_scale", "cfg_scale": "guidance_scale", "num_inference_steps": "steps",
    "frame_rate": "fps", "framerate": "fps", "frames": "num_frames", "negative": "negative_prompt",
    "size": "resolution", "motion_bucket_id": "motion", "checkpoint": "model", "lora_weight": "lora_scale",
    "lora_strength": "lora_scale", "target_fps": "output_fps", "interpolate": "interpolation",
    "sampler": "scheduler",
}


def check_values(table: Mapping[str, Any], kind: str = ".json") -> dict[str, Any]:
    """The keys a user set, checked against the schema; raises `Bad` with one friendly sentence."""
    unknown = [key for key in table if key not in KEYS]
    if unknown:
        raise Bad(unknown_key_message(unknown))
    for key, value in table.items():
        if value is None:  # JSON's null is no value at all: a key is either set or left out
            raise Bad(_wrong(key, value, kind))
    try:
        values = SidecarValues.model_validate(dict(table))
    except ValidationError as err:
        raise Bad(_explain(err, table, kind)) from None
    out = {k: getattr(values, k) for k in KEYS if k in values.model_fields_set}
    if ("width" in out) != ("height" in out):
        given, missing = ("width", "height") if "width" in out else ("height", "width")
        raise Bad(f"'{given}' is set but '{missing}' is not; set both, or neither and use 'resolution'")
    if "lora_scale" in out and "lora" not in out:
        raise Bad("'lora_scale' is set but 'lora' is not; name the LoRA file with 'lora', or remove 'lora_scale'")
    return out


def _explain(err: ValidationError, table: Mapping[str, Any], kind: str) -> str:
    e = err.errors()[0]
    key = str(e["loc"][0]) if e["loc"] else ""
    value = table.get(key)
    if e["type"] == "value_error":  # our own validators already wrote the sentence
        return str(e.get("ctx", {}).get("error", e["msg"])).removeprefix("Value error, ")
    return _wrong(key, value, kind)


def _wrong(key: str, value: Any, kind: str) -> str:
    """"'steps' must be a whole number between 1 and 1000, got 0", and its kin for every type."""
    got = describe(value, kind)
    if key in INT_RANGES:
        low, high = INT_RANGES[key]
        return f"'{key}' must be a whole number between {low} and {high}, got {got}"
    if key in FLOAT_RANGES:
        lo, hi = FLOAT_RANGES[key]
        return f"'{key}' must be a number between {lo:g} and {hi:g}, got {got}"
    if key in CHOICES:
        return f"'{key}' must be one of {', '.join(repr(c) for c in CHOICES[key])}, got {got}"
    return f"'{key}' must be text in quotes, got {got}"


def unknown_key_message(unknown: list[str]) -> str:
    key = unknown[0]
    more = f" (and {len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
    guess = ALIASES.get(key.lower()) or next(iter(difflib.get_close_matches(key.lower(), KEYS, n=1)), None)
    if guess:
        return f"unknown key {clip(key)} — did you mean '{guess}'?{more}"
    return f"unknown key {clip(key)}{more}; the keys are {', '.join(KEYS)}"


def describe(value: Any, kind: str = ".json") -> str:
    """How a value reads in the user's own format, short enough for one line."""
    import datetime as dt

    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return clip(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
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


def clip(text: str, limit: int = 40) -> str:
    """repr() of text, cut short; repr also escapes newlines and lone surrogates."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "…"


# ---- the merge: config defaults < preset < the user's values -------------------------------------


#: Keys `merge` decides itself rather than taking them as given.
_DECIDED = ("preset", "interpolation", "output_fps")


def merge(
    values: Mapping[str, Any], *, presets: Mapping[str, Preset], default_preset: str,
    defaults: Mapping[str, Any] | None = None, rife_model: Path | None = None, where: str = "sidecar",
) -> Params:
    """The job's parameters from what the user set over its preset over the config's defaults.

    `default_preset` is the folder's preset (or the config's `default_preset`); `defaults` holds
    the config-level `output_fps`, `interpolation`, `scheduler` and `cache`. Raises InputError naming keys.
    """
    name = values.get("preset") or default_preset
    if name not in presets:
        raise InputError(f"{where}: unknown preset {name!r}; use one of {', '.join(sorted(presets))}")
    preset = presets[name].model_dump(exclude_none=True)
    base = {k: v for k, v in (defaults or {}).items() if v is not None and k != "interpolation"}
    chosen = {**base, **preset, **{k: v for k, v in values.items() if v is not None}}
    fps = chosen["fps"]
    output_fps = chosen.get("output_fps")
    if values.get("output_fps") is None and output_fps is not None and output_fps <= fps:
        output_fps = None  # a preset's or the config's rate at or below this job's fps: delivered at fps
    # Only the user's own `interpolation` is a request that must be met; a preset's or the config's
    # only picks the mode when there is something to interpolate.
    asked = values.get("interpolation")
    mode = asked or preset.get("interpolation") or (defaults or {}).get("interpolation") or "motion"
    interpolating = output_fps is not None and output_fps > fps
    try:
        check_interpolation(fps, output_fps, asked or (mode if interpolating else None), rife_model)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    if chosen.get("scheduler") == "default":
        chosen.pop("scheduler")
    if chosen.get("cache") == "off":
        chosen.pop("cache")
    if values.get("lora") is not None and values.get("lora_scale") is None:
        chosen.pop("lora_scale", None)  # the preset's scale was for the preset's LoRA, not the sidecar's
    if name in NEEDS_LORA and not chosen.get("lora"):
        raise InputError(f"{where}: {lora_needed(name)} (or name one with 'lora' here)")
    try:
        return Params(
            **{k: v for k, v in chosen.items() if k in Params.model_fields and k not in _DECIDED},
            preset=name, interpolation=mode if interpolating else None,  # type: ignore[arg-type]
            output_fps=output_fps if interpolating else None,
        )
    except ValidationError as err:  # a preset and a sidecar that are each fine but not together
        raise InputError(f"{where}: {err.errors()[0]['msg']}") from None


def params_from_dict(data: Mapping[str, Any]) -> Params:
    """A stored `params` column back into `Params` (rows of every release load)."""
    return Params.model_validate({k: v for k, v in data.items() if v is not None or k == "preset"})
