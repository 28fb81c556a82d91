"""Lower-precision weights on real tiny pipelines: fp8 storage, a GGUF transformer, torchao; what is recorded and
what is refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from i2v_daemon.errors import ConfigError
from i2v_daemon.models.base import GenerationRequest, VideoModel
from i2v_daemon.models.holder import ModelHolder
from i2v_daemon.models.loader import check_weights, load_model
from i2v_daemon.params import Params
from i2v_daemon.weights import Weights
from i2v_daemon.work.generate import generate

pytestmark = pytest.mark.slow

IMAGE = Image.new("RGB", (96, 64), (120, 60, 30))
FP8 = torch.float8_e4m3fn

#: The largest mean and single-value differences (of 255) between an fp8 run's frames and the plain run's.
#: Measured on these tiny random models (torch 2.13 CPU, float32 compute): I2VGen-XL 1.46 mean / 33 at most,
#: Wan 2.1 0.14 / 16, Wan 2.2 (two experts) 0.014 / 7; about twice that is allowed.
FP8_TOLERANCE = {"i2vgen-xl": (3.0, 64), "wan": (0.5, 32), "wan-2.2": (0.1, 16)}


def request(model: VideoModel, steps: int = 2) -> GenerationRequest:
    frames = model.plan_frames(5).num_frames
    size = model.plan_size(IMAGE.size, 64, None, None)
    return GenerationRequest(image=IMAGE, prompt="a cat turns", negative_prompt="", width=size.width,
                             height=size.height, num_frames=frames, steps=steps, guidance_scale=4.0, fps=8, seed=7)


def denoisers(model: Any) -> dict[str, Any]:
    pipe = model.pipeline
    return {n: getattr(pipe, n) for n in ("unet", "transformer", "transformer_2") if getattr(pipe, n, None) is not None}


def projections_in_fp8(module: Any) -> tuple[int, int]:
    """(attention projections whose weight is stored in float8, attention projections)."""
    weights = [m.weight for name, m in module.named_modules() if name.split(".")[-1] in ("to_q", "to_k", "to_v")]
    return sum(w.dtype == FP8 for w in weights), len(weights)


def run_watching(model: Any, req: GenerationRequest) -> tuple[np.ndarray, list[dict[str, tuple[int, int]]]]:
    """The frames, and after every step how each denoiser's projections were stored."""
    seen: list[dict[str, tuple[int, int]]] = []
    def on_step(_i: int, _n: int) -> None:
        seen.append({name: projections_in_fp8(d) for name, d in denoisers(model).items()})

    frames = model.generate(req, on_step)
    return frames, seen


