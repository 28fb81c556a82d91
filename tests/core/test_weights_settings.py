"""The `weights` settings: global, per model, per preset; every wrong combination a one-line config error (exit 78)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from i2v_daemon.errors import ConfigError
from i2v_daemon.settings import Settings, load_settings
from i2v_daemon.weights import FP8_FALLBACK_NOTE, Weights

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("I2V_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture()
def gguf_file(tmp_path: Path) -> Path:
    path = tmp_path / "wan-Q8_0.gguf"
    path.write_bytes(b"GGUF")  # only its name and presence are checked at config load
    return path


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_settings(str(path))


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_every_existing_config_stays_valid_and_means_auto_weights(tmp_path: Path) -> None:
    s = load(tmp_path, 'models = { svd = "stabilityai/stable-video-diffusion-img2vid-xt" }\n')
    assert (s.weights, s.weights_file, s.torchao_type, s.allow_fp8_fallback) == ("auto", None, "int8wo", False)
    assert s.model_choices() == {"svd": "stabilityai/stable-video-diffusion-img2vid-xt", "default": s.model}
    assert s.model_weights() == {"svd": Weights(), "default": Weights()}


def test_a_model_may_be_a_table_with_its_own_weights_beside_plain_strings(tmp_path: Path, gguf_file: Path) -> None:
    s = load(tmp_path, f"""
