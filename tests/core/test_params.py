"""The one parameter schema: what sidecars, presets, the API's params and `validate` share, and the merge."""

from __future__ import annotations

import pytest

from i2v_daemon.errors import InputError
from i2v_daemon.intake.sidecar import parse_sidecar_bytes, parse_values
from i2v_daemon.params import (
    BUILTIN_PRESETS,
    FLOAT_RANGES,
    INT_RANGES,
    KEYS,
    Params,
    Preset,
    PresetValues,
    check_values,
    merge,
    params_from_dict,
)

PRESETS = {**BUILTIN_PRESETS, "social": Preset(resolution=512, num_frames=16, steps=25, guidance_scale=7.0, fps=8,
                                                 output_fps=24, interpolation="blend", scheduler="dpm++")}


def test_the_keys_are_the_contracts_and_this_releases_additions() -> None:
    contract = {"prompt", "negative_prompt", "preset", "resolution", "width", "height", "num_frames", "steps",
                "guidance_scale", "fps", "seed", "priority"}
    assert contract <= set(KEYS)
    assert set(KEYS) - contract == {"model", "motion", "lora", "lora_scale", "output_fps", "interpolation",
                                    "scheduler"}
    assert INT_RANGES["output_fps"] == (1, 120) and FLOAT_RANGES["guidance_scale"] == (0, 50)


def test_the_sidecar_wins_over_its_preset_which_wins_over_the_config() -> None:
    p = merge({"steps": 12, "preset": "social"}, presets=PRESETS, default_preset="standard",
              defaults={"output_fps": 30, "interpolation": "motion", "scheduler": "default"})
    assert (p.preset, p.steps, p.num_frames, p.guidance_scale) == ("social", 12, 16, 7.0)
    assert (p.output_fps, p.interpolation, p.scheduler) == (24, "blend", "dpm++")  # the preset's, not the config's


def test_a_step_cache_comes_from_the_preset_over_the_config_and_off_is_none() -> None:
    cached = {**PRESETS, "quick": Preset(resolution=512, num_frames=16, steps=25, guidance_scale=7.0, fps=8,
                                          cache="first-block")}
    assert merge({}, presets=cached, default_preset="quick", defaults={"cache": "off"}).cache == "first-block"
    assert merge({}, presets=cached, default_preset="fast", defaults={"cache": "pab"}).cache == "pab"
    assert merge({}, presets=cached, default_preset="fast", defaults={"cache": "off"}).cache is None
    plain = {**PRESETS, "plain": Preset(resolution=512, num_frames=16, steps=25, guidance_scale=7.0, fps=8,
                                        cache="off")}
    assert merge({}, presets=plain, default_preset="plain", defaults={"cache": "pab"}).cache is None
    with pytest.raises(InputError, match="unknown key 'cache'"):  # the operator's choice, not a sidecar's
        parse_values({"cache": "pab"})


def test_a_job_of_wan_turbo_without_a_lora_is_refused_saying_what_to_set() -> None:
    with pytest.raises(InputError, match=r"cat.json: preset 'wan-turbo' needs a Wan step-distillation LoRA .*"
                                         r"\[presets.wan-turbo\] table \(or name one with 'lora' here\)"):
        merge({}, presets=PRESETS, default_preset="wan-turbo", where="cat.json")
    own = merge({"lora": "mine.safetensors"}, presets=PRESETS, default_preset="wan-turbo")
    assert (own.lora, own.steps, own.guidance_scale, own.fps) == ("mine.safetensors", 4, 1.0, 16)


def test_a_presets_lora_is_the_jobs_unless_the_sidecar_names_its_own_with_its_own_scale() -> None:
    turbo = Preset(**{**BUILTIN_PRESETS["wan-turbo"].model_dump(), "lora": "turbo.safetensors", "lora_scale": 0.9})
    presets = {**PRESETS, "wan-turbo": turbo}
    p = merge({}, presets=presets, default_preset="wan-turbo")
    assert (p.lora, p.lora_scale, p.steps) == ("turbo.safetensors", 0.9, 4)
    other = merge({"lora": "style.safetensors"}, presets=presets, default_preset="wan-turbo")
    assert (other.lora, other.lora_scale) == ("style.safetensors", None)  # 1.0 when it runs, not turbo's 0.9


