"""Planned sizes, frames and steps are ones each family's own pipeline accepts: planned, then really called.

Each diffusers pipeline checks height and width against a fixed multiple in its check_inputs
(8 for I2VGen-XL, SVD and CogVideoX, 16 for Wan, 32 for LTX-Video and LTX-2) whatever its config
says, so a build whose VAE and patches give a smaller step (the two variants below) used to plan
sizes the pipeline refused with a ValueError. (HunyuanVideo 1.5's pipeline takes no size: it picks
a bucket from the image, and a planned size it did not keep would fail the shape check here.) Every
call here runs the real pipeline for one step (two for LTX-Video and LTX-2, whose scheduler cannot
take one).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from i2v_daemon.models import planning
from i2v_daemon.models.base import GenerationRequest
from i2v_daemon.models.loader import load_model
from i2v_daemon.models.testing.tiny import build_tiny
from i2v_daemon.queue.jobs import Params
from i2v_daemon.work.generate import generate, plan_rungs

#: Image shapes (landscape, portrait, square, 16:9, wider than 2:1) and short sides to plan for.
IMAGES = [(96, 64), (64, 96), (100, 100), (160, 90), (300, 100)]
RESOLUTIONS = [48, 80]
#: What the pipelines' own check_inputs demand.
PIPELINE_MULTIPLE = {"i2vgen-xl": 8, "svd": 8, "wan": 16, "ltx-video": 32, "cogvideox": 8, "skyreels-v2": 16,
                     "hunyuanvideo-i2v": 16, "ltx-2": 32, "hunyuanvideo-1.5-i2v": 16}

#: Builds whose config-derived size step is finer than their pipeline accepts.
VARIANTS = {
    "svd-shallow-vae": ("svd", {"vae_levels": 2}),  # VAE 2×, UNet 2×: a step of 4 where the pipeline needs 8
    "ltx-patch-1": ("ltx-video", {"vae_patch_size": 1}),  # VAE 8×, patch 1: 8 where the pipeline needs 32
}


def _ignore(_step: int, _total: int) -> None:
    """A progress callback that does nothing."""


@pytest.fixture(scope="module")
def variant_models(tmp_path_factory: pytest.TempPathFactory):
    import torch

    torch.set_num_threads(1)
    loaded = {}
    for name, (family, options) in VARIANTS.items():
        folder = build_tiny(family, tmp_path_factory.mktemp(name), **options)
        loaded[name] = load_model(str(folder), device="cpu", dtype="float32")
    yield loaded
    for model in loaded.values():
        model.close()


def _model(name: str, tiny_model, tiny_family_models, variant_models):
    if name == "i2vgen-xl":
        return tiny_model
    if name in VARIANTS:
        return variant_models[name]
    return tiny_family_models(name)


def _run_planned(model, image_size: tuple[int, int], resolution: int, num_frames: int = 4) -> tuple[int, int, int]:
    """Plan as generate() does, then call the model's pipeline at exactly that plan; (width, height, frames) made."""
    plan = model.plan_size(image_size, resolution, None, None)
    frames = model.plan_frames(num_frames).num_frames
    steps, _ = model.plan_steps(1)
    gradient = np.linspace(0, 255, image_size[0] * image_size[1] * 3).reshape(image_size[1], image_size[0], 3)
    request = GenerationRequest(
        image=Image.fromarray(gradient.astype(np.uint8)), prompt="a cat", negative_prompt="", width=plan.width,
        height=plan.height, num_frames=frames, steps=steps, guidance_scale=2.0, fps=8, seed=1,
    )
    video = model.generate(request, _ignore)
    assert video.shape == (frames, plan.height, plan.width, 3)
    return plan.width, plan.height, frames


@pytest.mark.slow
@pytest.mark.parametrize("name", ["i2vgen-xl", "svd", "wan", "ltx-video", "cogvideox", "skyreels-v2",
                                  "hunyuanvideo-i2v", "ltx-2", "hunyuanvideo-1.5-i2v", *VARIANTS])
