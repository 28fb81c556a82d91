"""Settings: where each value comes from, what is derived, and configuration errors as one line naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from i2v_daemon.errors import ConfigError
from i2v_daemon.settings import BUILTIN_PRESETS, Settings, config_path, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No I2V_* variables, systemd or XDG folders leak in from the machine running the tests."""
    for key in list(os.environ):
        if key.startswith("I2V_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def toml(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str = "", **flags: Any) -> Settings:
    return load_settings(str(toml(tmp_path, text)), **flags)


def config_error(tmp_path: Path, text: str = "", **flags: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, **flags)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message, message
    return message


# ---- defaults and precedence --------------------------------------------------------------------


def test_the_documented_defaults_hold_with_an_empty_config(tmp_path: Path) -> None:
    s = load(tmp_path)
    assert s.model == "ali-vilab/i2vgen-xl"
    assert (s.device, s.dtype, s.default_preset) == ("auto", "auto", "standard")
    assert (s.stable_seconds, s.max_attempts, s.lease_seconds, s.sidecar_wait_seconds) == (2, 3, 60, 10)


@pytest.mark.parametrize(
    ("in_toml", "in_env", "in_flag", "expected"),
    [
        (False, False, False, "ali-vilab/i2vgen-xl"),
        (True, False, False, "from-toml"),
        (True, True, False, "from-env"),
        (True, True, True, "from-flag"),
        (False, False, True, "from-flag"),
        (False, True, False, "from-env"),
    ],
)
def test_flags_beat_the_environment_which_beats_the_toml_file_which_beats_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_toml: bool, in_env: bool, in_flag: bool, expected: str
) -> None:
    if in_env:
        monkeypatch.setenv("I2V_MODEL", "from-env")
    s = load(tmp_path, 'model = "from-toml"\n' if in_toml else "", model="from-flag" if in_flag else None)
    assert s.model == expected


def test_precedence_holds_key_by_key_not_file_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I2V_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("I2V_DEVICE", "cuda:1")
    s = load(tmp_path, 'max_attempts = 4\nlease_seconds = 90\ndevice = "cpu"\n', device="cuda:0")
    assert (s.max_attempts, s.lease_seconds, s.device) == (7, 90, "cuda:0")


def test_an_unset_flag_does_not_hide_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I2V_DATA_DIR", str(tmp_path / "env"))
    s = load(tmp_path, f'data_dir = "{tmp_path / "toml"}"\n', data_dir=None)
    assert s.data_dir == tmp_path / "env"


def test_the_config_file_comes_from_the_flag_else_i2v_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_env = toml(tmp_path, 'model = "by-env"\n', "env.toml")
    by_flag = toml(tmp_path, 'model = "by-flag"\n', "flag.toml")
    monkeypatch.setenv("I2V_CONFIG", str(by_env))
    assert config_path(None) == by_env
    assert config_path(str(by_flag)) == by_flag
    assert load_settings().model == "by-env"
    assert load_settings(str(by_flag)).model == "by-flag"


# ---- derived values -----------------------------------------------------------------------------


def test_folders_and_database_url_are_derived_from_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    s = load(tmp_path, f'data_dir = "{data}"\n')
    assert (s.inbox_dir, s.output_dir, s.failed_dir, s.work_dir) == (
        data / "inbox", data / "output", data / "failed", data / "work"
    )
    assert s.database_url == f"sqlite:///{data / 'jobs.db'}"
    assert set(s.folders()) == {"inbox_dir", "output_dir", "failed_dir", "work_dir"}


def test_a_folder_set_on_its_own_overrides_only_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, drop = tmp_path / "data", tmp_path / "nfs" / "drop"
    monkeypatch.setenv("I2V_DATABASE_URL", "postgresql+psycopg://queue@db/i2v")
    s = load(tmp_path, f'data_dir = "{data}"\ninbox_dir = "{drop}"\n')
    assert s.inbox_dir == drop and s.output_dir == data / "output"
    assert s.database_url == "postgresql+psycopg://queue@db/i2v"


def test_a_home_relative_data_dir_is_expanded(tmp_path: Path) -> None:
    s = load(tmp_path, 'data_dir = "~/videos"\n')
    assert s.data_dir == tmp_path / "home" / "videos"
    assert s.database_url == f"sqlite:///{tmp_path / 'home' / 'videos' / 'jobs.db'}"


def test_data_dir_defaults_to_state_directory_under_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/i2v-daemon:/var/lib/other")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    s = load(tmp_path)
    assert s.data_dir == Path("/var/lib/i2v-daemon")
    assert s.database_url == "sqlite:////var/lib/i2v-daemon/jobs.db"


def test_data_dir_defaults_to_xdg_data_home_outside_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert load(tmp_path).data_dir == tmp_path / "xdg" / "i2v-daemon"


