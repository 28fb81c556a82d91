"""A LoRA on the fast path: compiled with the adapter's layers inside the blocks, same frames as eager.

On the tiny Wan with real torch.compile (Inductor, gcc) on the CPU: each compile takes a minute or
so on two cores, so the module compiles twice (the LoRA job, then the plain model beside it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from i2v_daemon.models.accelerate import CompiledDenoiser, CountingInductor, TryReport
from i2v_daemon.models.holder import ModelHolder
from i2v_daemon.queue.jobs import Params
from i2v_daemon.work.generate import generate

IMAGE = Image.fromarray(np.linspace(0, 255, 64 * 96 * 3).reshape(64, 96, 3).astype(np.uint8))
PARAMS = Params(preset="t", resolution=64, num_frames=5, steps=2, guidance_scale=5.0, fps=8, seed=11)


@pytest.fixture(scope="module")
def fast_wan(tmp_path_factory: pytest.TempPathFactory, tiny_family_dirs) -> Iterator[ModelHolder]:
    """The tiny Wan with accelerate on, its own compile cache, loaded apart from the shared eager one."""
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    torch.set_num_threads(1)
    holder = ModelHolder(str(tiny_family_dirs("wan")), "cpu", "float32", accelerate="on",
                         compile_cache_dir=tmp_path_factory.mktemp("compile-cache-lora"))
    yield holder
    holder.unload()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _job(model, params: Params, lora_dir: Path):
    tries: list[dict] = []
    outcome = generate(model, IMAGE, "a cat turns its head", "blurry", params, ladder=[], on_try=tries.append,
                       on_step=lambda _s, _t: None, lora_dir=lora_dir)
    return outcome, tries


def _close(fast: np.ndarray, eager: np.ndarray) -> None:
    diff = np.abs(fast.astype(np.int16) - eager.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()} levels"


@pytest.mark.slow
def test_a_lora_job_runs_compiled_with_the_eager_frames_and_the_plain_model_stays_right_beside_it(
    fast_wan, tiny_family_models, tiny_lora_dir
):
    model, eager = fast_wan.get(), tiny_family_models("wan")
    styled = PARAMS.model_copy(update={"lora": "style.safetensors", "lora_scale": 0.8})
    outcome, tries = _job(model, styled, tiny_lora_dir)
    (entry,) = tries
    assert entry["accelerated"] is True and entry["compiled"] and "fell_back" not in entry
    assert outcome.effective["lora"] == "style.safetensors"
    _close(outcome.frames, _job(eager, styled, tiny_lora_dir)[0].frames)
    # The same shape without the LoRA (loaded but off): a graph of its own, and the plain frames.
    plain, tries = _job(model, PARAMS, tiny_lora_dir)
    assert tries[0]["accelerated"] is True and "fell_back" not in tries[0]
    reference = _job(eager, PARAMS, tiny_lora_dir)[0].frames
    _close(plain.frames, reference)
    assert not np.array_equal(reference, outcome.frames)


class _Block(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class _FailingFor(CountingInductor):
    """A backend that cannot compile while `failing` is set (as a LoRA with an op the compiler lacks),
    and runs the traced graph as it is otherwise."""

    failing = True

    def __call__(self, gm, example_inputs):
        if self.failing:
            raise RuntimeError("no lowering for this op")
        self.graphs += 1
        return gm.forward


def test_a_shape_that_fails_to_compile_with_a_lora_still_compiles_without_it():
    backend = _FailingFor()
    denoiser = CompiledDenoiser(_Block(), backend)
    x = torch.ones(2, 3)
    with_lora = TryReport()
    with denoiser.installed(with_lora, lambda _p: None, variant=("style.safetensors", 1.0)):
        assert torch.equal(denoiser.module(x), x * 2 + 1)
    assert not with_lora.accelerated and "failed" in (with_lora.fell_back or "")
    backend.failing = False
    plain = TryReport()
    with denoiser.installed(plain, lambda _p: None):
        denoiser.module(x)
    assert plain.accelerated and plain.compiled and backend.graphs == 1
    again = TryReport()  # the LoRA's failure is remembered: eager at once, no second attempt
    with denoiser.installed(again, lambda _p: None, variant=("style.safetensors", 1.0)):
        denoiser.module(x)
    assert not again.accelerated and backend.graphs == 1
