"""Every image-to-video family behind the one protocol, on tiny random pipelines: plans, generation, progress."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from i2v_daemon.errors import InputError, JobCanceled
from i2v_daemon.models import schedulers
from i2v_daemon.models.base import GenerationRequest, LoraChoice
from i2v_daemon.models.loader import detect_family, resolve_dtype
from i2v_daemon.models.planning import plan_frames
from i2v_daemon.models.svd import motion_bucket_id
from i2v_daemon.work.generate import plan_rungs
from tests.fixtures_models import TINY_FAMILIES, TINY_PIPELINES

#: What each tiny family makes when asked for 4 frames at resolution 64 from a 96×64 image.
PLANNED_FRAMES = {"svd": 4, "wan": 5, "ltx-video": 9, "cogvideox": 9, "skyreels-v2": 5, "hunyuanvideo-i2v": 5,
                  "ltx-2": 9, "hunyuanvideo-1.5-i2v": 5}


def request_for(model, **changes: object) -> GenerationRequest:
    """A small request the model can honour as it is: 96×64, its planned frames for 4, 2 steps."""
    gradient = np.linspace(0, 255, 64 * 96 * 3).reshape(64, 96, 3).astype(np.uint8)
    values: dict[str, object] = {
        "image": Image.fromarray(gradient), "prompt": "a cat turns its head", "negative_prompt": "blurry",
        "width": 96, "height": 64, "num_frames": model.plan_frames(4).num_frames, "steps": 2,
        "guidance_scale": 5.0, "fps": 8, "seed": 1234,
    }
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def _ignore(_step: int, _total: int) -> None:
    """A progress callback that does nothing."""


@pytest.fixture(params=(*TINY_FAMILIES, *TINY_PIPELINES))
def family_model(request: pytest.FixtureRequest, tiny_family_models):
    return tiny_family_models(request.param)


# --- detection and plans ------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_family_is_detected_from_the_class_name_in_its_model_index(family, tiny_family_dirs):
    assert detect_family(str(tiny_family_dirs(family))) == family


def test_auto_dtype_on_a_gpu_is_bfloat16_for_the_t5_families_and_float16_for_the_unet_ones():
    families = ("i2vgen-xl", "svd", "wan", "ltx-video", "cogvideox", "skyreels-v2", "hunyuanvideo-i2v", "ltx-2",
                "hunyuanvideo-1.5-i2v")
    assert [resolve_dtype("auto", "cuda", f) for f in families] == [
        "float16", "float16", "bfloat16", "bfloat16", "bfloat16", "bfloat16", "bfloat16", "bfloat16", "bfloat16"]
    assert resolve_dtype("auto", "cpu", "wan") == "float32"


def test_frame_counts_round_to_the_nearest_count_a_family_makes_and_say_so():
    assert plan_frames(16, "wan", step=4, minimum=5).num_frames == 17
    assert plan_frames(81, "wan", step=4, minimum=5).notes == ()
    assert plan_frames(19, "wan", step=4, minimum=5).num_frames == 21  # halves round up
    assert plan_frames(2, "ltx-video", step=8, minimum=9).num_frames == 9  # never below a real video
    note = plan_frames(24, "ltx-video", step=8, minimum=9).notes[0]
    assert note == "num_frames 24 rounded to 25 (ltx-video makes 1 + a multiple of 8 frames, at least 9)"
    assert plan_frames(7, "svd").num_frames == 7


def test_more_frames_than_a_family_can_make_is_refused_rather_than_cut():
    with pytest.raises(InputError, match=r"num_frames 60 is more than cogvideox can make \(at most 49\)"):
        plan_frames(60, "cogvideox", step=8, minimum=9, maximum=49)


def test_each_tiny_family_reports_the_limits_of_its_released_architecture(tiny_family_models):
    infos = {f: tiny_family_models(f).info for f in TINY_FAMILIES}
    assert {f: i.size_multiple for f, i in infos.items()} == {
        "svd": 16, "wan": 16, "ltx-video": 32, "cogvideox": 16, "skyreels-v2": 16, "hunyuanvideo-i2v": 16,
        "ltx-2": 32, "hunyuanvideo-1.5-i2v": 16}
    assert {f: i.frame_step for f, i in infos.items()} == {
        "svd": 1, "wan": 4, "ltx-video": 8, "cogvideox": 8, "skyreels-v2": 4, "hunyuanvideo-i2v": 4, "ltx-2": 8,
        "hunyuanvideo-1.5-i2v": 4}
    assert {f: i.max_prompt_tokens for f, i in infos.items()} == {
        "svd": None, "wan": 512, "ltx-video": 128, "cogvideox": 16, "skyreels-v2": 512, "hunyuanvideo-i2v": 256,
        "ltx-2": 1024, "hunyuanvideo-1.5-i2v": 1000}
    assert {f: i.native_fps for f, i in infos.items() if i.native_fps} == {
        "wan": 16, "cogvideox": 8, "skyreels-v2": 24, "hunyuanvideo-i2v": 24, "hunyuanvideo-1.5-i2v": 24}
    assert [f for f, i in infos.items() if i.fps_conditioning] == ["svd", "ltx-video", "ltx-2"]
    assert not infos["svd"].takes_prompt and infos["svd"].motion
    assert [f for f, i in infos.items() if i.lora] == [
        "wan", "ltx-video", "cogvideox", "skyreels-v2", "hunyuanvideo-i2v", "ltx-2"]
    assert infos["cogvideox"].fixed_size == (96, 64) and infos["cogvideox"].max_frames == 9
    assert infos["svd"].savers == ("vae_slicing", "forward_chunking")  # its VAE "slices" by decoding fewer frames


def test_sizes_round_to_each_familys_multiple_with_notes(tiny_family_models):
    ltx = tiny_family_models("ltx-video")
    plan = ltx.plan_size((96, 64), 64, 100, 60)
    assert (plan.width, plan.height) == (96, 64)
    assert "width 100 rounded to 96 (the model needs multiples of 32)" in plan.notes
    wan = tiny_family_models("wan").plan_size((1280, 720), 480, None, None)
    assert (wan.width, wan.height) == (848, 480)  # 480 × 16/9 = 853 → 848 on the 16-pixel grid


def test_cogvideox_makes_only_its_trained_size_notes_resolution_and_refuses_another_explicit_size(tiny_family_models):
    cog = tiny_family_models("cogvideox")
    plan = cog.plan_size((64, 96), 512, None, None)  # a portrait image, another resolution
    assert (plan.width, plan.height) == (96, 64)
    assert any("makes only 96×64 videos" in n and "resolution 512 was not used" in n for n in plan.notes)
    assert any("center-cropped to fit 96×64" in n for n in plan.notes)
    assert cog.plan_size((96, 64), 64, 96, 64).notes == ()
    with pytest.raises(InputError, match=r"makes only 96×64 videos .*not 128×128; remove 'width' and 'height'"):
        cog.plan_size((96, 64), 64, 128, 128)
    rungs = plan_rungs(cog, 96, 64, [48, 32])
    assert {(r.width, r.height) for r in rungs} == {(96, 64)}  # the OOM ladder has no smaller size to step to


# --- conditioning -------------------------------------------------------------------------------


def test_svd_maps_motion_onto_its_buckets_takes_no_prompt_and_ramps_guidance(tiny_family_models):
    svd = tiny_family_models("svd")
    assert (motion_bucket_id(0.0), motion_bucket_id(0.5), motion_bucket_id(1.0)) == (1, 128, 255)
    plan = svd.plan_conditioning(request_for(svd, motion=0.25, guidance_scale=2.5))
    assert dict(plan.values) == {"min_guidance_scale": 1.0, "max_guidance_scale": 2.5, "fps": 8,
                                 "motion_bucket_id": 65, "noise_aug_strength": 0.02}
    assert any("takes no prompt" in n for n in plan.notes)
    assert svd.prompt_tokens("a long prompt") == 0
    assert svd.plan_conditioning(request_for(svd, prompt="", negative_prompt="")).values["motion_bucket_id"] == 127
    calm = svd.generate(request_for(svd, motion=0.0), _ignore)
    lively = svd.generate(request_for(svd, motion=1.0), _ignore)
    assert not np.array_equal(calm, lively)  # the bucket reaches the UNet


@pytest.mark.parametrize("family", ["wan", "ltx-video", "cogvideox", "skyreels-v2", "hunyuanvideo-i2v", "ltx-2",
                                    "hunyuanvideo-1.5-i2v"])
def test_families_without_a_motion_knob_say_that_motion_was_not_used(family, tiny_family_models):
    model = tiny_family_models(family)
    notes = model.plan_conditioning(request_for(model, motion=0.7)).notes
    assert f"{family} has no motion control; motion 0.7 was not used" in notes


def test_fps_reaches_the_families_that_take_it_and_a_note_tells_the_pace_of_the_others(tiny_family_models):
    ltx, wan = tiny_family_models("ltx-video"), tiny_family_models("wan")
    assert ltx.plan_conditioning(request_for(ltx, fps=12)).values["frame_rate"] == 12
    notes = wan.plan_conditioning(request_for(wan, fps=8)).notes
    assert any("makes motion for about 16 fps" in n and "plays 2× slower" in n for n in notes)
    assert not wan.plan_conditioning(request_for(wan, fps=16)).notes
    assert any("plays 2× faster" in n for n in wan.plan_conditioning(request_for(wan, fps=32)).notes)


def test_prompt_tokens_count_what_the_t5_encoders_see(tiny_family_models):
    wan = tiny_family_models("wan")
    # Character-level vocabulary: "ab" is ▁ a b, then </s>; Wan first cleans the text as its pipeline does.
    assert wan.prompt_tokens("ab") == 4
    assert wan.prompt_tokens("  ab \n") == 4


# --- generating ---------------------------------------------------------------------------------


def test_each_family_generates_its_planned_frames_and_reports_every_step(family_model):
    calls: list[tuple[int, int]] = []
    frames = family_model.generate(request_for(family_model, steps=3), lambda s, t: calls.append((s, t)))
    family = family_model.info.family
    assert frames.shape == (PLANNED_FRAMES[family], 64, 96, 3) and frames.dtype == np.uint8
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_in_each_family_the_same_seed_gives_the_same_video_and_another_seed_does_not(family_model):
    first = family_model.generate(request_for(family_model, seed=7), _ignore)
    again = family_model.generate(request_for(family_model, seed=7), _ignore)
    other = family_model.generate(request_for(family_model, seed=8), _ignore)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_cancel_at_a_step_stops_each_family_and_the_next_job_is_unaffected(family_model):
    def cancel_at_second_step(step: int, _total: int) -> None:
        if step == 2:
            raise JobCanceled("canceled by the test")

    with pytest.raises(JobCanceled):
        family_model.generate(request_for(family_model, steps=3), cancel_at_second_step)
    after = family_model.generate(request_for(family_model, steps=3), _ignore)
    fresh = family_model.generate(request_for(family_model, steps=3), _ignore)
    assert np.array_equal(after, fresh)


def test_each_familys_savers_apply_for_one_call_and_are_undone_after(family_model):
    savers = tuple(s for s in family_model.info.savers if s != "cpu_offload")
    assert savers and "cpu_offload" not in family_model.info.savers  # only useful on a GPU
    pipe = family_model.pipeline
    own = (getattr(pipe.vae, "use_slicing", False), getattr(pipe.vae, "use_tiling", False))
    tiled = family_model.info.family in ("hunyuanvideo-i2v", "hunyuanvideo-1.5-i2v")  # their model cards decode so
    assert own == (False, tiled)
    frames = family_model.generate(request_for(family_model, savers=savers), _ignore)
    assert frames.shape[0] == PLANNED_FRAMES[family_model.info.family]
    assert (getattr(pipe.vae, "use_slicing", False), getattr(pipe.vae, "use_tiling", False)) == own
    chunked = [m for d in family_model._denoisers() for m in d.modules() if getattr(m, "_chunk_size", None)]
    assert chunked == []


def test_a_frame_count_or_size_the_planner_would_not_give_is_refused_by_generate(tiny_family_models):
    wan = tiny_family_models("wan")
    with pytest.raises(ValueError, match="use plan_frames"):
        wan.generate(request_for(wan, num_frames=4), _ignore)
    with pytest.raises(ValueError, match="use plan_size"):
        wan.generate(request_for(wan, width=100), _ignore)


# --- LoRA ---------------------------------------------------------------------------------------


def test_a_lora_changes_the_video_at_its_scale_and_is_off_again_for_the_next_job(tiny_family_models, tiny_lora_dir):
    wan = tiny_family_models("wan")
    lora = LoraChoice("style", str(tiny_lora_dir / "style.safetensors"), 1.0)
    plain = wan.generate(request_for(wan), _ignore)
    styled = wan.generate(request_for(wan, lora=lora), _ignore)
    assert not np.array_equal(plain, styled)
    assert np.array_equal(wan.generate(request_for(wan, lora=replace(lora, scale=0.0)), _ignore), plain)
    assert np.array_equal(wan.generate(request_for(wan), _ignore), plain)  # disabled, not lingering


def test_a_lora_reaches_both_wan_2_2_experts_and_neither_keeps_it_for_the_next_job(tiny_family_models, tiny_lora_dir):
    import torch

    wan = tiny_family_models("wan2.2")
    pipe = wan.pipeline
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    first_calls: dict[str, tuple[dict, object]] = {}  # expert -> (arguments, output) of its first call in a job

    def recorder(name: str):
        def hook(_module, _args, kwargs, output):
            first_calls.setdefault(name, (dict(kwargs), output[0].clone()))
        return hook

    hooks = [m.register_forward_hook(recorder(n), with_kwargs=True) for n, m in experts.items()]
    lora = LoraChoice("style", str(tiny_lora_dir / "style.safetensors"), 1.0)
    try:
        plain = wan.generate(request_for(wan), _ignore)
        assert set(first_calls) == set(experts)  # 2 steps: one above the boundary, one below
        first_calls.clear()
        styled = wan.generate(request_for(wan, lora=lora), _ignore)
        in_lora_job = dict(first_calls)
        after = wan.generate(request_for(wan), _ignore)
    finally:
        for h in hooks:
            h.remove()
    assert not np.array_equal(plain, styled)
    assert np.array_equal(after, plain)  # both experts ran the last job, and both without the LoRA
    # Each expert's first call of the LoRA job, replayed through it now (LoRA off), gives other numbers:
    # the LoRA was on in each of them, not only in the high-noise one.
    for name, (kwargs, output) in in_lora_job.items():
        with torch.inference_mode():
            base = experts[name](**kwargs)[0]
        assert not torch.allclose(base, output), f"the LoRA did not change {name}"


def test_the_wan_turbo_preset_runs_its_lora_in_4_steps_without_guidance(tiny_family_models, tiny_lora_dir, tmp_path):
    from i2v_daemon.params import merge
    from i2v_daemon.settings import load_settings
    from i2v_daemon.work.generate import generate

    config = tmp_path / "config.toml"
    config.write_text(f'lora_dir = "{tiny_lora_dir}"\ndefault_preset = "wan-turbo"\n'  # the one value to set,
                      '[presets.wan-turbo]\nlora = "style.safetensors"\n'
                      "resolution = 64\nnum_frames = 5\n")  # and a size two CPU cores can take
    settings = load_settings(str(config), data_dir=str(tmp_path / "data"))
    params = merge({}, presets=settings.all_presets(), default_preset=settings.default_preset)
    wan = tiny_family_models("wan")
    image = request_for(wan).image
    calls: list[int] = []
    hook = wan.pipeline.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        turbo = generate(wan, image, "a cat turns its head", "", params, ladder=[], on_step=_ignore,
                         on_try=lambda _t: None, lora_dir=settings.lora_dir)
    finally:
        hook.remove()
    eff = turbo.effective
    assert (eff["steps"], eff["guidance_scale"], eff["lora"], eff["lora_scale"]) == (4, 1.0, "style.safetensors", 1.0)
    assert eff["conditioning"]["guidance_scale"] == 1.0
    assert len(calls) == 4  # guidance 1: one transformer call a step, no unconditional half
    plain = generate(wan, image, "a cat turns its head", "", params.model_copy(update={"lora": None}), ladder=[],
                     on_step=_ignore, on_try=lambda _t: None)
    assert not np.array_equal(turbo.frames, plain.frames)  # the LoRA was applied


def test_a_lora_on_a_family_without_a_lora_loader_is_refused(tiny_family_models, tiny_lora_dir):
    svd = tiny_family_models("svd")
    lora = LoraChoice("style", str(tiny_lora_dir / "style.safetensors"))
    with pytest.raises(InputError, match="svd cannot apply a LoRA"):
        svd.generate(request_for(svd, lora=lora), _ignore)


def test_a_file_that_is_not_a_lora_is_an_input_error_and_the_model_keeps_working(tiny_family_models, tmp_path: Path):
    ltx = tiny_family_models("ltx-video")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    before = ltx.generate(request_for(ltx), _ignore)
    with pytest.raises(InputError, match="lora 'junk' does not fit this ltx-video model"):
        ltx.generate(request_for(ltx, lora=LoraChoice("junk", str(junk))), _ignore)
    assert np.array_equal(ltx.generate(request_for(ltx), _ignore), before)


# --- step caches --------------------------------------------------------------------------------


def _job(model, params):
    from i2v_daemon.work.generate import generate

    tries: list[dict] = []
    outcome = generate(model, request_for(model).image, "a cat turns its head", "blurry", params, ladder=[],
                       on_step=_ignore, on_try=tries.append)
    return outcome, tries


@pytest.mark.parametrize("cache", ["first-block", "pab"])
def test_a_step_cache_is_on_for_its_job_only_and_recorded_in_the_try(tiny_family_models, cache):
    from i2v_daemon.params import Params

    wan = tiny_family_models("wan-2-blocks")
    params = Params(preset="t", resolution=64, num_frames=5, steps=6, guidance_scale=5.0, fps=8, seed=1)
    # The last block's self-attention projection runs only when that block's attention is computed.
    computed: list[int] = []
    hook = wan.pipeline.transformer.blocks[-1].attn1.to_q.register_forward_hook(lambda *_: computed.append(1))
    try:
        plain, tries = _job(wan, params)
        assert tries[0]["cache"] == "off" and plain.effective["cache"] == "off"
        full = len(computed)
        assert full == 12  # 6 steps, each with its conditional and unconditional call
        computed.clear()
        cached, tries = _job(wan, params.model_copy(update={"cache": cache}))
    finally:
        hook.remove()
    assert tries[0]["cache"] == cache and cached.effective["cache"] == cache and tries[0]["outcome"] == "succeeded"
    assert 0 < len(computed) < full  # some steps reused the cached work
    assert not any(m.is_cache_enabled for m in wan._denoisers())
    assert np.array_equal(_job(wan, params)[0].frames, plain.frames)  # the next job runs plain
    assert not wan.fast_path_for(request_for(wan, cache=cache)) and wan.fast_path_for(request_for(wan))


def test_a_step_cache_on_a_unet_family_is_refused_before_any_work(tiny_family_models):
    svd = tiny_family_models("svd")
    assert svd.info.caches == () and tiny_family_models("wan").info.caches == ("first-block", "pab")
    with pytest.raises(InputError, match=r"svd cannot use cache = 'pab': its denoiser has none of diffusers' step "
                                         r"caches .*set cache = \"off\" in the preset or the config"):
        svd.generate(request_for(svd, cache="pab"), _ignore)


def test_a_family_without_measured_anchors_tries_every_rung_until_its_own_tries_are_recorded():
    from i2v_daemon.models.memory import GIB, MemoryModel

    memory = MemoryModel(budget_bytes=24 * GIB, resident_bytes=10 * GIB, anchor_slope=None)
    assert memory.fits(1280, 720, 81)  # nothing known yet: the I2VGen-XL anchors do not apply, so try it
    memory.learn([{"width": 832, "height": 480, "num_frames": 81, "savers": [], "outcome": "succeeded",
                   "peak_vram_bytes": 20 * GIB}])
    assert memory.fits(832, 480, 81) and not memory.fits(1280, 720, 81)


def test_wan_in_half_precision_keeps_its_vae_and_image_encoder_in_float32_and_runs(tiny_family_dirs):
    import torch

    from i2v_daemon.models.loader import load_model

    wan = load_model(str(tiny_family_dirs("wan")), device="cpu", dtype="bfloat16")
    try:
        pipe = wan.pipeline
        assert (pipe.transformer.dtype, pipe.text_encoder.dtype) == (torch.bfloat16, torch.bfloat16)
        assert (pipe.vae.dtype, pipe.image_encoder.dtype) == (torch.float32, torch.float32)
        assert wan.generate(request_for(wan), _ignore).shape == (5, 64, 96, 3)
    finally:
        wan.close()


def test_ltx_video_0_9_5_and_later_run_the_condition_pipeline_with_the_image_as_frame_0s_keyframe(
    tiny_family_dirs, tiny_family_models
):
    from i2v_daemon.models.ltx import LTXConditionModel

    assert detect_family(str(tiny_family_dirs("ltx-condition"))) == "ltx-video"
    ltx = tiny_family_models("ltx-condition")
    assert isinstance(ltx, LTXConditionModel) and type(ltx.pipeline).__name__ == "LTXConditionPipeline"
    info, older = ltx.info, tiny_family_models("ltx-video").info
    assert (info.size_multiple, info.frame_step, info.min_frames, info.fps_conditioning, info.lora) == (
        older.size_multiple, older.frame_step, older.min_frames, older.fps_conditioning, older.lora)
    assert info.max_prompt_tokens == 256  # the condition pipeline's T5 length (128 for the other)
    values = ltx.plan_conditioning(request_for(ltx, fps=12)).values
    assert (values["frame_rate"], values["max_sequence_length"], values["image_cond_noise_scale"]) == (12, 256, 0.025)
    timesteps: list = []
    hook = ltx.pipeline.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: timesteps.append(kwargs["timestep"].clone()), with_kwargs=True)
    try:
        frames = ltx.generate(request_for(ltx), _ignore)
    finally:
        hook.remove()
    first = (64 // 32) * (96 // 32)  # tokens of the first latent frame: the image's
    for t in timesteps:  # the keyframe is clean at every step, the rest is being denoised
        assert (t[:, :first] == 0).all() and (t[:, first:] > 0).all()
    darker = request_for(ltx, image=Image.fromarray((np.asarray(request_for(ltx).image) // 2).astype(np.uint8)))
    assert not np.array_equal(ltx.generate(darker, _ignore), frames)


def test_hunyuanvideo_i2v_keeps_the_images_latent_frame_and_reads_the_image_in_its_prompt(tiny_family_models):
    import torch

    hy = tiny_family_models("hunyuanvideo-i2v")
    pipe = hy.pipeline
    inputs: list = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: inputs.append((kwargs["hidden_states"].clone(), kwargs["guidance"].clone(),
                                              kwargs["encoder_hidden_states"].shape)), with_kwargs=True)
    seen: list = []
    vision = pipe.text_encoder.model.vision_tower.register_forward_hook(lambda *_: seen.append(1))
    try:
        frames = hy.generate(request_for(hy, steps=3, guidance_scale=6.0), _ignore)
    finally:
        hook.remove()
        vision.remove()
    assert len(inputs) == 3  # guidance is embedded: one pass a step, no unconditional one
    assert all(g.tolist() == [6000.0] for _, g, _ in inputs)  # the scale, as the model was distilled with it
    first = inputs[0][0][:, :, 0]
    assert all(torch.equal(h[:, :, 0], first) for h, _, _ in inputs)  # token_replace: the image's frame stays
    assert not torch.equal(inputs[0][0][:, :, 1:], inputs[-1][0][:, :, 1:])  # the others are denoised
    assert inputs[0][2][1] == 576 // 4 + 256 - 4  # every 4th of the image's 576 LLaVA tokens, then the text
    assert seen == [1]  # the LLaVA vision tower read the image once, for the prompt
    notes = hy.plan_conditioning(request_for(hy)).notes
    assert any("the negative prompt was not used" in n for n in notes)
    darker = request_for(hy, image=Image.fromarray((np.asarray(request_for(hy).image) // 2).astype(np.uint8)))
    assert not np.array_equal(hy.generate(darker, _ignore), frames)


def test_hunyuanvideo_i2v_33ch_runs_true_guidance_and_makes_the_planned_frames(tiny_family_models):
    hy = tiny_family_models("hunyuanvideo-i2v-33ch")
    assert hy.pipeline.transformer.config.image_condition_type == "latent_concat"
    values = hy.plan_conditioning(request_for(hy, guidance_scale=4.0)).values
    assert (values["guidance_scale"], values["true_cfg_scale"]) == (1.0, 4.0)
    calls: list = []
    hook = hy.pipeline.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(kwargs["guidance"]), with_kwargs=True)
    try:
        frames = hy.generate(request_for(hy, steps=2, guidance_scale=4.0), _ignore)
    finally:
        hook.remove()
    assert calls == [None] * 4  # no guidance embedding: a conditional and an unconditional pass a step
    # The pipeline decodes 4 leading frames more and cuts them off; asked for 4 more, it gives the planned 5.
    assert frames.shape == (5, 64, 96, 3)


def test_ltx2_denoises_an_audio_track_with_the_video_and_keeps_only_the_frames(tiny_family_models):
    from i2v_daemon.models.ltx2 import AUDIO_NOTE, NO_AV_NOTE, have_pyav

    ltx2 = tiny_family_models("ltx-2")
    pipe = ltx2.pipeline
    plan = ltx2.plan_conditioning(request_for(ltx2, fps=12, guidance_scale=4.0))
    values = plan.values
    assert (values["frame_rate"], values["guidance_scale"], values["audio_guidance_scale"]) == (12, 4.0, 4.0)
    # LTX-2.0's recipe: guidance alone (no spatio-temporal or modality pass), each modality's own sigma
    assert (values["stg_scale"], values["modality_scale"], values["use_cross_timestep"]) == (0.0, 1.0, False)
    assert AUDIO_NOTE in plan.notes
    assert (NO_AV_NOTE in plan.notes) == (values.get("image_crf") == 0) == (not have_pyav())
    calls: list = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append((kwargs["hidden_states"].shape[0], kwargs["audio_hidden_states"].shape,
                                             kwargs["timestep"].clone(), kwargs["fps"])), with_kwargs=True)
    waveforms: list = []
    vocoder = pipe.vocoder.register_forward_hook(lambda _m, _a, out: waveforms.append(out.shape))
    try:
        frames = ltx2.generate(request_for(ltx2, steps=3, fps=12, guidance_scale=4.0), _ignore)
    finally:
        hook.remove()
        vocoder.remove()
    assert frames.shape == (9, 64, 96, 3)
    assert [batch for batch, *_ in calls] == [2, 2, 2]  # one pass a step, the unconditional half batched in
    # 9 frames at 12 fps are 0.75 s of audio: 19 latent audio frames (16 kHz, hop 160, 4× compressed), denoised too
    assert all(audio[:2] == (2, 19) for _, audio, _, _ in calls)
    first = (64 // 32) * (96 // 32)  # tokens of the first latent frame: the image's, clean at every step
    assert all((t[:, :first] == 0).all() and (t[:, first:] > 0).all() for _, _, t, _ in calls)
    assert {fps for *_, fps in calls} == {12.0}  # the frame rate reaches its positions
    assert len(waveforms) == 1  # the pipeline made the waveform; the daemon took the frames only
    darker = request_for(ltx2, image=Image.fromarray((np.asarray(request_for(ltx2).image) // 2).astype(np.uint8)))
    assert not np.array_equal(ltx2.generate(replace(darker, steps=3, fps=12, guidance_scale=4.0), _ignore), frames)


def test_ltx2_published_as_its_text_to_video_pipeline_runs_as_image_to_video(tiny_family_dirs, tmp_path: Path):
    import json
    import shutil

    from i2v_daemon.models.loader import load_model

    folder = shutil.copytree(tiny_family_dirs("ltx-2"), tmp_path / "ltx-2")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "LTX2Pipeline"}))  # as released
    assert detect_family(str(folder)) == "ltx-2"
    ltx2 = load_model(str(folder), device="cpu", dtype="float32")
    try:
        assert type(ltx2.pipeline).__name__ == "LTX2ImageToVideoPipeline"
        assert ltx2.generate(request_for(ltx2), _ignore).shape == (9, 64, 96, 3)
    finally:
        ltx2.close()


def test_a_lora_reaches_ltx2s_transformer_at_its_scale_and_is_off_for_the_next_job(tiny_family_dirs, tmp_path: Path):
    from i2v_daemon.models.loader import load_model
    from i2v_daemon.models.testing.tiny import build_tiny_lora

    path = build_tiny_lora(tiny_family_dirs("ltx-2"), tmp_path / "style.safetensors")
    ltx2 = load_model(str(tiny_family_dirs("ltx-2")), device="cpu", dtype="float32")
    try:
        lora = LoraChoice("style", str(path), 1.0)
        plain = ltx2.generate(request_for(ltx2), _ignore)
        assert not np.array_equal(ltx2.generate(request_for(ltx2, lora=lora), _ignore), plain)
        assert np.array_equal(ltx2.generate(request_for(ltx2, lora=replace(lora, scale=0.0)), _ignore), plain)
        assert np.array_equal(ltx2.generate(request_for(ltx2), _ignore), plain)
    finally:
        ltx2.close()


def test_hunyuanvideo_15_makes_the_size_its_pipeline_picks_for_the_images_shape(tiny_family_models):
    hy = tiny_family_models("hunyuanvideo-1.5-i2v")
    assert hy.pipeline.target_size == 80  # the tiny build's buckets hold about 80×80 pixels (the 480p release: 640)
    square = hy.plan_size((100, 100), 64, None, None)
    assert (square.width, square.height) == (80, 80)
    assert square.notes == ("hunyuanvideo-1.5-i2v makes the sizes of its 80×80-pixel buckets: 80×80 for this image; "
                            "resolution 64 was not used",)
    wide = hy.plan_size((160, 90), 64, None, None)
    assert (wide.width, wide.height) == (96, 64)
    assert wide.notes == ("the image (160×90) will be center-cropped to fit 96×64",)
    assert hy.plan_size((96, 64), 64, 96, 64).notes == ()  # one of its sizes, asked for
    with pytest.raises(InputError, match=r"makes only the sizes of its 80×80-pixel buckets, one for each image shape, "
                                         r"which its pipeline picks itself: not 128×128; remove 'width' and 'height', "
                                         r"or set them to 96 and 64"):
        hy.plan_size((96, 64), 64, 128, 128)
    assert {(r.width, r.height) for r in plan_rungs(hy, 96, 64, [48, 32])} == {(96, 64)}  # no smaller size to step to
    portrait = hy.plan_size((64, 96), 64, None, None)
    assert (portrait.width, portrait.height) == (64, 96)
    tall = Image.fromarray(np.linspace(0, 255, 96 * 64 * 3).reshape(96, 64, 3).astype(np.uint8))
    frames = hy.generate(request_for(hy, image=tall, width=64, height=96), _ignore)
    assert frames.shape == (5, 96, 64, 3)  # the pipeline kept the planned size
    with pytest.raises(ValueError, match=r"is not a size hunyuanvideo-1\.5-i2v makes; use plan_size"):
        hy.generate(request_for(hy, width=128, height=64), _ignore)


def test_hunyuanvideo_15_guides_at_the_jobs_scale_and_reads_quoted_text_with_byt5(tiny_family_models):
    hy = tiny_family_models("hunyuanvideo-1.5-i2v")
    pipe = hy.pipeline
    texts: list = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: texts.append(kwargs["encoder_hidden_states"].shape), with_kwargs=True)
    glyphs: list = []
    byt5 = pipe.text_encoder_2.register_forward_hook(lambda *_: glyphs.append(1))
    try:
        guided = hy.generate(request_for(hy, steps=2, guidance_scale=4.0), _ignore)
        assert len(texts) == 4 and glyphs == []  # a conditional and an unconditional pass a step; nothing quoted
        assert texts[0][1] == 1000  # Qwen2.5-VL's 1000 tokens after the system message the pipeline cuts off
        texts.clear()
        plain = hy.generate(request_for(hy, steps=2, guidance_scale=1.0), _ignore)
        assert len(texts) == 2  # guidance 1: one pass a step
        hy.generate(request_for(hy, steps=2, prompt='a cat turns its head to a sign saying "hello"'), _ignore)
    finally:
        hook.remove()
        byt5.remove()
    assert glyphs == [1]  # the quoted text, read by byT5 once (the negative prompt quotes nothing)
    assert not np.array_equal(guided, plain)
    assert pipe.guider.guidance_scale == 6.0  # the released scale is back in its guider
    assert hy.prompt_tokens("a cat") == 2 + 5  # the words, and the template's closing tokens the model reads


def test_skyreels_v2_in_half_precision_keeps_its_vae_in_float32_and_runs(tiny_family_dirs):
    import torch

    from i2v_daemon.models.loader import load_model

    sky = load_model(str(tiny_family_dirs("skyreels-v2")), device="cpu", dtype="bfloat16")
    try:
        pipe = sky.pipeline
        assert type(pipe).__name__ == "SkyReelsV2ImageToVideoPipeline"
        assert (pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.image_encoder.dtype) == (torch.bfloat16,) * 3
        assert pipe.vae.dtype == torch.float32
        assert sky.generate(request_for(sky), _ignore).shape == (5, 64, 96, 3)
    finally:
        sky.close()


def test_skyreels_v2_sees_the_image_through_its_clip_tokens_as_well_as_its_latents(tiny_family_models):
    sky = tiny_family_models("skyreels-v2")
    seen: list[tuple[int, ...]] = []
    # The pipeline takes the penultimate layer's hidden states, as Wan 2.1 does.
    hook = sky.pipeline.image_encoder.register_forward_hook(
        lambda _m, _a, out: seen.append(tuple(out.hidden_states[-2].shape)))
    try:
        frames = sky.generate(request_for(sky), _ignore)
    finally:
        hook.remove()
    assert seen == [(1, 5, 8)]  # one encode per job: 4 patches and the class token, 8 wide
    darker = request_for(sky, image=Image.fromarray((np.asarray(request_for(sky).image) // 2).astype(np.uint8)))
    assert not np.array_equal(sky.generate(darker, _ignore), frames)


def test_ltx_video_published_as_its_text_to_video_pipeline_runs_as_image_to_video(tiny_family_dirs, tmp_path: Path):
    import json
    import shutil

    from i2v_daemon.models.loader import load_model

    folder = shutil.copytree(tiny_family_dirs("ltx-video"), tmp_path / "ltx")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "LTXPipeline"}))
    assert detect_family(str(folder)) == "ltx-video"
    ltx = load_model(str(folder), device="cpu", dtype="float32")
    try:
        assert type(ltx.pipeline).__name__ == "LTXImageToVideoPipeline"
        assert ltx.generate(request_for(ltx), _ignore).shape == (9, 64, 96, 3)
    finally:
        ltx.close()


# --- the scheduler key --------------------------------------------------------------------------


def test_each_family_offers_the_schedulers_its_noise_schedule_supports(tiny_family_models):
    offered = {f: tiny_family_models(f).info.schedulers for f in TINY_FAMILIES}
    assert offered == {"svd": ("euler",), "wan": ("dpm++", "unipc"), "ltx-video": ("flow-match-euler",),
                       "cogvideox": ("ddim", "dpm++"), "skyreels-v2": ("dpm++", "unipc"),
                       "hunyuanvideo-i2v": ("flow-match-euler",), "ltx-2": ("flow-match-euler",),
                       "hunyuanvideo-1.5-i2v": ("flow-match-euler",)}
    for family in ("wan", "cogvideox", "skyreels-v2"):
        model = tiny_family_models(family)
        default = model.generate(request_for(model), _ignore)
        dpm = model.generate(request_for(model, scheduler="dpm++"), _ignore)
        assert dpm.shape == default.shape and not np.array_equal(dpm, default)
        assert schedulers.name_of(model.pipeline.scheduler) == model.info.scheduler  # back to its own


@pytest.mark.parametrize(("family", "name"), [("svd", "dpm++"), ("ltx-video", "ddim"), ("wan", "ddim")])
def test_a_scheduler_a_family_cannot_take_is_refused_before_any_work(family, name, tiny_family_models):
    from i2v_daemon.queue.jobs import Params
    from i2v_daemon.work.generate import generate

    model = tiny_family_models(family)
    params = Params(preset="t", resolution=64, num_frames=9, steps=2, guidance_scale=3.0, fps=8, seed=1,
                    scheduler=name)
    tries: list[dict] = []
    with pytest.raises(InputError, match=rf"scheduler '{re.escape(name)}' is not available for {family} .*'default'"):
        generate(model, Image.new("RGB", (96, 64)), "a cat", "", params, ladder=[], on_step=_ignore,
                 on_try=tries.append)
    assert tries == []