def test_the_config_defaults_apply_where_neither_the_preset_nor_the_sidecar_says() -> None:
    p = merge({}, presets=PRESETS, default_preset="fast", defaults={"output_fps": 24, "interpolation": "blend",
                                                                     "scheduler": "default"})
    assert (p.output_fps, p.interpolation, p.scheduler) == (24, "blend", None)  # default: the family's own
    plain = merge({}, presets=PRESETS, default_preset="fast", defaults={"output_fps": None, "interpolation": "motion"})
    assert plain.output_fps is None and plain.interpolation is None and plain.delivered_fps == 8


def test_a_sidecar_in_a_preset_folder_may_ask_for_its_own_rate_without_the_presets_interpolation() -> None:
    # The preset (social: 8 → 24 fps, blend) is the folder's default; the sidecar's keys still win.
    same = merge({"output_fps": 8}, presets=PRESETS, default_preset="social")
    assert same.output_fps is None and same.interpolation is None and same.delivered_fps == 8
    faster = merge({"fps": 24}, presets=PRESETS, default_preset="social")
    assert faster.output_fps is None and faster.delivered_fps == 24
    # A config-wide output_fps at or below a job's own fps is no request either.
    assert merge({"fps": 30}, presets=PRESETS, default_preset="fast", defaults={"output_fps": 24}).delivered_fps == 30
    # What the user asks for is still checked.
    with pytest.raises(InputError, match="output_fps = 4 is below fps = 8"):
        merge({"output_fps": 4}, presets=PRESETS, default_preset="social")


def test_a_folder_preset_is_the_default_and_the_sidecar_may_still_name_another() -> None:
    assert merge({}, presets=PRESETS, default_preset="social").preset == "social"
    assert merge({"preset": "high"}, presets=PRESETS, default_preset="social").preset == "high"


@pytest.mark.parametrize(("values", "message"), [
    ({"preset": "nope"}, "cat.json: unknown preset 'nope'; use one of fast, high, social, standard"),
    ({"output_fps": 4}, "cat.json: output_fps = 4 is below fps = 8"),
    ({"interpolation": "motion"}, "cat.json: interpolation = 'motion' needs an output_fps above fps = 8"),
    ({"output_fps": 24, "interpolation": "rife"}, "cat.json: interpolation = 'rife' needs the config's rife_model"),
])
def test_what_cannot_be_merged_is_an_input_error_naming_the_keys(values: dict, message: str) -> None:
    with pytest.raises(InputError) as caught:
        merge(values, presets=PRESETS, default_preset="fast", where="cat.json")
    assert str(caught.value).startswith(message)


def test_the_api_params_are_checked_exactly_as_a_json_sidecar() -> None:
    body = {"prompt": "a cat", "stepz": 3}
    with pytest.raises(InputError) as api:
        parse_values(body)
    with pytest.raises(InputError) as file:
        parse_sidecar_bytes(b'{"prompt": "a cat", "stepz": 3}', ".json", name="params")
    assert str(api.value) == str(file.value) == "params: unknown key 'stepz' — did you mean 'steps'?"
    assert parse_values({"prompt": " x ", "output_fps": 24}).values == {"output_fps": 24}


def test_a_preset_table_is_checked_by_the_same_schema() -> None:
    PresetValues.model_validate({"output_fps": 24, "interpolation": "rife"})
    with pytest.raises(ValueError, match="interpolation"):
        PresetValues.model_validate({"interpolation": "optical"})
    with pytest.raises(ValueError):
        PresetValues.model_validate({"steps": 16.0})  # strict: a float is not a whole number


def test_stored_params_of_every_release_load_and_round_trip() -> None:
    first_release = {"preset": "fast", "resolution": 512, "width": None, "height": None, "num_frames": 8,
                     "steps": 30, "guidance_scale": 9.0, "fps": 8, "seed": None}
    p = params_from_dict(first_release)
    assert p == Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)
    assert params_from_dict(p.as_dict()) == p


def test_check_values_returns_only_what_the_user_set() -> None:
    assert check_values({"prompt": "x", "fps": 12}) == {"prompt": "x", "fps": 12}
