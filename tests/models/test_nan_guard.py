"""NaN or Inf in decoded frames is an error of the try, never a black or white video.

The tiny LTX-Video runs in bfloat16 on the CPU (its VAE too); a forward hook on its VAE decoder
stands for a decoder whose numbers overflow, in half precision only or whatever the precision.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from i2v_daemon.errors import GenerationError
from i2v_daemon.params import Params
from i2v_daemon.work.generate import generate

IMAGE = Image.fromarray(np.linspace(0, 255, 64 * 96 * 3).reshape(64, 96, 3).astype(np.uint8))
PARAMS = Params(preset="t", resolution=64, num_frames=9, steps=2, guidance_scale=3.0, fps=8, seed=5)


@pytest.fixture(scope="module")
def half_ltx(tiny_family_dirs) -> Iterator[object]:
    from i2v_daemon.models.loader import load_model

    torch.set_num_threads(1)
    model = load_model(str(tiny_family_dirs("ltx-video")), device="cpu", dtype="bfloat16")
    assert model.pipeline.vae.dtype == torch.bfloat16
    yield model
    model.close()


def _job(model):
    tries: list[dict] = []
    try:
        return generate(model, IMAGE, "a cat turns its head", "", PARAMS, ladder=[], on_step=lambda _s, _t: None,
                        on_try=tries.append), tries
    except GenerationError as err:
        return err, tries


def _overflow_in_half_precision(_module, _args, output):
    return output * float("nan") if output.dtype != torch.float32 else None


def _overflow_always(_module, _args, output):
    return output * float("inf")


def test_nan_decoded_in_half_precision_is_decoded_again_with_the_vae_in_float32_and_noted(half_ltx):
    hook = half_ltx.pipeline.vae.decoder.register_forward_hook(_overflow_in_half_precision)
    try:
        outcome, tries = _job(half_ltx)
    finally:
        hook.remove()
    (entry,) = tries
    assert entry["outcome"] == "succeeded" and entry["vae_float32"] is True
    assert "the VAE decoded NaN or Inf in bfloat16; the try was made again with the VAE in float32" in outcome.notes
    assert outcome.frames.std() > 0  # a picture, not one flat colour
    assert half_ltx.pipeline.vae.dtype == torch.bfloat16 and "decode" not in vars(half_ltx.pipeline.vae)
    plain, tries = _job(half_ltx)  # the next job: the VAE in bfloat16 again, nothing to note
    assert "vae_float32" not in tries[0] and not any("NaN" in n for n in plain.notes)


def test_inf_that_persists_in_float32_fails_the_try_with_what_to_do(half_ltx):
    hook = half_ltx.pipeline.vae.decoder.register_forward_hook(_overflow_always)
    try:
        err, tries = _job(half_ltx)
    finally:
        hook.remove()
    assert isinstance(err, GenerationError)
    assert "decoded frames holding NaN or Inf with its VAE in bfloat16 and again in float32" in str(err)
    assert "try another seed" in str(err)
    (entry,) = tries
    assert entry["outcome"] == "generation" and entry["vae_float32"] is True
    assert half_ltx.pipeline.vae.dtype == torch.bfloat16


def test_a_vae_already_in_float32_fails_at_once_without_a_second_try(tiny_family_models):
    wan = tiny_family_models("wan")  # float32 throughout on the CPU
    calls: list[int] = []
    counter = wan.pipeline.transformer.register_forward_hook(lambda *_: calls.append(1))
    hook = wan.pipeline.vae.decoder.register_forward_hook(_overflow_always)
    try:
        err, tries = _job(wan)
    finally:
        hook.remove()
        counter.remove()
    assert isinstance(err, GenerationError) and "with its VAE already in float32" in str(err)
    assert len(calls) == 4 and "vae_float32" not in tries[0]  # 2 steps × cond and uncond, once
