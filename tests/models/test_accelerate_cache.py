"""The compile cache's folder and key, told without importing torch or compiling anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from i2v_daemon.models.compile_cache import CompileCache, cache_key
from i2v_daemon.models.holder import ModelHolder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)


def test_the_key_names_torch_triton_the_driver_and_the_gpu_as_one_safe_folder_name():
    key = cache_key()
    assert key.startswith("torch-") and "_triton-" in key and "_driver-" in key
    assert "/" not in key and " " not in key and len(key) <= 200


def test_the_cache_points_inductor_and_triton_under_the_state_folder(tmp_path: Path, clean_env):
    cache = CompileCache(tmp_path / "cache" / "compile")
    cache.activate()
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == cache.folder / "inductor"
    assert Path(os.environ["TRITON_CACHE_DIR"]) == cache.folder / "triton"
    assert cache.folder.parent == tmp_path / "cache" / "compile" and cache.folder.name == cache.key
    assert not cache.folder.exists()  # created by Inductor when it first writes, not before


def test_a_cache_folder_a_person_chose_wins_and_is_noted(tmp_path: Path, clean_env, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared"))
    cache = CompileCache(tmp_path / "state")
    cache.activate()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared")
    assert any("TORCHINDUCTOR_CACHE_DIR is set to" in n for n in cache.notes)


def test_torchs_own_default_is_replaced(tmp_path: Path, clean_env, monkeypatch):
    import getpass
    import tempfile

    default = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(default))  # what Inductor writes on first use
    cache = CompileCache(tmp_path / "state")
    cache.activate()
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == cache.folder / "inductor"


def test_the_daemon_sets_the_cache_up_before_torch_is_imported(tmp_path: Path):
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from i2v_daemon.models.holder import ModelHolder
holder = ModelHolder("owner/model", "cpu", accelerate="on", compile_cache_dir=Path({str(tmp_path)!r}))
import os
print("torch" in sys.modules, os.environ["TORCHINDUCTOR_CACHE_DIR"], holder.compile_cache.notes)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         timeout=120).stdout.split()
    assert out[0] == "False" and out[1].startswith(str(tmp_path)) and out[2] == "[]"


def test_on_the_cpu_without_on_there_is_no_compile_cache(tmp_path: Path, clean_env):
    assert ModelHolder("owner/model", "cpu", accelerate="auto", compile_cache_dir=tmp_path).compile_cache is None
    assert ModelHolder("owner/model", "cuda", accelerate="off", compile_cache_dir=tmp_path).compile_cache is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_from_settings_puts_the_cache_under_data_dir_and_warms_the_presets_shapes(tmp_path: Path, clean_env):
    from i2v_daemon.settings import load_settings

    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nmodel = "owner/base"\ndevice = "cpu"\naccelerate = "on"\n')
    holder = ModelHolder.from_settings(load_settings(str(config)))
    assert holder.accelerate == "on"
    assert holder.compile_cache.root == tmp_path / "data" / "cache" / "compile"
    assert {(w.resolution, w.num_frames) for w in holder.warm_shapes} == {(512, 8), (512, 16), (768, 24)}


def test_doctor_can_describe_the_cache_without_torch(tmp_path: Path):
    from i2v_daemon.models.compile_cache import describe

    root = tmp_path / "compile"
    assert describe(root)["exists"] is False and describe(root)["size_bytes"] == 0
    cache = CompileCache(root)
    cache.folder.mkdir(parents=True)
    (cache.folder / "artifacts-1.bin").write_bytes(b"x" * 10)
    (root / "torch-2.0.0_triton-none_driver-none_old").mkdir()
    found = describe(root)
    assert found["exists"] and found["size_bytes"] == 10 and found["artifact_files"] == 1
    assert found["other_keys"] == ["torch-2.0.0_triton-none_driver-none_old"]
