"""The model seam on a tiny random I2VGen-XL: detection, sizes, prompts, generation, progress."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from i2v_daemon.errors import ConfigError, GenerationError, JobCanceled, ModelUnavailable
from i2v_daemon.models.base import GenerationRequest
from i2v_daemon.models.i2vgen_xl import I2VGenXLModel, _size_multiple, plan_size
from i2v_daemon.models.loader import detect_family, load_model, resolve_device, resolve_dtype


def _request(**changes: object) -> GenerationRequest:
    """A small, fast request: 64 wide, 96 high, 4 frames, 2 steps."""
    gradient = np.linspace(0, 255, 120 * 80 * 3).reshape(120, 80, 3).astype(np.uint8)
    values: dict[str, object] = {
        "image": Image.fromarray(gradient),
        "prompt": "a cat slowly turns its head",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 96,
        "num_frames": 4,
        "steps": 2,
        "guidance_scale": 9.0,
        "fps": 8,
        "seed": 1234,
    }
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def _ignore_steps(_step: int, _total: int) -> None:
    """A progress callback that does nothing."""


# --- family detection ---------------------------------------------------------------------


def test_a_folder_with_an_i2vgen_xl_model_index_is_detected(tiny_i2vgen_dir: Path) -> None:
    assert detect_family(str(tiny_i2vgen_dir)) == "i2vgen-xl"


def test_an_unknown_pipeline_class_is_refused_with_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match="StableDiffusionPipeline") as err:
        detect_family(str(tmp_path))
    assert "I2VGenXLPipeline" in str(err.value) and "WanImageToVideoPipeline" in str(err.value)


def test_a_folder_without_model_index_says_which_folder_to_point_at(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no model_index\.json"):
        detect_family(str(tmp_path))


def test_a_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        detect_family(str(tmp_path / "nowhere"))


def test_a_hub_model_that_cannot_be_downloaded_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    # Not cached and offline: it cannot be had now (the daemon waits and retries), not a broken config.
    with pytest.raises(ModelUnavailable, match="cannot be downloaded now") as err:
        detect_family("i2v-daemon-tests/no-such-model")
    assert "hf download i2v-daemon-tests/no-such-model" in str(err.value)  # the installed hub's command
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "local diffusers folder" in str(err.value)


def test_auto_device_and_dtype_mean_cpu_and_float32_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == "cpu"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "float16"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="dtype 'half'"):
        resolve_dtype("half", "cpu")


# --- sizes --------------------------------------------------------------------------------


def test_the_size_multiple_is_64_for_the_released_architecture() -> None:
    pipe = SimpleNamespace(
        vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(block_out_channels=(320, 640, 1280, 1280)))
    )
    assert _size_multiple(pipe) == 64


def _size(image_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) planned from `resolution` alone, on the released model's 64-pixel grid."""
    plan = plan_size(image_size, resolution, None, None, 64)
    return plan.width, plan.height


def test_the_short_side_is_the_resolution_and_the_long_side_follows_the_image() -> None:
    assert _size((1280, 720), 512) == (896, 512)  # 512 × 16/9 = 910 → 896
    assert _size((720, 1280), 512) == (512, 896)
    assert _size((1000, 1000), 512) == (512, 512)
    assert _size((1280, 960), 768) == (1024, 768)
    assert plan_size((1000, 1000), 512, None, None, 64).notes == ()


def test_a_resolution_off_the_grid_is_rounded_with_a_note() -> None:
    plan = plan_size((800, 800), 500, None, None, 64)
    assert (plan.width, plan.height) == (512, 512)
    assert plan.notes == ("resolution 500 rounded to 512 (the model needs multiples of 64)",)


def test_a_panorama_is_clamped_to_two_to_one_with_a_crop_note() -> None:
    plan = plan_size((3000, 1000), 512, None, None, 64)
    assert (plan.width, plan.height) == (1024, 512)
    assert any("center-cropped to 2:1" in note for note in plan.notes)


def test_an_explicit_size_is_rounded_per_side_to_at_least_one_multiple() -> None:
    plan = plan_size((500, 300), 512, 500, 10, 64)
    assert (plan.width, plan.height) == (512, 64)
    assert "width 500 rounded to 512 (the model needs multiples of 64)" in plan.notes
    assert "height 10 rounded to 64 (the model needs multiples of 64)" in plan.notes


def test_an_explicit_size_on_the_grid_with_the_images_shape_has_no_notes() -> None:
    assert plan_size((1280, 768), 512, 640, 384, 64).notes == ()


def test_the_tiny_model_reports_its_own_multiple(tiny_model: I2VGenXLModel) -> None:
    assert tiny_model.info.size_multiple == 16  # VAE 8x, one UNet down-sampling
    assert tiny_model.plan_size((120, 80), 64, None, None).width == 96


# --- prompts ------------------------------------------------------------------------------


def test_prompt_tokens_count_every_token_before_truncation(tiny_model: I2VGenXLModel) -> None:
    # The tiny tokenizer has no merges: one token per character, plus BOS and EOS.
    assert tiny_model.prompt_tokens("ab") == 4
    assert tiny_model.prompt_tokens("x" * 200) == 202
    assert tiny_model.info.max_prompt_tokens == 77


def test_prompt_embeddings_equal_the_pipelines_own_clip_skip_1_path(tiny_model: I2VGenXLModel) -> None:
    pipe = tiny_model.pipeline
    encoder = pipe.text_encoder
    # Give the v5 encoder the v4 attribute the pipeline reads, so its clip_skip path runs as it did.
    encoder.text_model = SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
    pipe._guidance_scale = 9.0
    try:
        with torch.inference_mode():
            ours = tiny_model.encode_prompt("a cat"), tiny_model.encode_prompt("blurry")
            theirs = pipe.encode_prompt("a cat", "cpu", 1, negative_prompt="blurry", clip_skip=1)
    finally:
        del encoder.text_model
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])


