"""The fast path on a CPU with real torch.compile (Inductor, gcc) on the tiny I2VGen-XL, as CI checks it.

`accelerate = "on"` forces the fast path on a CPU. The whole module compiles the tiny UNet's graph
once (cold: a minute or two on two cores) into a compile cache under the session's temp folder,
which tests/test_bench.py then reuses; the second process below compiles from it.

Tolerance: the compiled UNet's float output differs from eager by rounding (about 1e-6 here), so
after the conversion to 8 bits a pixel may land one level (1/255) apart, never more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from i2v_daemon.errors import JobCanceled
from i2v_daemon.models.accelerate import host_timesteps
from i2v_daemon.models.holder import ModelHolder, resolve_accelerate
from i2v_daemon.queue.jobs import Params
from i2v_daemon.work.generate import generate

# One worker (under pytest-xdist) runs these and test_bench.py, in that order: the bench then finds the
# compile cache these tests filled.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("compile-cache")]
ROOT = Path(__file__).resolve().parents[2]

#: A 16:9 image at resolution 64: 112×64, as the benchmark's tiny cases (which then find the graph cached).
IMAGE = Image.fromarray(np.linspace(0, 255, 72 * 128 * 3).reshape(72, 128, 3).astype(np.uint8))
PARAMS = Params(preset="t", resolution=64, num_frames=4, steps=3, guidance_scale=9.0, fps=8, seed=11)


def compile_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for the session (tests/test_bench.py computes the same folder)."""
    return tmp_path_factory.getbasetemp() / "compile-cache"


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory, tiny_i2vgen_dir: Path) -> Iterator[ModelHolder]:
    """A holder with accelerate on and its compile cache in the session's folder, as the daemon builds it."""
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    torch.set_num_threads(1)
    holder = ModelHolder(str(tiny_i2vgen_dir), "cpu", "float32", accelerate="on",
                         compile_cache_dir=compile_cache_root(tmp_path_factory))
    yield holder
    holder.unload()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _job(model, params: Params = PARAMS, on_step=None):
    tries: list[dict] = []
    phases: list[str] = []
    outcome = generate(model, IMAGE, "a cat turns its head", "blurry", params, ladder=[], on_try=tries.append,
                       on_step=on_step or (lambda _s, _t: None), on_phase=phases.append)
    return outcome, tries, phases


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _close(fast: np.ndarray, eager: np.ndarray) -> None:
    diff = np.abs(fast.astype(np.int16) - eager.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    assert diff.mean() < 0.05


@pytest.fixture(scope="module")
def first_job(holder: ModelHolder):
    """The module's one cold compile: the first accelerated job, timed by the try itself."""
    model = holder.get()
    graphs = _unique_graphs()
    outcome, tries, phases = _job(model)
    return {"outcome": outcome, "tries": tries, "phases": phases, "new_graphs": _unique_graphs() - graphs}


def test_accelerate_auto_means_on_for_cuda_and_off_on_the_cpu():
    assert [resolve_accelerate("auto", d) for d in ("cuda", "cuda:1", "cpu")] == [True, True, False]
    assert resolve_accelerate("on", "cpu") and not resolve_accelerate("off", "cuda")


def test_a_new_shape_is_compiled_once_at_its_first_step_and_recorded_in_the_try(first_job, holder):
    (entry,) = first_job["tries"]
    assert entry["accelerated"] is True and entry["outcome"] == "succeeded"
    assert entry["compiled"] == ["2x4x4x8x14"] and entry["compile_seconds"] > 0
    assert first_job["new_graphs"] == 1  # dynamo's own count: one graph, no graph break, no recompile
    assert holder.get().accelerator.graphs == 1
    assert first_job["phases"] == ["denoising", "compiling", "denoising", "decoding"]
    assert first_job["outcome"].effective["accelerated"] is True


def test_the_fast_path_gives_the_eager_paths_frames_at_the_same_seed(first_job, tiny_model):
    eager, tries, _ = _job(tiny_model)
    assert tries[0]["accelerated"] is False
    _close(first_job["outcome"].frames, eager.frames)
    assert first_job["outcome"].frames.shape == (4, 64, 112, 3)


def test_a_second_job_of_that_shape_compiles_nothing(first_job, holder, tiny_model):
    model = holder.get()
    graphs = _unique_graphs()
    params = PARAMS.model_copy(update={"seed": 12})
    outcome, tries, phases = _job(model, params)
    assert _unique_graphs() == graphs and model.accelerator.graphs == 1
    assert tries[0]["accelerated"] is True and "compiled" not in tries[0]
    assert "compiling" not in phases
    _close(outcome.frames, _job(tiny_model, params)[0].frames)


def test_a_job_with_another_frame_count_survives_on_the_same_graph(first_job, holder, tiny_model):
    model = holder.get()
    params = PARAMS.model_copy(update={"num_frames": 6, "seed": 13})
    outcome, tries, _ = _job(model, params)
    assert outcome.frames.shape == (6, 64, 112, 3)
    assert tries[0]["accelerated"] is True and model.accelerator.graphs == 1  # frames stay symbolic
    _close(outcome.frames, _job(tiny_model, params)[0].frames)


def test_a_recompile_inside_the_step_loop_is_refused_and_that_try_goes_on_eagerly(first_job, holder, tiny_model):
    model = holder.get()
    unet = model.pipeline.unet

    def change_the_unet_after_the_first_step(step: int, _total: int) -> None:
        if step == 1:  # a module attribute the graph's guards read: the next step would recompile
            unet.enable_forward_chunking()

    try:
        outcome, tries, _ = _job(model, on_step=change_the_unet_after_the_first_step)
    finally:
        unet.disable_forward_chunking()
    assert tries[0]["accelerated"] is False and "recompile was refused" in tries[0]["fell_back"]
    assert model.accelerator.graphs == 1  # nothing was compiled inside the loop
    assert any("recompile was refused" in n for n in outcome.notes)
    _close(outcome.frames, _job(tiny_model)[0].frames)  # chunking changes no math
    again = _job(model)[1][0]  # the module is as it was: the next job is on the fast path again
    assert again["accelerated"] is True and "compiled" not in again


def test_progress_and_a_cancel_stay_outside_the_graph(first_job, holder):
    model = holder.get()
    graphs = _unique_graphs()
    seen: list[tuple[int, int]] = []

    def cancel_at_the_second_step(step: int, total: int) -> None:
        seen.append((step, total))
        if step == 2:
            raise JobCanceled("canceled by the test")

    with pytest.raises(JobCanceled):
        _job(model, on_step=cancel_at_the_second_step)
    assert seen == [(1, 3), (2, 3)]
    assert not model.pipeline.unet._forward_hooks and "forward" not in vars(model.pipeline.unet)
    assert _unique_graphs() == graphs  # the hook and the raise never entered dynamo
    assert _job(model)[1][0]["accelerated"] is True


def test_the_ddim_step_gets_each_timestep_from_the_host_and_the_same_result(tiny_model):
    scheduler = tiny_model.pipeline.scheduler
    seen: list[object] = []
    original = type(scheduler).step

    def spy(self, model_output, timestep, sample, *args, **kwargs):
        seen.append(timestep)
        return original(self, model_output, timestep, sample, *args, **kwargs)

    sample, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    scheduler.set_timesteps(4)
    plain = [scheduler.step(noise, t, sample).prev_sample for t in scheduler.timesteps]
    type(scheduler).step = spy
    try:
        with host_timesteps(scheduler):
            scheduler.set_timesteps(4)
            hosted = [scheduler.step(noise, t, sample).prev_sample for t in scheduler.timesteps]
    finally:
        type(scheduler).step = original
    assert all(isinstance(t, int) for t in seen) and seen == scheduler.timesteps.tolist()
    assert all(torch.equal(a, b) for a, b in zip(plain, hosted, strict=True))
    assert "step" not in vars(scheduler)  # the patch is gone after the job


def test_a_parked_model_keeps_its_compiled_graph(first_job, holder):
    model = holder.get()
    model.park()
    model.unpark()
    _, tries, phases = _job(model)
    assert tries[0]["accelerated"] is True and "compiling" not in phases and model.accelerator.graphs == 1


def test_what_was_compiled_is_saved_as_portable_artifacts_that_load_again(first_job, holder):
    cache = holder.compile_cache
    files = cache.artifacts()
    assert files and files[0].stat().st_size > 0  # written after the first job compiled
    info = torch.compiler.load_cache_artifacts(files[0].read_bytes())
    assert info is not None and len(info.inductor_artifacts) >= 1
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == cache.folder / "inductor"


def test_a_second_process_with_the_same_cache_compiles_from_it(first_job, tmp_path_factory, tiny_i2vgen_dir):
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from i2v_daemon.models.holder import ModelHolder
holder = ModelHolder({str(tiny_i2vgen_dir)!r}, "cpu", "float32", accelerate="on",
                     compile_cache_dir=Path({str(compile_cache_root(tmp_path_factory))!r}))
import numpy as np, torch
torch.set_num_threads(1)
from PIL import Image
from i2v_daemon.work.generate import generate
from i2v_daemon.queue.jobs import Params
from torch._dynamo.utils import counters
model = holder.get()
image = Image.fromarray(np.linspace(0, 255, 72 * 128 * 3).reshape(72, 128, 3).astype(np.uint8))
tries = []
generate(model, image, "a cat", "", Params(preset="t", resolution=64, num_frames=4, steps=2, guidance_scale=9.0,
         fps=8, seed=1), ladder=[], on_step=lambda s, t: None, on_try=tries.append)
print(json.dumps({{"try": tries[0], "inductor": dict(counters["inductor"]), "loaded": holder.compile_cache.loaded}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads(proc.stdout.strip().splitlines()[-1])
    assert second["try"]["accelerated"] is True and second["try"]["compiled"] == ["2x4x4x8x14"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["loaded"]["files"] >= 1 and second["loaded"]["failed"] == 0
    cold, warm = first_job["tries"][0]["compile_seconds"], second["try"]["compile_seconds"]
    print(f"compile of the tiny UNet: cold {cold:.1f} s, warm (second process) {warm:.1f} s, {cold / warm:.1f}x")


def test_warm_up_compiles_the_presets_and_recent_shapes_before_the_first_job(first_job, holder):
    from i2v_daemon.models.holder import WarmShape

    model = holder.get()
    holder.warm_shapes = [WarmShape(64, 4, 9.0), WarmShape(64, 6, 9.0), WarmShape(64, 4, 9.0)]
    holder._history = lambda: [{"outcome": "succeeded", "family": "i2vgen-xl", "width": 112, "height": 64,
                                "num_frames": 3}] * 2
    progress: list[tuple[int, int, str]] = []
    try:
        done = holder.warm_up(lambda *p: progress.append(p))
    finally:
        holder._history = None
    assert progress == [(0, 3, "112x64x4"), (1, 3, "112x64x6"), (2, 3, "112x64x3"), (3, 3, "done")]
    assert [d["shape"] for d in done] == ["112x64x4", "112x64x6", "112x64x3"]
    assert all(d["accelerated"] for d in done) and model.accelerator.graphs == 1  # all in the one graph
    state = holder.acceleration()
    assert state["models"]["default"]["accelerated"] and state["models"]["default"]["graphs"] == 1
    assert "fused_qkv" in state["models"]["default"]["prepared"] and state["cache_dir"].endswith("inductor") is False


def test_warm_up_does_nothing_for_a_model_without_the_fast_path(tiny_i2vgen_dir):
    plain = ModelHolder(str(tiny_i2vgen_dir), "cpu", "float32", accelerate="off")
    try:
        assert plain.warm_up(lambda *_: pytest.fail("no progress to report")) == []
        assert plain.get().accelerator is None and plain.compile_cache is None
    finally:
        plain.unload()