weights = "fp8"
[models]
svd = "stabilityai/stable-video-diffusion-img2vid-xt"
wan = {{ model = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", weights = "gguf", weights_file = "{gguf_file}" }}
ltx = {{ model = "Lightricks/LTX-Video", weights = "auto" }}
cog = {{ model = "THUDM/CogVideoX-5b-I2V" }}
""")
    assert s.model_choices()["wan"] == "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    assert s.model_weights() == {
        "svd": Weights("fp8"),  # a plain string takes the global weights
        "wan": Weights("gguf", str(gguf_file)),
        "ltx": Weights("auto"),
        "cog": Weights("fp8"),  # a table without weights too
        "default": Weights("fp8"),
    }


def test_global_gguf_belongs_to_the_default_model_and_other_models_stay_auto(tmp_path: Path, gguf_file: Path) -> None:
    s = load(tmp_path, f'weights = "gguf"\nweights_file = "{gguf_file}"\nmodels = {{ svd = "owner/svd" }}\n')
    assert s.model_weights() == {"default": Weights("gguf", str(gguf_file)), "svd": Weights("auto")}


def test_the_models_table_with_weights_is_taken_from_the_environment_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("I2V_MODELS", json.dumps({"wan": {"model": "owner/wan", "weights": "fp8"}, "svd": "owner/svd"}))
    monkeypatch.setenv("I2V_ALLOW_FP8_FALLBACK", "true")
    s = load(tmp_path, "")
    assert s.model_weights()["wan"] == Weights("fp8") and s.model_choices()["svd"] == "owner/svd"
    assert s.allow_fp8_fallback is True


def test_a_preset_may_ask_for_fp8_or_auto_weights_and_its_jobs_carry_them(tmp_path: Path) -> None:
    s = load(tmp_path, '[presets.fast]\nweights = "fp8"\n[presets.high]\nweights = "auto"\n')
    presets = s.all_presets()
    assert (presets["fast"].weights, presets["high"].weights, presets["standard"].weights) == ("fp8", "auto", None)
    from i2v_daemon.params import merge

    params = merge({"preset": "fast"}, presets=presets, default_preset="standard")
    assert params.weights == "fp8"
    assert merge({}, presets=presets, default_preset="standard").weights is None  # the model's own


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('weights = "gguf"\n', "weights_file: weights = 'gguf' needs weights_file", id="gguf without file"),
        pytest.param('weights_file = "{gguf}"\n', "weights_file: it is set but weights is 'auto'; set weights = 'gguf'",
                     id="file without gguf"),
        pytest.param('weights = "fp8"\nweights_file = "{gguf}"\n', "weights_file: it is set but weights is 'fp8'",
                     id="file with fp8"),
        pytest.param('weights = "int8"\n', "weights / I2V_WEIGHTS: Input should be 'auto', 'fp8', 'gguf' or 'torchao'",
                     id="unknown kind"),
        pytest.param('torchao_type = "int3"\n', "torchao_type / I2V_TORCHAO_TYPE: Input should be 'int8wo'",
                     id="unknown torchao type"),
        pytest.param('models = {{ wan = {{ model = "o/wan", weights = "gguf" }} }}\n',
                     "models.wan.weights_file: models.wan.weights = 'gguf' needs models.wan.weights_file",
                     id="model gguf without file"),
        pytest.param('models = {{ wan = {{ model = "o/wan", weight = "fp8" }} }}\n',
                     "models.wan.weight: unknown setting — did you mean 'weights'?", id="model entry typo"),
        pytest.param('models = {{ wan = {{ weights = "fp8" }} }}\n', "models.wan.model",
                     id="model entry without model"),
        pytest.param('models = {{ wan = {{ model = " " }} }}\n', "models.wan is empty", id="model entry empty"),
        pytest.param('[presets.fast]\nweights = "gguf"\n',
                     "presets.fast.weights: 'gguf' loads one model's own file", id="preset gguf"),
    ],
)
def test_a_wrong_weights_combination_is_a_config_error_naming_the_key_and_the_fix(
    tmp_path: Path, gguf_file: Path, text: str, expected: str
) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    text = text.format(gguf=gguf_file, tmp=tmp_path, safetensors=tmp_path / "model.safetensors")
    assert expected in config_error(tmp_path, text)


def test_fp8_is_allowed_with_every_dtype_and_on_the_cpu(tmp_path: Path) -> None:
    # Measured: layerwise casting with float8 storage runs on the CPU build of torch, computing in float32.
    for dtype in ("auto", "float32", "bfloat16", "float16"):
        s = load(tmp_path, f'weights = "fp8"\ndtype = "{dtype}"\ndevice = "cpu"\n')
        assert s.model_weights()["default"] == Weights("fp8")


def test_the_fallback_note_says_what_changed_and_why() -> None:
    assert "fp8" in FP8_FALLBACK_NOTE and "allow_fp8_fallback" in FP8_FALLBACK_NOTE and "differs" in FP8_FALLBACK_NOTE


# ---- a package that is not installed, through the real command line ---------------------------------


@pytest.mark.parametrize(
    ("file", "expected"),
    [("{tmp}/nowhere.gguf", "nowhere.gguf' does not exist"), ("{tmp}", "is a folder"),
     ("{safetensors}", "is not a .gguf file")],
    ids=["file missing", "file is a folder", "not gguf"],
)
def test_a_gguf_file_that_is_not_there_is_a_config_error_where_the_model_runs_not_where_the_config_is_read(
    tmp_path: Path, file: str, expected: str
) -> None:
    """`serve` or `status` on a host without the file reads the same config; `run` (here its check) says it."""
    from i2v_daemon.models.loader import check_weights

    (tmp_path / "model.safetensors").write_bytes(b"x")
    path = file.format(tmp=tmp_path, safetensors=tmp_path / "model.safetensors")
    text = f'weights = "gguf"\nweights_file = "{path}"\n'
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n' + text)
    assert load_settings(str(config)).weights_file == Path(path)  # read as written, anywhere
    with pytest.raises(ConfigError, match=f"weights_file: .*{expected}"):
        check_weights("o/wan", Weights("gguf", path))


def cli_without(package: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a Python where `package` cannot be imported (as on a host without it installed)."""
    code = (f"import sys; sys.modules[{package!r}] = None; from i2v_daemon.cli.main import main; "
            f"sys.exit(main({[*args, '--config', str(config)]!r}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


@pytest.mark.parametrize(
    ("package", "text", "key"),
    [
        pytest.param("gguf", 'weights = "gguf"\nweights_file = "{gguf}"\n', "weights", id="gguf"),
        pytest.param("torchao", 'models = {{ wan = {{ model = "o/wan", weights = "torchao" }} }}\n',
                     "models.wan.weights", id="torchao for one model"),
        pytest.param("torchao", '[presets.fast]\nweights = "torchao"\n', "presets.fast.weights", id="torchao preset"),
    ],
)
def test_weights_whose_package_is_not_installed_stop_run_with_78_saying_how_to_install_it_and_status_still_works(
    tmp_path: Path, gguf_file: Path, package: str, text: str, key: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n' + text.format(gguf=gguf_file))
    status = cli_without(package, config, "status")  # a host that only reads the queue needs no such package
    assert status.returncode != 78 and "not installed" not in status.stderr, status.stderr
    proc = cli_without(package, config, "run", "--once")
    assert proc.returncode == 78, proc.stderr
    said = f"{key}: {'gguf' if package == 'gguf' else 'torchao'!r} needs the {package} package, which is not installed"
    assert said in proc.stderr and f"pip install 'i2v-daemon[{package}]'" in proc.stderr, proc.stderr