def test_prompt_embeddings_are_the_normalised_penultimate_layer(tiny_model: I2VGenXLModel) -> None:
    pipe = tiny_model.pipeline
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = pipe.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
        manual = pipe.text_encoder.final_layer_norm(hidden)
        ours = tiny_model.encode_prompt("a cat")
        plain, _ = pipe.encode_prompt("a cat", "cpu", 1, clip_skip=None)
    assert ours.shape == (1, 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(ours, manual)
    assert not torch.allclose(ours, plain)  # the last layer's output is a different embedding


# --- generation ---------------------------------------------------------------------------


def test_generate_returns_uint8_frames_of_the_requested_non_square_size(tiny_model: I2VGenXLModel) -> None:
    frames = tiny_model.generate(_request(), _ignore_steps)
    assert frames.shape == (4, 96, 64, 3)
    assert frames.dtype == np.uint8


def test_the_same_seed_gives_the_same_frames_and_another_seed_does_not(tiny_model: I2VGenXLModel) -> None:
    first = tiny_model.generate(_request(seed=7), _ignore_steps)
    again = tiny_model.generate(_request(seed=7), _ignore_steps)
    other = tiny_model.generate(_request(seed=8), _ignore_steps)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_progress_is_reported_after_every_step(tiny_model: I2VGenXLModel) -> None:
    calls: list[tuple[int, int]] = []
    tiny_model.generate(_request(steps=3), lambda step, total: calls.append((step, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_a_cancel_from_on_step_stops_the_job_and_the_next_job_is_unaffected(tiny_model: I2VGenXLModel) -> None:
    def cancel_at_second_step(step: int, _total: int) -> None:
        if step == 2:
            raise JobCanceled("canceled by the test")

    with pytest.raises(JobCanceled):
        tiny_model.generate(_request(steps=3), cancel_at_second_step)
    assert not tiny_model.pipeline.unet._forward_hooks  # the progress hook is gone
    after = tiny_model.generate(_request(steps=3), _ignore_steps)
    fresh = tiny_model.generate(_request(steps=3), _ignore_steps)
    assert np.array_equal(after, fresh)


def test_memory_savers_apply_for_one_call_and_are_undone_after(tiny_model: I2VGenXLModel) -> None:
    savers = ("vae_slicing", "vae_tiling", "forward_chunking")
    assert set(savers) <= set(tiny_model.info.savers)
    assert "cpu_offload" not in tiny_model.info.savers  # only useful on a GPU
    frames = tiny_model.generate(_request(savers=savers), _ignore_steps)
    assert frames.shape == (4, 96, 64, 3)
    vae = tiny_model.pipeline.vae
    assert not vae.use_slicing
    assert not vae.use_tiling
    with pytest.raises(ValueError, match="cpu_offload"):
        tiny_model.generate(_request(savers=("cpu_offload",)), _ignore_steps)


def test_versions_name_the_libraries_that_made_the_video(tiny_model: I2VGenXLModel) -> None:
    assert set(tiny_model.versions()) == {"torch", "diffusers", "transformers"}
    assert tiny_model.info.revision is None  # a local folder has no Hub commit
    assert (tiny_model.device, tiny_model.dtype) == ("cpu", "float32")


def test_a_closed_model_refuses_to_generate(tiny_i2vgen_dir: Path) -> None:
    model = load_model(str(tiny_i2vgen_dir), device="cpu")
    model.close()
    model.close()  # closing twice is harmless
    with pytest.raises(GenerationError, match="closed"):
        model.generate(_request(), _ignore_steps)


# --- the scheduler key (an opt-in trade-off) ----------------------------------------------------


def test_dpm_plus_plus_runs_on_i2vgen_xls_own_schedule_and_the_manifest_names_it(tiny_model: I2VGenXLModel) -> None:
    from i2v_daemon.queue.jobs import Params
    from i2v_daemon.work.generate import generate

    assert (tiny_model.info.scheduler, tiny_model.info.schedulers) == ("ddim", ("ddim", "dpm++"))
    image = _request().image
    outcomes = {}
    for name in (None, "default", "ddim", "dpm++"):
        params = Params(preset="t", resolution=64, num_frames=4, steps=3, guidance_scale=9.0, fps=8, seed=5,
                        scheduler=name)
        outcomes[name] = generate(tiny_model, image, "a cat", "", params, ladder=[], on_step=_ignore_steps,
                                  on_try=lambda _t: None)
    assert [outcomes[n].effective["scheduler"] for n in outcomes] == ["ddim", "ddim", "ddim", "dpm++"]
    assert np.array_equal(outcomes[None].frames, outcomes["ddim"].frames)  # ddim is the released default
    assert not np.array_equal(outcomes["ddim"].frames, outcomes["dpm++"].frames)
    swapped = tiny_model._schedulers["dpm++"]
    assert swapped.config.prediction_type == "v_prediction" and swapped.config.rescale_betas_zero_snr
    assert swapped.config.algorithm_type == "dpmsolver++" and swapped.config.timestep_spacing == "trailing"
    assert type(tiny_model.pipeline.scheduler).__name__ == "DDIMScheduler"  # the next job gets the default back


def test_frames_converted_on_the_device_are_the_bytes_numpy_makes(tiny_model: I2VGenXLModel) -> None:
    from i2v_daemon.models.runtime import frames_to_uint8, to_uint8

    frames = torch.rand(3, 3, 8, 10) * 1.2 - 0.1  # out of range on both sides, and halves to round
    frames[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255])
    expected = to_uint8(frames.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(frames_to_uint8(frames), expected)
