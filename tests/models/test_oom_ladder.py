"""The OOM ladder on a CPU: a real tiny model behind a seam that raises the real torch OOM error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from i2v_daemon.errors import OutOfMemory
from i2v_daemon.models.holder import ModelHolder
from i2v_daemon.models.memory import ANCHOR_RESIDENT, DECODE_BYTES_PER_PIXEL, GIB, MemoryModel, choose_start
from i2v_daemon.models.seams import OOMAbove
from i2v_daemon.queue.jobs import Params
from i2v_daemon.work.generate import generate, plan_rungs

IMAGE = Image.new("RGB", (96, 64), (120, 60, 30))
PARAMS = Params(preset="t", resolution=64, num_frames=4, steps=2, guidance_scale=2.0, fps=4, seed=3)
LADDER = [48, 32]


def run(model, memory=None, params=PARAMS):
    tries, steps = [], []
    outcome = generate(
        model, IMAGE, "a cat", "", params, ladder=LADDER, on_step=lambda k, n: steps.append((k, n)),
        on_try=tries.append, memory=memory,
    )
    return outcome, tries


def test_the_rungs_try_savers_at_full_size_before_stepping_down(tiny_model):
    rungs = plan_rungs(tiny_model, 96, 64, LADDER)
    assert [(r.width, r.height) for r in rungs[:3]] == [(96, 64)] * 3
    assert [r.savers for r in rungs[:3]] == [(), ("vae_slicing", "vae_tiling"),
                                             ("vae_slicing", "vae_tiling", "forward_chunking")]
    assert "cpu_offload" not in {s for r in rungs for s in r.savers}  # offload means nothing on a CPU
    smaller = rungs[3:]
    assert smaller and all(min(r.width, r.height) < 64 for r in smaller)
    assert all(r.savers == rungs[2].savers for r in smaller)
    assert [min(r.width, r.height) for r in smaller] == sorted({min(r.width, r.height) for r in smaller}, reverse=True)


def test_where_a_placement_was_planned_the_ladder_tries_heavier_placements_before_smaller_sizes(tiny_model):
    tiny_model.placement_plan = {"placement": "gpu", "planned_for": "96x64x4"}  # as the holder plans for a card
    try:
        rungs = plan_rungs(tiny_model, 96, 64, LADDER)
    finally:
        tiny_model.placement_plan = {}
    full = [r for r in rungs if (r.width, r.height) == (96, 64)]
    assert [r.placement for r in full] == [None, None, None, "encoders_offloaded", "model_offload", "group_offload",
                                           "group_offload_leaf"]
    smaller = rungs[len(full):]
    assert smaller and all(r.placement == "group_offload_leaf" and min(r.width, r.height) < 64 for r in smaller)
    assert plan_rungs(tiny_model, 96, 64, LADDER) == [r for r in rungs if r.placement is None] + [
        r.__class__(r.width, r.height, r.savers) for r in smaller]  # no plan (the CPU): no placement rungs


def test_a_job_out_of_memory_at_every_saver_runs_at_full_size_on_a_heavier_placement_and_the_next_starts_planned(
    tiny_model,
):
    n = 96 * 64 * 4
    # The same try on the GPU placement: only all three savers make it fit there (2 of them: 1.055x, 3: 1.069x).
    with_savers, saver_tries = run(OOMAbove(tiny_model, pixel_frames=n - 1, saver_factor=(n / (n - 1)) ** 0.4))
    assert [t["outcome"] for t in saver_tries] == ["out_of_memory", "out_of_memory", "succeeded"]
    tiny_model.placement_plan = {"placement": "gpu", "planned_for": "96x64x4"}
    seam = OOMAbove(tiny_model, pixel_frames=n - 1, placement_factor=1.5)  # only off the GPU it fits
    try:
        outcome, tries = run(seam)
    finally:
        tiny_model.placement_plan = {}
    assert [(t["placement"], t["outcome"]) for t in tries] == [
        ("gpu", "out_of_memory"), ("gpu", "out_of_memory"), ("gpu", "out_of_memory"),
        ("encoders_offloaded", "succeeded")]
    assert (tries[-1]["width"], tries[-1]["height"]) == (96, 64)  # the size asked for, not a smaller one
    assert "and the weights placed encoders_offloaded" in outcome.notes[-1]
    assert np.array_equal(outcome.frames, with_savers.frames)  # the same math, the weights elsewhere
    assert tiny_model.placement == "gpu"  # put back where the plan had them, for the next job
    _, again_tries = run(tiny_model)
    assert [(t["placement"], t["savers"]) for t in again_tries] == [("gpu", [])]


class _OnCuda:
    """The tiny model as the ladder sees a CUDA one (only its rungs are asked for here)."""

    device = "cuda"

    def __init__(self, inner, planned: bool) -> None:
        from dataclasses import replace

        self.inner = inner
        self.placement_plan = {"placement": "gpu"} if planned else {}
        # On a GPU the family offers whole-component CPU offload as its last saver.
        self.info = replace(inner.info, savers=(*inner.info.savers, "cpu_offload"))

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_on_a_card_model_offload_is_a_placement_rung_not_a_saver_on_top_of_the_planned_one(tiny_model):
    unplanned = plan_rungs(_OnCuda(tiny_model, planned=False), 96, 64, LADDER)
    assert "cpu_offload" in unplanned[3].savers  # no plan: whole-component offload is the last saver, as before
    planned = plan_rungs(_OnCuda(tiny_model, planned=True), 96, 64, LADDER)
    assert all("cpu_offload" not in r.savers for r in planned)
    assert [r.placement for r in planned[:7]] == [None, None, None, "encoders_offloaded", "model_offload",
                                                  "group_offload", "group_offload_leaf"]


def test_weights_that_cannot_go_back_to_the_planned_placement_stay_whole_where_the_job_ran(tiny_model):
    class BackFails(OOMAbove):
        def place(self, placement: str) -> None:
            if placement == "gpu":  # another program took the card meanwhile
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (test: the way back)")
            self.inner.place(placement)

    tiny_model.placement_plan = {"placement": "gpu"}
    seam = BackFails(tiny_model, pixel_frames=96 * 64 * 4 - 1, placement_factor=1.5)
    try:
        outcome, tries = run(seam)
        assert tries[-1]["outcome"] == "succeeded" and outcome.frames.shape == (4, 64, 96, 3)  # the job keeps it
        assert tiny_model.placement == "encoders_offloaded"  # whole, and where it worked
        _, again = run(tiny_model)  # the next job runs there, slower but right
        assert [(t["placement"], t["outcome"]) for t in again] == [("encoders_offloaded", "succeeded")]
    finally:
        tiny_model.placement_plan = {}
        tiny_model.place("gpu")


def test_a_job_that_fits_runs_once_with_no_savers(tiny_model):
    outcome, tries = run(tiny_model)
    assert [t["outcome"] for t in tries] == ["succeeded"]
    assert outcome.frames.shape == (4, 64, 96, 3)
    assert outcome.effective["savers"] == [] and outcome.effective["seed"] == 3


def test_savers_rescue_a_job_at_full_size_when_they_free_enough(tiny_model):
    seam = OOMAbove(tiny_model, pixel_frames=96 * 64 * 4 - 1, saver_factor=1.5)
    outcome, tries = run(seam)
    assert [t["outcome"] for t in tries] == ["out_of_memory", "succeeded"]
    assert tries[1]["savers"] == ["vae_slicing", "vae_tiling"]
    assert outcome.frames.shape == (4, 64, 96, 3)
    assert "CUDA out of memory" in tries[0]["error"]
    assert any("ran out of GPU memory at 96x64" in n for n in outcome.notes)


def test_the_ladder_steps_down_in_resolution_when_savers_do_not_help(tiny_model):
    seam = OOMAbove(tiny_model, pixel_frames=64 * 48 * 4, saver_factor=1.0)
    outcome, tries = run(seam)
    assert [t["outcome"] for t in tries[:-1]] == ["out_of_memory"] * (len(tries) - 1)
    assert tries[-1]["outcome"] == "succeeded"
    w, h = tries[-1]["width"], tries[-1]["height"]
    assert w * h * 4 <= 64 * 48 * 4 and min(w, h) < 64
    assert outcome.frames.shape == (4, h, w, 3)
    assert (outcome.effective["width"], outcome.effective["height"]) == (w, h)
    for t in tries:  # every try is recorded with its size, savers, outcome and time
        assert {"try", "width", "height", "savers", "outcome", "error", "seconds", "peak_vram_bytes"} <= set(t)


def test_when_even_the_smallest_rung_runs_out_of_memory_the_job_fails_naming_it(tiny_model):
    seam = OOMAbove(tiny_model, pixel_frames=10, saver_factor=1.0)
    tries: list[dict] = []
    with pytest.raises(OutOfMemory) as err:
        generate(seam, IMAGE, "a cat", "", PARAMS, ladder=LADDER, on_step=lambda k, n: None, on_try=tries.append)
    smallest = tries[-1]
    assert f"{smallest['width']}x{smallest['height']}" in str(err.value)
    assert "fewer frames or a lower resolution" in str(err.value)
    assert all(t["outcome"] == "out_of_memory" for t in tries)
    assert len(tries) == len(plan_rungs(tiny_model, 96, 64, LADDER))


def test_a_try_that_ran_out_of_memory_is_gone_before_the_next_try_starts(tiny_model):
    # The seam allocates activations, reports a step, then raises the real OOM error. If the ladder
    # kept the error (its traceback holds the failed call's frames), that tensor would still be
    # alive while the next rung runs, on a GPU holding the very memory the next rung needs.
    seam = OOMAbove(tiny_model, pixel_frames=96 * 64 * 4 - 1, saver_factor=1.5)
    _, tries = run(seam)
    assert [t["outcome"] for t in tries] == ["out_of_memory", "succeeded"]
    assert len(seam.failed_allocations) == 1
    assert seam.alive_at_start == [0, 0]  # dead before the second try began, not merely by the end
    assert tries[0]["error"].startswith("CUDA out of memory. Tried to allocate")


def test_an_error_that_is_not_out_of_memory_is_recorded_and_raised(tiny_model):
    class Broken(OOMAbove):
        def generate(self, request, on_step, on_phase=None):
            raise ValueError("a scheduler bug")

    tries: list[dict] = []
    with pytest.raises(ValueError):
        generate(Broken(tiny_model, 0), IMAGE, "x", "", PARAMS, ladder=LADDER, on_step=lambda k, n: None,
                 on_try=tries.append)
    assert len(tries) == 1 and tries[0]["outcome"] == "error" and "a scheduler bug" in tries[0]["error"]


def test_the_memory_model_starts_at_the_first_rung_predicted_to_fit_so_no_try_is_wasted(tiny_model):
    rungs = plan_rungs(tiny_model, 96, 64, LADDER)
    target = rungs[3]  # the first smaller size
    # A budget that the full size cannot fit but the first smaller size can, with a margin.
    memory = MemoryModel(budget_bytes=0, resident_bytes=0, margin=0.1)
    per = memory.slope(target.savers) * target.width * target.height * 4
    memory.budget_bytes = int(per / 0.9) + 1
    seam = OOMAbove(tiny_model, pixel_frames=10**9)  # nothing really runs out
    outcome, tries = run(seam, memory=memory)
    assert [(c[0], c[1]) for c in seam.calls] == [(target.width, target.height)]
    assert len(tries) == 1 and tries[0]["try"] == 4 and tries[0]["budget_bytes"] == memory.budget_bytes
    assert sum("skipped" in n for n in outcome.notes) == 3


def test_the_memory_model_matches_the_anchor_measurements_within_two_percent():
    memory = MemoryModel(budget_bytes=80 * GIB)
    for (side, frames), measured in {(512, 8): 5.98, (512, 16): 7.28, (768, 24): 13.42, (1024, 32): 25.37}.items():
        predicted = memory.predict(side, side, frames) / GIB
        assert abs(predicted - measured) / measured < 0.02, (side, frames, predicted)
    # On a 24 GiB card 1024²×32 is predicted not to fit, 768²×24 is: the capped run starts there.
    card = MemoryModel(budget_bytes=24 * GIB)
    assert not card.fits(1024, 1024, 32) and card.fits(768, 768, 24)


def test_the_memory_model_refits_from_recorded_attempts_and_remembers_what_did_not_fit():
    memory = MemoryModel(budget_bytes=24 * GIB, resident_bytes=int(ANCHOR_RESIDENT))
    pf = 512 * 512 * 16
    memory.learn([{"width": 512, "height": 512, "num_frames": 16, "savers": [], "outcome": "succeeded",
                   "peak_vram_bytes": int(ANCHOR_RESIDENT + 2 * pf * 1000)}])
    assert memory.slope(()) == pytest.approx(2000.0)
    memory.learn([{"width": 768, "height": 768, "num_frames": 16, "savers": ["vae_tiling"],
                   "outcome": "out_of_memory", "budget_bytes": 24 * GIB}])
    assert not memory.fits(768, 768, 16, ("vae_tiling",)) and not memory.fits(1024, 768, 16, ("vae_tiling",))
    # An OOM on a bigger budget says nothing about this one.
    small = MemoryModel(budget_bytes=12 * GIB)
    small.learn([{"width": 64, "height": 64, "num_frames": 2, "savers": [], "outcome": "out_of_memory",
                  "budget_bytes": 40 * GIB}])
    assert small.fits(64, 64, 2)


def test_nothing_predicted_to_fit_still_tries_the_smallest_rung(tiny_model):
    rungs = plan_rungs(tiny_model, 96, 64, LADDER)
    start, notes = choose_start(MemoryModel(budget_bytes=1), rungs, 4)
    assert start == len(rungs) - 1 and len(notes) == len(rungs)


def test_an_oom_frees_memory_and_the_same_model_keeps_working_for_the_next_job(tiny_model):
    seam = OOMAbove(tiny_model, pixel_frames=10, saver_factor=1.0)
    with pytest.raises(OutOfMemory):
        run(seam)
    outcome, tries = run(tiny_model)
    assert tries[0]["outcome"] == "succeeded" and outcome.frames.shape == (4, 64, 96, 3)
    assert issubclass(torch.cuda.OutOfMemoryError, RuntimeError)


def test_an_idle_model_is_unloaded_and_loaded_again_for_the_next_job(tiny_i2vgen_dir):
    holder = ModelHolder(str(tiny_i2vgen_dir), "cpu", "float32")
    first = holder.get()
    assert holder.unload_if_idle(3600, busy=False) is False  # not idle long enough
    assert holder.unload_if_idle(0.0001, busy=True) is False  # never while a job runs
    holder.last_used -= 10
    assert holder.unload_if_idle(1, busy=False) is True
    assert holder.current is None and first.pipeline is None  # closed, memory released
    second = holder.get()
    assert second is not first and second.pipeline is not None
    holder.unload()


@pytest.mark.slow
def test_through_the_daemon_every_try_is_in_the_manifest_and_the_video_has_the_size_that_fit(env, drop):
    drop("big", (".txt", "a big one"))
    drop("hopeless", (".json", json.dumps({"prompt": "too big", "num_frames": 20})))
    config = env.config.read_text()
    env.config.write_text(config.replace("[presets.tiny]", "resolution_ladder = [48, 32]\n[presets.tiny]"))
    # 64x48x4 fits; 96x64 does not, and the 20-frame job fits nowhere.
    env.cli("run", "--once", check=True, env={"I2V_TEST_OOM_ABOVE_PIXEL_FRAMES": str(64 * 48 * 4)})

    manifest = json.loads((env.output / "big" / "job.json").read_text())
    outcomes = [a["outcome"] for a in manifest["attempts"]]
    assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) == {"out_of_memory"} and len(outcomes) >= 4
    eff = manifest["effective"]
    assert eff["width"] * eff["height"] <= 64 * 48 and manifest["attempts"][-1]["width"] == eff["width"]
    assert any("ran out of GPU memory" in n for n in manifest["notes"])
    assert "out_of_memory" in (env.output / "big" / "job.log").read_text()

    failed = json.loads((env.failed / "hopeless" / "job.json").read_text())
    assert failed["status"] == "failed" and failed["error"]["type"] == "out_of_memory"
    smallest = failed["attempts"][-1]
    assert f"{smallest['width']}x{smallest['height']}" in failed["error"]["message"]
    jobs = {j["name"]: j for j in env.status()["jobs"]}
    assert (jobs["big"]["width"], jobs["big"]["height"]) == (eff["width"], eff["height"])
    assert jobs["hopeless"]["status"] == "failed" and "out of GPU memory" in jobs["hopeless"]["error"]


# --- the fast path and the ladder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def accelerated_tiny(tiny_i2vgen_dir):
    """A second tiny I2VGen-XL with the fast path prepared (nothing compiles until a try runs on it)."""
    from i2v_daemon.models.loader import load_model

    model = load_model(str(tiny_i2vgen_dir), device="cpu", dtype="float32")
    model.enable_acceleration()
    yield model
    model.close()


def test_with_the_fast_path_the_first_rung_is_accelerated_and_the_rest_are_eager(accelerated_tiny):
    rungs = plan_rungs(accelerated_tiny, 96, 64, LADDER, accelerate=True)
    assert [(r.width, r.height, r.savers, r.accelerated) for r in rungs[:2]] == [
        (96, 64, (), True), (96, 64, (), False)]
    assert not any(r.accelerated for r in rungs[1:])
    assert rungs[1:] == plan_rungs(accelerated_tiny, 96, 64, LADDER)


def test_an_oom_on_the_fast_path_retries_eagerly_at_the_same_size_before_stepping_down(accelerated_tiny):
    seam = OOMAbove(accelerated_tiny, pixel_frames=10**9, fast_factor=0.0)  # only the fast path runs out
    outcome, tries = run(seam)
    assert [(t["width"], t["height"], t["savers"], t["accelerated"], t["outcome"]) for t in tries] == [
        (96, 64, [], True, "out_of_memory"), (96, 64, [], False, "succeeded")]
    assert seam.accelerated_calls == [True, False]
    assert all(t["steps"] == PARAMS.steps for t in tries)
    assert outcome.effective["accelerated"] is False and (outcome.effective["width"], outcome.effective["height"]) == (
        96, 64)
    assert any("on the fast path" in n for n in outcome.notes)
    assert accelerated_tiny.accelerator.graphs == 0  # the failed fast try never reached the compiler


def test_every_try_records_whether_the_fast_path_ran_and_its_steps(tiny_model):
    _, tries = run(tiny_model, params=PARAMS)
    assert tries[0]["accelerated"] is False and tries[0]["steps"] == 2


def test_learned_slopes_are_kept_apart_for_the_fast_and_the_eager_path():
    memory = MemoryModel(budget_bytes=80 * GIB, resident_bytes=int(ANCHOR_RESIDENT))
    pf = 512 * 512 * 16
    eager = memory.slope(())
    assert memory.slope((), accelerated=True) == eager  # unmeasured: the eager peak stands in
    memory.learn([{"width": 512, "height": 512, "num_frames": 16, "savers": [], "accelerated": True,
                   "outcome": "succeeded", "peak_vram_bytes": int(ANCHOR_RESIDENT + 500 * pf)}])
    assert memory.slope((), accelerated=True) == pytest.approx(500.0) and memory.slope(()) == eager
    memory.learn([{"width": 512, "height": 512, "num_frames": 16, "savers": [], "accelerated": True,
                   "outcome": "out_of_memory", "budget_bytes": 80 * GIB}])
    assert not memory.fits(512, 512, 16, (), accelerated=True) and memory.fits(512, 512, 16, ())
    # Old records carry no `accelerated`: they are eager tries.
    memory.learn([{"width": 512, "height": 512, "num_frames": 16, "savers": [], "outcome": "succeeded",
                   "peak_vram_bytes": int(ANCHOR_RESIDENT + 700 * pf)}])
    assert memory.slope(()) == pytest.approx(700.0) and memory.slope((), accelerated=True) == pytest.approx(500.0)


def test_the_decode_chunk_is_the_most_frames_the_budget_holds_and_its_peak_is_predicted():
    memory = MemoryModel(budget_bytes=24 * GIB, resident_bytes=int(ANCHOR_RESIDENT), margin=0.1)
    per_frame = DECODE_BYTES_PER_PIXEL * 512 * 512
    room = 24 * GIB * 0.9 - ANCHOR_RESIDENT
    assert memory.decode_chunk(512, 512, 16) == 16  # 16 frames of 0.375 GiB fit in 16.9 GiB
    assert memory.decode_chunk(1024, 1024, 32) == int(room // (4 * per_frame))
    assert memory.decode_chunk(4096, 4096, 8) == 1  # never less than one frame
    # A chunk whose decode outweighs the denoising is what the prediction says.
    denoise = memory.predict(512, 512, 16)
    assert memory.predict(512, 512, 16, accelerated=True, decode_chunk=16) == max(
        denoise, int(ANCHOR_RESIDENT + 16 * per_frame))
    assert memory.predict(512, 512, 16, accelerated=True, decode_chunk=1) == memory.predict(512, 512, 16)


def test_a_try_whose_decode_was_the_peak_refits_the_decode_not_the_slope():
    memory = MemoryModel(budget_bytes=80 * GIB, resident_bytes=int(ANCHOR_RESIDENT))
    slope = memory.slope((), accelerated=True)
    memory.learn([{"width": 512, "height": 512, "num_frames": 16, "savers": [], "accelerated": True,
                   "decode_chunk": 16, "outcome": "succeeded",
                   "peak_vram_bytes": int(ANCHOR_RESIDENT + 2000 * 512 * 512 * 16)}])
    assert memory.decode_bytes_per_pixel() == pytest.approx(2000.0)
    assert memory.slope((), accelerated=True) == slope