def test_every_planned_size_is_one_the_familys_pipeline_accepts(name, tiny_model, tiny_family_models,
                                                                  variant_models):
    model = _model(name, tiny_model, tiny_family_models, variant_models)
    family = model.info.family
    assert model.info.size_multiple % PIPELINE_MULTIPLE[family] == 0
    made = set()
    for image_size, resolution in itertools.product(IMAGES, RESOLUTIONS):
        made.add(_run_planned(model, image_size, resolution))  # a ValueError from check_inputs fails here
    for w, h, _ in made:
        assert w % PIPELINE_MULTIPLE[family] == 0 and h % PIPELINE_MULTIPLE[family] == 0
    if family != "cogvideox":  # one size only
        assert len({(w, h) for w, h, _ in made}) > 3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_build_with_a_finer_step_than_its_pipeline_plans_on_the_pipelines_grid(name, variant_models):
    model = variant_models[name]
    family = model.info.family
    assert model._limits()["size_multiple"] < PIPELINE_MULTIPLE[family]  # what the config alone says
    assert model.info.size_multiple == PIPELINE_MULTIPLE[family]
    plan = model.plan_size((160, 90), 76, None, None)
    assert plan.width % PIPELINE_MULTIPLE[family] == 0 and plan.height % PIPELINE_MULTIPLE[family] == 0
    assert any("rounded" in n for n in plan.notes)
    # What the config's step alone would have planned, the pipeline itself refuses.
    finer = planning.plan_size((160, 90), 76, None, None, model._limits()["size_multiple"])
    request = GenerationRequest(
        image=Image.new("RGB", (finer.width, finer.height)), prompt="", negative_prompt="", width=finer.width,
        height=finer.height, num_frames=model.plan_frames(4).num_frames, steps=2, guidance_scale=2.0, fps=8, seed=1,
    )
    with torch.inference_mode(), pytest.raises(ValueError, match=f"divisible by {PIPELINE_MULTIPLE[family]}"):
        model._call(request.image, request, dict(model.plan_conditioning(request).values), None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["svd", "ltx-video", *VARIANTS])
def test_the_oom_ladders_smaller_rungs_are_sizes_the_pipeline_accepts_too(name, tiny_model, tiny_family_models,
                                                                        variant_models):
    model = _model(name, tiny_model, tiny_family_models, variant_models)
    plan = model.plan_size((160, 90), 96, None, None)
    rungs = plan_rungs(model, plan.width, plan.height, [64, 48, 32])
    smaller = {(r.width, r.height) for r in rungs} - {(plan.width, plan.height)}
    assert smaller
    for w, h in sorted(smaller):
        assert _run_planned(model, (w, h), min(w, h))[:2] == (w, h)


def test_ltx_video_asked_for_one_step_runs_two_and_says_so(tiny_family_models):
    ltx = tiny_family_models("ltx-video")
    assert ltx.info.min_steps == 2
    params = Params(preset="t", resolution=64, num_frames=9, steps=1, guidance_scale=3.0, fps=8, seed=1)
    tries: list[dict] = []
    outcome = generate(ltx, Image.new("RGB", (96, 64), (90, 40, 10)), "a cat", "", params, ladder=[],
                       on_step=_ignore, on_try=tries.append)
    assert outcome.effective["steps"] == 2 and tries[0]["steps"] == 2
    assert "steps 1 raised to 2 (ltx-video's scheduler needs at least 2)" in outcome.notes
    with pytest.raises(ValueError, match="use plan_steps"):  # generate() never hands it one step
        ltx.generate(GenerationRequest(image=Image.new("RGB", (96, 64)), prompt="", negative_prompt="", width=96,
                                       height=64, num_frames=9, steps=1, guidance_scale=3.0, fps=8, seed=1), _ignore)


def test_svd_asked_for_one_frame_makes_two_and_says_so(tiny_family_models):
    svd = tiny_family_models("svd")
    params = Params(preset="t", resolution=64, num_frames=1, steps=2, guidance_scale=3.0, fps=8, seed=1)
    outcome = generate(svd, Image.new("RGB", (96, 64), (90, 40, 10)), "", "", params, ladder=[], on_step=_ignore,
                       on_try=lambda _: None)
    assert outcome.effective["num_frames"] == 2 and len(outcome.frames) == 2
    assert "num_frames 1 rounded to 2 (svd makes any number of frames, at least 2)" in outcome.notes


def test_a_size_the_pipeline_refuses_reaches_the_caller_as_the_pipelines_value_error(tiny_family_models):
    # If planning ever let one through, generate() must not turn it into something to retry: the
    # pipeline's ValueError propagates as it is, and the worker fails the job for good.
    ltx = tiny_family_models("ltx-video")
    original = ltx.info
    try:
        ltx.info = replace(original, size_multiple=16)  # a planner bug, simulated
        params = Params(preset="t", resolution=64, width=80, height=64, num_frames=9, steps=2, guidance_scale=3.0,
                        fps=8, seed=1)
        tries: list[dict] = []
        with pytest.raises(ValueError, match="divisible by 32"):
            generate(ltx, Image.new("RGB", (96, 64)), "a cat", "", params, ladder=[], on_step=_ignore,
                     on_try=tries.append)
        assert [t["outcome"] for t in tries] == ["error"] and "divisible by 32" in tries[0]["error"]
    finally:
        ltx.info = original