def test_data_dir_defaults_to_the_home_folder_without_xdg_data_home(tmp_path: Path) -> None:
    assert load(tmp_path).data_dir == tmp_path / "home" / ".local" / "share" / "i2v-daemon"


def test_i2v_data_dir_beats_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/i2v-daemon")
    monkeypatch.setenv("I2V_DATA_DIR", str(tmp_path / "mine"))
    assert load(tmp_path).data_dir == tmp_path / "mine"


# ---- presets ------------------------------------------------------------------------------------


def test_a_partial_preset_table_merges_over_the_builtin_preset(tmp_path: Path) -> None:
    presets = load(tmp_path, "[presets.standard]\nsteps = 25\nfps = 12\n").all_presets()
    standard = presets["standard"]
    assert (standard.resolution, standard.num_frames, standard.steps, standard.guidance_scale, standard.fps) == (
        512, 16, 25, 9.0, 12
    )
    assert presets["fast"] == BUILTIN_PRESETS["fast"] and presets["high"] == BUILTIN_PRESETS["high"]


def test_the_builtin_presets_match_the_interface(tmp_path: Path) -> None:
    presets = load(tmp_path).all_presets()
    keys = ("resolution", "num_frames", "steps", "guidance_scale", "fps")
    table = {name: tuple(getattr(p, k) for k in keys) for name, p in presets.items()}
    assert table == {
        "fast": (512, 8, 30, 9.0, 8),
        "standard": (512, 16, 50, 9.0, 8),
        "high": (768, 24, 80, 10.0, 8),
        "wan-turbo": (480, 81, 4, 1.0, 16),
    }


def test_a_new_preset_with_every_key_can_be_the_default(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        'default_preset = "tiny"\n[presets.tiny]\n'
        "resolution = 64\nnum_frames = 4\nsteps = 2\nguidance_scale = 2.0\nfps = 4\n",
    )
    assert s.default_preset == "tiny" and s.all_presets()["tiny"].steps == 2
    assert set(s.all_presets()) == {"fast", "standard", "high", "wan-turbo", "tiny"}


