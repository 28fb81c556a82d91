"""Per-job choices: the sidecar's model, motion and LoRA keys, the config's allow-list, and the warm-model cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from i2v_daemon.errors import ConfigError, GenerationError, InputError
from i2v_daemon.intake.choices import check_choices, resolve_lora
from i2v_daemon.intake.sidecar import parse_sidecar_bytes
from i2v_daemon.models.holder import ModelHolder
from i2v_daemon.params import params_from_dict
from i2v_daemon.settings import load_settings


def sidecar(**values: object):
    return parse_sidecar_bytes(json.dumps({"prompt": "x", **values}).encode(), ".json")


# --- the sidecar keys ---------------------------------------------------------------------------


def test_the_new_keys_are_read_with_their_types():
    side = sidecar(model="wan", motion=0.25, lora="style.safetensors", lora_scale=0.5)
    assert dict(side.values) == {"model": "wan", "motion": 0.25, "lora": "style.safetensors", "lora_scale": 0.5}
    assert sidecar(motion=1).values["motion"] == 1.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"motion": 1.5}, "'motion' must be a number between 0 and 1, got 1.5"),
        ({"motion": "high"}, "'motion' must be a number between 0 and 1"),
        ({"model": ""}, "'model' must name one of the config's models"),
        ({"model": 3}, "'model' must be text in quotes"),
        ({"lora": "../secret.safetensors"}, "'lora' must be a file name inside lora_dir, without folders"),
        ({"lora": "/etc/passwd"}, "without folders"),
        ({"lora": ".."}, "'lora' must not start with '.'"),
        ({"lora": "x", "lora_scale": 9}, "'lora_scale' must be a number between -4 and 4"),
        ({"lora_scale": 0.5}, "'lora_scale' is set but 'lora' is not"),
        ({"motion_bucket_id": 127}, "unknown key 'motion_bucket_id' — did you mean 'motion'?"),
        ({"lora_weight": 1}, "did you mean 'lora_scale'?"),
    ],
)
def test_bad_values_of_the_new_keys_are_refused_naming_the_key(values, message):
    with pytest.raises(InputError) as err:
        sidecar(**values)
    assert message in str(err.value)


def test_params_from_rows_written_before_the_new_keys_still_load():
    old = {"preset": "fast", "resolution": 512, "num_frames": 8, "steps": 30, "guidance_scale": 9.0, "fps": 8,
           "width": None, "height": None, "seed": 1}
    params = params_from_dict(old)
    assert (params.model, params.motion, params.lora, params.lora_scale) == (None, None, None, None)
    new = params_from_dict({**old, "model": "wan", "motion": 0.5, "lora": "a", "lora_scale": 0.7})
    assert params_from_dict(new.as_dict()) == new


# --- the config's allow-list and lora_dir --------------------------------------------------------


def _settings(tmp_path: Path, body: str):
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nmodel = "owner/base"\n{body}')
    return load_settings(str(config))


def test_the_models_table_and_default_make_the_allow_list(tmp_path: Path):
    s = _settings(tmp_path, '[models]\nwan = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"\nsvd = "/models/svd"\n')
    assert s.model_choices() == {"wan": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "svd": "/models/svd",
                                 "default": "owner/base"}
    assert s.max_loaded_models == 1 and s.lora_dir is None
    check_choices({"model": "default"}, s, "a.json")
    with pytest.raises(InputError, match=r"a\.json: model 'ltx' is not one the config allows; use one of default, "
                                         r"svd, wan"):
        check_choices({"model": "ltx"}, s, "a.json")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[models]\ndefault = "x/y"\n', "'default' is always the `model` setting"),
        ('[models]\n"a b" = "x/y"\n', "'a b' is not a usable name"),
        ('[models]\nwan = ""\n', "models.wan is empty"),
        ("max_loaded_models = 0\n", "max_loaded_models"),
    ],
)
def test_a_bad_models_table_is_a_config_error_naming_the_key(tmp_path: Path, body: str, message: str):
    with pytest.raises(ConfigError) as err:
        _settings(tmp_path, body)
    assert message in str(err.value)


def test_the_models_table_can_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("I2V_MODELS", '{"svd": "stabilityai/stable-video-diffusion-img2vid-xt"}')
    monkeypatch.setenv("I2V_LORA_DIR", str(tmp_path / "loras"))
    s = _settings(tmp_path, "")
    assert set(s.model_choices()) == {"svd", "default"} and s.lora_dir == tmp_path / "loras"


@pytest.fixture()
def lora_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(b"weights")
    (folder / "inside.safetensors").symlink_to(folder / "style.safetensors")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"not yours")
    (folder / "escape.safetensors").symlink_to(outside)
    (folder / "sub.safetensors").mkdir()
    return folder


def test_a_lora_is_found_in_lora_dir_with_or_without_its_suffix(lora_dir: Path):
    assert resolve_lora(lora_dir, "style.safetensors") == (lora_dir / "style.safetensors").resolve()
    assert resolve_lora(lora_dir, "style") == (lora_dir / "style.safetensors").resolve()
    assert resolve_lora(lora_dir, "inside") == (lora_dir / "style.safetensors").resolve()  # a link that stays


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("escape", "is a link that leads outside"),
        ("sub", "is not a regular file"),
        ("missing", "there is no missing.safetensors in"),
        ("../secret", "without folders"),
        (".hidden", "must not start with '.'"),
    ],
)
def test_a_lora_outside_lora_dir_or_missing_is_refused_with_a_clear_message(lora_dir: Path, name: str, message: str):
    with pytest.raises(InputError, match=message.replace(".", r"\.")):
        resolve_lora(lora_dir, name)


def test_a_missing_lora_lists_what_is_there_and_no_lora_dir_says_how_to_set_one(lora_dir: Path):
    with pytest.raises(InputError, match=r"available: escape\.safetensors, inside\.safetensors, .*style\.safetensors"):
        resolve_lora(lora_dir, "nope")
    with pytest.raises(InputError, match="this daemon has no lora_dir; remove 'lora', or set lora_dir"):
        resolve_lora(None, "style")


# --- the warm-model cache ---------------------------------------------------------------------------


def test_the_cpu_keeps_at_most_max_loaded_models_and_evicts_the_least_recently_used(
    tiny_i2vgen_dir: Path, tiny_family_dirs
):
    holder = ModelHolder(
        str(tiny_i2vgen_dir), "cpu", "float32", max_loaded=2,
        models={"wan": str(tiny_family_dirs("wan")), "ltx": str(tiny_family_dirs("ltx-video"))},
    )
    default = holder.get()
    wan = holder.get("wan")
    assert holder.get("default") is default  # warm: the same object, and now the most recent
    ltx = holder.get("ltx")
    assert holder.loaded() == ["default", "ltx"]
    assert wan.pipeline is None  # closed: its memory is released
    assert holder.current is ltx
    assert holder.info("ltx") == {"name": "ltx", "id": str(tiny_family_dirs("ltx-video")), "family": "ltx-video",
                                  "revision": None, "weights": "auto"}
    assert holder.info("wan")["family"] is None  # not loaded now; the manifest still names it
    holder.unload()
    assert holder.loaded() == [] and default.pipeline is None


def test_an_unknown_name_is_the_jobs_error_and_a_broken_extra_model_does_not_stop_the_daemon(
    tiny_i2vgen_dir: Path, tmp_path: Path
):
    holder = ModelHolder(str(tiny_i2vgen_dir), "cpu", "float32", models={"broken": str(tmp_path / "nowhere")})
    with pytest.raises(InputError, match=r"model 'gone' is not .* in the config's models; use one of broken, default"):
        holder.get("gone")
    with pytest.raises(GenerationError, match=r"model 'broken' .* cannot be loaded: .*Fix `models\.broken`"):
        holder.get("broken")
    broken_default = ModelHolder(str(tmp_path / "nowhere"), "cpu", "float32")
    with pytest.raises(ConfigError, match="model: "):  # the default model is the daemon's, not a job's
        broken_default.get()


def test_models_idle_for_the_unload_period_are_freed_one_by_one(tiny_i2vgen_dir: Path, tiny_family_dirs):
    holder = ModelHolder(str(tiny_i2vgen_dir), "cpu", "float32", max_loaded=2,
                         models={"svd": str(tiny_family_dirs("svd"))})
    holder.get()
    holder.get("svd")
    holder._warm["default"].last_used -= 100
    assert holder.unload_if_idle(50, busy=False) is True
    assert holder.loaded() == ["svd"]
    holder.unload()


class _FakeGpuModel:
    """Stands in for a loaded model at the GPU seam: it only has a size and can be closed."""

    def __init__(self, model_id: str, resident: dict[str, int]) -> None:
        self.device, self.dtype = "cuda", "float16"
        self.info = type("Info", (), {"model_id": model_id, "family": "wan", "revision": None})()
        self.closed = False
        self._resident = resident
        resident[model_id] = SIZES[model_id]

    def close(self) -> None:
        self.closed = True
        self._resident.pop(self.info.model_id)


GIB = 2**30
SIZES = {"a": 2 * GIB, "b": 2 * GIB, "c": 3 * GIB, "huge": 9 * GIB}


@pytest.fixture()
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """A 10 GiB card: models of SIZES load onto it; `oom_once` makes the next load beside others fail."""
    import torch

    import i2v_daemon.models.gpu as gpu
    import i2v_daemon.models.loader as loader

    resident: dict[str, int] = {}
    state = {"oom_once": False}

    def load_model(model_id: str, device: str, dtype: str, weights=None, **_options: object):  # placement
        if state["oom_once"] and resident:
            state["oom_once"] = False
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return _FakeGpuModel(model_id, resident)

    monkeypatch.setattr(loader, "load_model", load_model)
    monkeypatch.setattr(loader, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(loader, "weights_bytes", lambda model_id, _: None if model_id == "huge" else SIZES[model_id])
    monkeypatch.setattr(gpu, "gpu_budget_bytes", lambda device, budget: 10 * GIB)
    monkeypatch.setattr(gpu, "allocated_bytes", lambda device: sum(resident.values()))
    monkeypatch.setattr(gpu, "memory_model_for", lambda model, budget, margin: None)
    return state


def test_on_a_gpu_warm_models_share_half_the_budget_and_the_least_recently_used_makes_room(fake_gpu):
    holder = ModelHolder("a", "cuda", "auto", models={"b": "b", "c": "c", "huge": "huge"}, max_loaded=1)
    a = holder.get()
    holder.get("b")
    assert holder.loaded() == ["default", "b"]  # 4 GiB of 5: both stay, whatever max_loaded says (CPU only)
    holder.get("c")  # 3 GiB more would make 7: the least recently used (a) goes
    assert holder.loaded() == ["b", "c"] and a.closed
    holder.get("huge")  # size unknown: assumed as large as the largest known, 3 GiB; 5 + 3 > 5
    assert holder.loaded() == ["huge"]


def test_on_a_gpu_a_model_that_runs_out_of_memory_beside_the_others_is_loaded_again_alone(fake_gpu):
    holder = ModelHolder("a", "cuda", "auto", models={"b": "b"})
    first = holder.get()
    fake_gpu["oom_once"] = True
    holder.get("b")
    assert holder.loaded() == ["b"] and first.closed


def test_a_models_weight_size_is_read_from_its_safetensors_headers(tiny_family_models, tiny_family_dirs, tmp_path):
    from i2v_daemon.models.loader import weights_bytes

    pipe = tiny_family_models("svd").pipeline
    loaded = sum(p.numel() * p.element_size() for c in pipe.components.values() if hasattr(c, "parameters")
                 for p in c.parameters())
    estimate = weights_bytes(str(tiny_family_dirs("svd")), "float32")
    assert estimate is not None and abs(estimate - loaded) / loaded < 0.01
    assert weights_bytes(str(tiny_family_dirs("svd")), "bfloat16") == estimate // 2
    assert weights_bytes(str(tmp_path / "nowhere"), "float32") is None