def difference(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan 2.2 A14B: two expert transformers."""
    from i2v_daemon.models.testing.tiny import build_tiny

    return build_tiny("wan", tmp_path_factory.mktemp("tiny-wan22"), experts=2)


@pytest.fixture(scope="module")
def family_dir(
    tiny_i2vgen_dir: Path, tiny_family_dirs: Callable[[str], Path], wan22_dir: Path
) -> Callable[[str], Path]:
    return lambda name: {"i2vgen-xl": tiny_i2vgen_dir, "wan": tiny_family_dirs("wan"), "wan-2.2": wan22_dir}[name]


# ---- fp8 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["i2vgen-xl", "wan", "wan-2.2"])
def test_fp8_weights_keep_every_denoiser_in_float8_through_the_run_and_the_frames_close_to_the_plain_ones(
    family_dir: Callable[[str], Path], name: str
) -> None:
    torch.set_num_threads(1)
    folder = str(family_dir(name))
    plain = load_model(folder, "cpu", "float32")
    fp8 = load_model(folder, "cpu", "float32", weights=Weights("fp8"))
    try:
        req = request(plain)
        expected, _ = run_watching(plain, req)
        frames, seen = run_watching(fp8, req)
    finally:
        plain.close()
        fp8.close()
    want = {"wan-2.2": {"transformer", "transformer_2"}, "wan": {"transformer"}, "i2vgen-xl": {"unet"}}[name]
    assert len(seen) == req.steps and all(set(step) == want for step in seen)
    for step in seen:  # between layers, while the job runs, every projection is in float8
        assert all(stored == total > 0 for stored, total in step.values()), step
    assert fp8.info.weights == Weights("fp8") and plain.info.weights == Weights()
    mean, most = difference(frames, expected)
    print(f"{name}: fp8 vs plain frames differ by {mean:.3f} on average, {most} at most (of 255)")
    limit_mean, limit_max = FP8_TOLERANCE[name]
    assert 0 < most <= limit_max and mean <= limit_mean  # changed (stored lower), and only a little


def test_use_fp8_steps_a_loaded_model_down_once_and_says_whether_it_changed_anything(tiny_i2vgen_dir: Path) -> None:
    model = load_model(str(tiny_i2vgen_dir), "cpu", "float32")
    try:
        assert projections_in_fp8(model.pipeline.unet)[0] == 0
        assert model.use_fp8() is True
        assert model.info.weights == Weights("fp8")
        stored, total = projections_in_fp8(model.pipeline.unet)
        assert stored == total > 0
        assert model.use_fp8() is False  # already
        frames = model.generate(request(model), lambda _i, _n: None)
        assert frames.shape[0] == 5
    finally:
        model.close()


def test_a_lora_on_fp8_weights_is_refused_before_any_work_saying_what_to_do(
    tiny_family_dirs: Callable[[str], Path], tiny_lora_dir: Path
) -> None:
    from i2v_daemon.errors import InputError
    from i2v_daemon.models.base import LoraChoice

    model = load_model(str(tiny_family_dirs("wan")), "cpu", "float32", weights=Weights("fp8"))
    try:
        lora = LoraChoice("style", str(tiny_lora_dir / "style.safetensors"))
        with pytest.raises(InputError, match="lora cannot be applied to wan with fp8 weights; remove 'lora', or use a "
                                             "preset with weights = 'auto'"):
            model.plan_conditioning(replace(request(model), lora=lora))
    finally:
        model.close()


def test_a_job_whose_preset_asks_for_other_weights_loads_the_model_again_and_each_try_records_them(
    tiny_i2vgen_dir: Path,
) -> None:
    holder = ModelHolder(str(tiny_i2vgen_dir), "cpu", "float32")
    try:
        plain = holder.get()
        assert holder.info()["weights"] == "auto"
        fp8 = holder.get(weights="fp8")
        assert fp8 is not plain and plain.pipeline is None  # loaded again; the plain one closed
        assert fp8.info.weights == Weights("fp8") and holder.get(weights="fp8") is fp8
        assert holder.info() == {"name": "default", "id": str(tiny_i2vgen_dir), "family": "i2vgen-xl",
                                 "revision": None, "weights": "fp8"}
        tries: list[dict[str, Any]] = []
        params = Params(preset="t", resolution=64, num_frames=4, steps=2, guidance_scale=2.0, fps=4, seed=3,
                        weights="fp8")
        generate(fp8, IMAGE, "a cat", "", params, ladder=[48], on_step=lambda _k, _n: None, on_try=tries.append)
        assert [(t["outcome"], t["weights"]) for t in tries] == [("succeeded", "fp8")]
        again = holder.get()  # the model's own weights (auto) once more
        assert again is not fp8 and again.info.weights == Weights()
    finally:
        holder.unload()


def test_a_model_stepped_to_fp8_by_the_fallback_serves_auto_jobs_without_loading_again(tiny_i2vgen_dir: Path) -> None:
    holder = ModelHolder(str(tiny_i2vgen_dir), "cpu", "float32", allow_fp8_fallback=True)
    try:
        model = holder.get()
        assert holder.allow_fp8_fallback is True
        assert model.use_fp8() is True  # what the placement does when auto does not fit
        assert holder.get() is model and holder.info()["weights"] == "fp8"
        assert holder.get(weights="fp8") is model  # fp8 asked for, fp8 it has
    finally:
        holder.unload()


def test_the_configured_weights_of_each_model_are_what_it_loads_with(
    tiny_i2vgen_dir: Path, tiny_family_dirs: Callable[[str], Path]
) -> None:
    holder = ModelHolder(str(tiny_i2vgen_dir), "cpu", "float32", models={"wan": str(tiny_family_dirs("wan"))},
                         weights={"wan": Weights("fp8")})
    try:
        assert holder.info("wan")["weights"] == "fp8"  # said before it loads, for a manifest
        assert holder.get("wan").info.weights == Weights("fp8")
        assert holder.get("wan", weights="auto").info.weights == Weights()  # a preset's auto wins
    finally:
        holder.unload()


# ---- GGUF ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_wan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Wan whose layers are 32 wide (a Q8_0 block), and its transformer as a GGUF file."""
    pytest.importorskip("gguf")
    from i2v_daemon.models.testing.tiny import build_tiny, build_tiny_gguf

    folder = build_tiny("wan", tmp_path_factory.mktemp("tiny-wan-wide"), head_dim=16, ffn_dim=32)
    return folder, build_tiny_gguf(folder, tmp_path_factory.mktemp("gguf") / "wan-Q8_0.gguf")


def test_a_gguf_transformer_loads_in_place_of_the_folders_and_makes_nearly_the_same_frames(
    wide_wan: tuple[Path, Path],
) -> None:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    folder, file = wide_wan
    torch.set_num_threads(1)
    weights = Weights("gguf", str(file))
    check_weights(str(folder), weights)  # what `run` checks at start: nothing to say
    plain = load_model(str(folder), "cpu", "float32")
    quantized = load_model(str(folder), "cpu", "float32", weights=weights)
    try:
        params = list(quantized.pipeline.transformer.parameters())
        assert sum(isinstance(p, GGUFParameter) for p in params) >= 10  # the Q8_0 weights stay quantized
        assert quantized.info.weights == weights and weights.record() == {"weights": "gguf", "weights_file": str(file)}
        req = request(plain)
        mean, most = difference(quantized.generate(req, lambda _i, _n: None), plain.generate(req, lambda _i, _n: None))
    finally:
        plain.close()
        quantized.close()
    print(f"gguf Q8_0 vs plain frames differ by {mean:.4f} on average, {most} at most (of 255)")
    assert most <= 4 and mean <= 0.05  # measured: 0.0053 and 1
    assert quantized.use_fp8() is False  # already smaller than fp8 would make it


def test_a_gguf_file_of_another_shape_is_a_config_error_saying_the_fix_when_the_model_loads(
    wide_wan: tuple[Path, Path], tiny_family_dirs: Callable[[str], Path]
) -> None:
    _, file = wide_wan
    narrow = str(tiny_family_dirs("wan"))  # same family, other widths: only the load can tell
    check_weights(narrow, Weights("gguf", str(file)))
    with pytest.raises(ConfigError, match=r"weights_file .*wan-Q8_0\.gguf' does not fit .*transformer.*use a GGUF made "
                                          r"from this model's own transformer"):
        load_model(narrow, "cpu", "float32", weights=Weights("gguf", str(file)))
    holder = ModelHolder(narrow, "cpu", "float32", weights={"default": Weights("gguf", str(file))})
    with pytest.raises(ConfigError, match=r"^model: weights_file"):  # the default model's: exit 78
        holder.get()


def test_gguf_is_refused_before_loading_where_it_can_never_work(
    tmp_path: Path, tiny_i2vgen_dir: Path, wan22_dir: Path, tiny_family_dirs: Callable[[str], Path]
) -> None:
    pytest.importorskip("gguf")
    from i2v_daemon.models.testing.tiny import build_tiny_gguf

    file = tmp_path / "x.gguf"
    file.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConfigError, match=r"weights: 'gguf' replaces a transformer, and i2vgen-xl .* has a UNet; .*"
                                          r"only for wan and ltx-video; use weights = 'fp8'"):
        check_weights(str(tiny_i2vgen_dir), Weights("gguf", str(file)))
    with pytest.raises(ConfigError, match=r"models\.w22\.weights: .*two experts .*use weights = 'fp8'"):
        check_weights(str(wan22_dir), Weights("gguf", str(file)), "models.w22.")
    wan = str(tiny_family_dirs("wan"))
    with pytest.raises(ConfigError, match=r"weights_file: .*x\.gguf' is not a GGUF file"):
        check_weights(wan, Weights("gguf", str(file)))
    flux = build_tiny_gguf(wan, tmp_path / "flux.gguf", architecture="flux")
    with pytest.raises(ConfigError, match=r"weights_file: .*flux\.gguf' holds a 'flux' model, and .* is wan; use a "
                                          r"GGUF of this model's transformer"):
        check_weights(wan, Weights("gguf", str(flux)))


# ---- torchao -------------------------------------------------------------------------------------


def test_torchao_int8_weights_quantize_the_denoiser_at_load_and_make_nearly_the_same_frames(
    tiny_family_dirs: Callable[[str], Path],
) -> None:
    pytest.importorskip("torchao")
    torch.set_num_threads(1)
    folder = str(tiny_family_dirs("wan"))
    plain = load_model(folder, "cpu", "float32")
    weights = Weights("torchao", torchao_type="int8wo")
    quantized = load_model(folder, "cpu", "float32", weights=weights)
    try:
        kinds = {type(p).__name__ for p in quantized.pipeline.transformer.parameters()}
        assert "Int8Tensor" in kinds, kinds
        assert quantized.info.weights.label() == "torchao:int8wo"
        req = request(plain)
        mean, most = difference(quantized.generate(req, lambda _i, _n: None), plain.generate(req, lambda _i, _n: None))
    finally:
        plain.close()
        quantized.close()
    print(f"torchao int8wo vs plain frames differ by {mean:.4f} on average, {most} at most (of 255)")
    assert most <= 24 and mean <= 0.2  # measured: 0.036 and 10