def test_a_new_preset_needs_every_key(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[presets.mine]\nsteps = 5\n")
    assert "presets.mine: a new preset needs resolution, num_frames, steps, guidance_scale, fps" in message
    assert "it lacks resolution, num_frames, guidance_scale, fps" in message


def test_a_step_cache_is_off_unless_the_config_or_a_preset_turns_it_on(tmp_path: Path) -> None:
    assert load(tmp_path).cache == "off" and load(tmp_path).job_defaults()["cache"] == "off"
    s = load(tmp_path, 'cache = "pab"\n[presets.fast]\ncache = "first-block"\n')
    assert s.job_defaults()["cache"] == "pab" and s.all_presets()["fast"].cache == "first-block"
    message = config_error(tmp_path, 'cache = "mag"\n')
    assert "cache / I2V_CACHE: Input should be 'off', 'first-block' or 'pab'" in message


def test_wan_turbo_is_usable_once_its_lora_is_set_in_one_line(tmp_path: Path) -> None:
    s = load(tmp_path, f'lora_dir = "{tmp_path}"\ndefault_preset = "wan-turbo"\n'
                       '[presets.wan-turbo]\nlora = "lightx2v.safetensors"\n')
    turbo = s.all_presets()["wan-turbo"]
    assert (turbo.lora, turbo.steps, turbo.guidance_scale, turbo.num_frames) == ("lightx2v.safetensors", 4, 1.0, 81)


@pytest.mark.parametrize(("toml", "words"), [
    ("[presets.fast]\noutput_fps = 4\n", "presets.fast.output_fps: 4 is below the preset's fps = 8"),
    ("[presets.fast]\ninterpolation = 'rife'\n", "presets.fast.interpolation: 'rife' needs rife_model"),
    ("interpolation = 'rife'\n", "rife_model: interpolation = 'rife' needs rife_model"),
    ("interpolation = 'rife'\nrife_model = ''\n", "rife_model: interpolation = 'rife' needs rife_model"),
    ('default_preset = "wan-turbo"\n', "default_preset: preset 'wan-turbo' needs a Wan step-distillation LoRA"),
    ('default_preset = "wan-turbo"\n', 'set lora = "FILE.safetensors" in the config\'s [presets.wan-turbo] table'),
    ("[presets.wan-turbo]\nlora = 'turbo.safetensors'\n", "presets.wan-turbo.lora: 'turbo.safetensors' is read from "
                                                          "lora_dir, which is not set"),
    ("[presets.fast]\nlora_scale = 0.5\n", "presets.fast.lora_scale: is set but the preset has no lora"),
    ("[presets.fast]\nlora = '../x.safetensors'\n", "presets.fast.lora"),
])
def test_a_preset_or_default_that_would_fail_every_job_it_serves_is_a_configuration_error(
    tmp_path: Path, toml: str, words: str,
) -> None:
    assert words in config_error(tmp_path, toml)


# ---- configuration errors: one line naming the key ----------------------------------------------

BAD_TOML = [
    pytest.param("stepz = 3\n", "stepz", id="unknown key"),
    pytest.param('stable_seconds = "soon"\n', "stable_seconds", id="wrong type"),
    pytest.param("max_attempts = 0\n", "max_attempts", id="below range"),
    pytest.param("lease_seconds = 1e9\n", "lease_seconds", id="above range"),
    pytest.param('device = "gpu"\n', "device", id="bad device"),
    pytest.param('device = "cuda:x"\n', "device", id="bad device index"),
    pytest.param('device = "cpu\\nrm -rf"\n', "device", id="value with a newline"),
    pytest.param('dtype = "float8"\n', "dtype", id="bad dtype"),
    pytest.param('default_preset = "ultra"\n', "default_preset", id="unknown default preset"),
    pytest.param("[presets.standard]\nsteps = 0\n", "presets.standard.steps", id="preset value out of range"),
    pytest.param('[presets.standard]\nsteps = "many"\n', "presets.standard.steps", id="preset value wrong type"),
    pytest.param("[presets.standard]\nstep = 3\n", "presets.standard.step", id="preset unknown key"),
    pytest.param("resolution_ladder = []\n", "resolution_ladder", id="empty ladder"),
    pytest.param("x = = 1\n", "{path} is not valid TOML", id="invalid TOML"),
]


@pytest.mark.parametrize(("text", "key"), BAD_TOML)
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "config.toml"
    message = config_error(tmp_path, text)
    assert message.startswith(f"config: {key.format(path=path)}"), message
    assert str(path) in message  # and which file to fix


def test_an_unknown_key_message_asks_to_check_the_spelling(tmp_path: Path) -> None:
    assert "unknown setting" in config_error(tmp_path, "stable_second = 3\n")


def test_an_unknown_default_preset_lists_the_known_ones(tmp_path: Path) -> None:
    assert "fast, high, standard" in config_error(tmp_path, 'default_preset = "ultra"\n')


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(str(tmp_path / "nowhere.toml"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("config:") and "nowhere.toml" in message


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('model = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path))
    assert "\n" not in str(caught.value) and "UTF-8" in str(caught.value)


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("I2V_MAX_ATTEMPTS", "three", "max_attempts / I2V_MAX_ATTEMPTS"),
        ("I2V_DEVICE", "tpu", "device / I2V_DEVICE"),
        ("I2V_STABLE_SECONDS", "-1", "stable_seconds / I2V_STABLE_SECONDS"),
        ("I2V_RESOLUTION_LADDER", "[8]", "resolution_ladder / I2V_RESOLUTION_LADDER"),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, key: str
) -> None:
    monkeypatch.setenv(var, value)
    assert config_error(tmp_path).startswith(f"config: {key}")


@pytest.mark.parametrize("var", ["I2V_RESOLUTION_LADDER", "I2V_PRESETS"])
def test_an_environment_value_that_is_not_json_for_a_list_or_table_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    monkeypatch.setenv(var, "512,384")
    message = config_error(tmp_path)
    assert message.startswith(f"config: {var[4:].lower()}")


# ---- through the real command line --------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")}
    return subprocess.run(
        [sys.executable, "-m", "i2v_daemon.cli", *args], capture_output=True, text=True, timeout=60,
        env={**full_env, **(env or {})},
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("stepz = 3\n", "stepz", id="unknown key"),
        pytest.param('device = "gpu"\n', "device", id="bad value"),
        pytest.param("x = = 1\n", "{path} is not valid TOML", id="invalid TOML"),
        pytest.param('default_preset = "wan-turbo"\n', "default_preset: preset 'wan-turbo' needs",
                     id="a preset without its LoRA"),
    ],
)
def test_the_cli_exits_78_with_one_stderr_line_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = toml(tmp_path, text)
    proc = cli("status", "--config", str(path))
    assert proc.returncode == 78
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"i2v-daemon: config: {key.format(path=path)}")


def test_the_cli_exits_78_for_a_config_file_that_does_not_exist(tmp_path: Path) -> None:
    proc = cli("status", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 78
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "missing.toml" in lines[0] and lines[0].startswith("i2v-daemon: config:")


def test_the_cli_exits_78_for_an_environment_value_that_is_not_json(tmp_path: Path) -> None:
    proc = cli("status", "--data-dir", str(tmp_path / "data"), env={"I2V_RESOLUTION_LADDER": "512,384"})
    assert proc.returncode == 78
    assert len(proc.stderr.splitlines()) == 1 and "resolution_ladder" in proc.stderr


@pytest.mark.parametrize("limit", ["many", "2.5", ""])
def test_status_with_a_bad_limit_is_a_usage_error(tmp_path: Path, limit: str) -> None:
    proc = cli("status", "--data-dir", str(tmp_path / "data"), "--limit", limit)
    assert proc.returncode == 2
    assert "--limit" in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was opened
