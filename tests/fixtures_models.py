"""Session fixtures with tiny random pipelines saved to disk, so tests run the real loading path.

Wired into tests/conftest.py by importing the fixtures there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from i2v_daemon.models.base import VideoModel


@pytest.fixture(scope="session")
def tiny_i2vgen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder holding a tiny random I2VGen-XL pipeline (built once per session)."""
    from i2v_daemon.models.testing.tiny import build_tiny_i2vgen_xl

    return build_tiny_i2vgen_xl(tmp_path_factory.mktemp("tiny-i2vgen-xl"))


@pytest.fixture(scope="session")
def tiny_model(tiny_i2vgen_dir: Path) -> Iterator[VideoModel]:
    """The tiny pipeline loaded on CPU through `load_model`, shared by the tests of one session."""
    import torch

    from i2v_daemon.models.loader import load_model

    # One thread: the tiny model is no faster on two, and with two, OpenMP threads that wait for
    # each other make a job 10-50x slower whenever another process is busy on the same cores.
    torch.set_num_threads(1)
    model = load_model(str(tiny_i2vgen_dir), device="cpu", dtype="float32")
    yield model
    model.close()


#: The families besides I2VGen-XL, each with a tiny random build (i2v_daemon/models/tiny_families.py).
TINY_FAMILIES = ("svd", "wan", "ltx-video", "cogvideox", "skyreels-v2", "hunyuanvideo-i2v", "ltx-2",
                 "hunyuanvideo-1.5-i2v")
#: Tiny builds beside one per family, by name: (family, the builder's options).
TINY_VARIANTS = {
    "wan2.2": ("wan", {"experts": 2}),  # Wan 2.2 A14B: two experts, switched at boundary_ratio
    "wan-2-blocks": ("wan", {"layers": 2}),  # a first and a last block, as First Block Cache needs
    "ltx-condition": ("ltx-video", {"condition": True}),  # LTX-Video 0.9.5+: LTXConditionPipeline
    "hunyuanvideo-i2v-33ch": ("hunyuanvideo-i2v", {"latent_concat": True}),  # true guidance, latents concatenated
}
#: Builds of a family through another pipeline, run by the tests of every family beside TINY_FAMILIES.
TINY_PIPELINES = ("ltx-condition",)


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family (or a TINY_VARIANTS name) -> a diffusers folder with its tiny random pipeline, built on first use,
    once per session."""
    from i2v_daemon.models.testing.tiny import build_tiny

    built: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in built:
            family, options = TINY_VARIANTS.get(name, (name, {}))
            built[name] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{name}"), **options)
        return built[name]

    return folder


@pytest.fixture(scope="session")
def tiny_family_models(tiny_family_dirs: Callable[[str], Path]) -> Iterator[Callable[[str], VideoModel]]:
    """family (or a TINY_VARIANTS name) -> its tiny pipeline loaded on CPU through `load_model`, once per session."""
    import torch

    from i2v_daemon.models.loader import load_model

    torch.set_num_threads(1)  # as in tiny_model
    loaded: dict[str, VideoModel] = {}

    def model(family: str) -> VideoModel:
        if family not in loaded:
            loaded[family] = load_model(str(tiny_family_dirs(family)), device="cpu", dtype="float32")
        return loaded[family]

    yield model
    for m in loaded.values():
        m.close()


@pytest.fixture(scope="session")
def tiny_lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_family_dirs: Callable[[str], Path]) -> Path:
    """A lora_dir holding `style.safetensors`, a random LoRA for the tiny Wan pipeline."""
    from i2v_daemon.models.testing.tiny import build_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    build_tiny_lora(tiny_family_dirs("wan"), folder / "style.safetensors")
    return folder
