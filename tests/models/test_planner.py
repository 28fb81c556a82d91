"""The placement planner on config-only folders of the released models: no weights, no GPU.

tests/data/model_configs/ holds each released model's model_index.json and component configs
(SOURCES.md says where every value came from); the planner builds them on the meta device and
replays a denoising step and the decode at the job's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from i2v_daemon.models import placement, planner
from tests.conftest import ROOT, SUBPROCESS_ENV

pytestmark = pytest.mark.xdist_group("planner")  # one process builds each full-size model once

CONFIGS = ROOT / "tests" / "data" / "model_configs"
GIB = 2**30

#: Each supported model at the size and length its model card makes.
MODEL_CARD_SIZES = {
    "i2vgen-xl": (1280, 704, 16),
    "svd-xt": (1024, 576, 25),
    "wan2.1-i2v-14b-480p": (832, 480, 81),
    "wan2.2-i2v-a14b": (1280, 720, 81),
    "ltx-video": (768, 512, 121),
    "cogvideox-5b-i2v": (720, 480, 49),
    "skyreels-v2-i2v-14b-540p": (960, 544, 97),  # its pipeline's defaults and the 540P model card
    "hunyuanvideo-i2v": (1280, 720, 129),  # its pipeline's defaults (720p, 129 frames, as Tencent's card)
    "ltx-2": (768, 512, 121),  # its pipeline's defaults and diffusers' LTX-2 examples
    # 121 frames: its pipeline's default; 848×480: the 480p bucket its pipeline picks for a 16:9 image
    "hunyuanvideo-1.5-i2v": (848, 480, 121),
}


def plan(name: str, gib: float, **kwargs) -> planner.Plan:
    w, h, f = MODEL_CARD_SIZES[name]
    kwargs = {"width": w, "height": h, "num_frames": f, **kwargs}
    return planner.plan(str(CONFIGS / name), budget_bytes=int(gib * GIB), **kwargs)


def test_the_folders_hold_configs_only():
    files = [p for p in CONFIGS.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".md", ".py") for p in files)
    assert max(p.stat().st_size for p in files) < 200_000


@pytest.mark.parametrize(("side", "frames", "measured"), [(512, 8, 5.98), (512, 16, 7.28), (768, 24, 13.42),
                                                          (1024, 32, 25.37)])
def test_i2vgen_xl_all_on_the_gpu_is_predicted_within_1_percent_of_the_h200_anchors(side, frames, measured):
    """shared/anchors: plain diffusers, fp16, everything resident, decode_chunk_size=1, guidance."""
    result = planner.plan(str(CONFIGS / "i2vgen-xl"), budget_bytes=200 * GIB, width=side, height=side,
                          num_frames=frames)
    assert result.chosen is not None and result.chosen.placement == "gpu"
    assert result.chosen.peak_bytes / GIB == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("name", sorted(MODEL_CARD_SIZES))
def test_every_model_has_a_placement_under_a_24_gib_budget_at_its_model_cards_size(name):
    w, h, f = MODEL_CARD_SIZES[name]
    result = plan(name, 24)
    assert (result.width, result.height, result.num_frames) == (w, h, f)  # the card's own size, not stepped down
    assert result.chosen is not None, [(p.name, p.peak_bytes / GIB) for p in result.predictions]
    assert result.chosen.peak_bytes <= 24 * GIB * (1 - result.margin)
    assert not result.chosen.fp8  # fp8 only where the user allows it
    cheaper = result.predictions[:result.predictions.index(result.chosen)]
    assert all(not p.fits for p in cheaper)  # the cheapest that fits, never a slower one
    if name.startswith(("wan", "skyreels")):  # 14 B parameters in bf16 are 26-31 GiB: the weights cannot all stay
        assert result.chosen.placement not in ("gpu", "encoders_offloaded")
    denoiser = max((c for c in result.components.values() if c.role == "denoiser"), key=lambda c: c.bytes)
    for p in result.predictions:  # what stays on the card while denoising: never less than what streams through
        unit = denoiser.largest_leaf_bytes if p.placement == "group_offload_leaf" else denoiser.largest_block_bytes
        assert unit <= p.resident_bytes <= p.peak_bytes, (p.name, p.resident_bytes)
    assert denoiser.blocks_bytes <= denoiser.bytes  # blocks of two sizes (HunyuanVideo) counted one by one


@pytest.mark.parametrize("name", sorted(MODEL_CARD_SIZES))
def test_on_an_80_gib_card_whatever_fits_whole_stays_whole(name):
    result = plan(name, 80)
    assert result.chosen is not None
    if name == "wan2.2-i2v-a14b":  # two 14 B experts: 53 GiB of denoisers alone, 82 GiB predicted in all
        assert result.chosen.placement == "encoders_offloaded"
        assert result.predictions[0].peak_bytes > 72 * GIB
    else:
        assert result.chosen.placement == "gpu"


def test_ltx_video_folders_published_for_the_condition_pipeline_are_planned_through_it(tmp_path: Path):
    import shutil

    folder = shutil.copytree(CONFIGS / "ltx-video", tmp_path / "ltx-video-condition")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "LTXConditionPipeline"}))
    w, h, f = MODEL_CARD_SIZES["ltx-video"]
    condition = planner.plan(str(folder), budget_bytes=24 * GIB, width=w, height=h, num_frames=f)
    older = plan("ltx-video", 24)
    assert condition.family == "ltx-video" and condition.chosen is not None
    assert condition.chosen.peak_bytes <= 24 * GIB * (1 - condition.margin)
    assert condition.components.keys() == older.components.keys()  # the same weights
    # 256 text tokens where the image-to-video pipeline passes 128: a step costs a little more, never less.
    assert older.costs.denoise < condition.costs.denoise < older.costs.denoise * 1.1


def test_with_cudnn_autotuning_each_phase_counts_the_workspace_cap_the_daemon_sets(monkeypatch):
    plain = plan("i2vgen-xl", 24)
    tuned = plan("i2vgen-xl", 24, autotune=True)
    cap = 1024 * 2**20  # models/gpu.py CUDNN_WORKSPACE_MIB, set by `run` unless the environment has its own
    assert tuned.costs.workspace == cap and plain.costs.workspace == 0
    for before, after in zip(plain.predictions, tuned.predictions, strict=True):
        assert after.peak_bytes == before.peak_bytes + cap, after.name  # the step or the decode sets each peak
    assert tuned.as_dict()["activation_bytes"]["cudnn_workspace"] == cap
    monkeypatch.setenv("CUDNN_CONV_WSCAP_DBG", "256")  # the user's cap is the one counted
    assert plan("i2vgen-xl", 24, autotune=True).costs.workspace == 256 * 2**20


def test_ltx2_counts_its_audio_parts_and_streams_its_gemma_encoder_layer_by_layer_on_a_24_gib_card():
    result = plan("ltx-2", 24)
    roles = {name: c.role for name, c in result.components.items()}
    assert roles == {"text_encoder": "encoder", "connectors": "encoder", "transformer": "denoiser", "vae": "vae",
                     "audio_vae": "vae", "vocoder": "vae"}
    weights = planner.weights_of(result.components)
    c = result.components
    assert weights.vae == c["vae"].bytes + c["audio_vae"].bytes + c["vocoder"].bytes  # they stay with the VAE
    assert sorted(weights.encoders) == sorted([c["text_encoder"].bytes, c["connectors"].bytes])
    assert sum(x.bytes for x in c.values()) / GIB == pytest.approx(63.0, abs=0.1)  # SOURCES.md's parameter counts
    # Gemma-3-12B alone is 22.7 GiB: block-level offloading moves a transformers encoder whole, so only the
    # leaf-level placement, which streams it layer by layer too, fits.
    by_name = {p.name: p for p in result.predictions}
    assert not by_name["group_offload"].fits and by_name["group_offload"].peak_bytes > c["text_encoder"].bytes
    assert result.chosen is not None and result.chosen.placement == "group_offload_leaf"
    assert weights.encoder_leaf < 2 * GIB  # its largest layer: the 262,144 × 3840 token embedding


def test_a_streamed_denoiser_keeps_its_whole_rest_and_its_encoder_streams_at_leaf_level():
    result = plan("hunyuanvideo-i2v", 16)
    transformer = result.components["transformer"]
    # 20 double blocks and 40 lighter single ones: the largest block times 60 is more than the whole transformer
    assert transformer.blocks == 60 and transformer.largest_block_bytes * transformer.blocks > transformer.bytes
    assert planner.weights_of(result.components).denoiser_rest == transformer.bytes - transformer.blocks_bytes > 0
    leaf = next(p for p in result.predictions if p.name == "group_offload_leaf")
    assert leaf.peak_bytes > result.costs.denoise  # never below its own step's activations
    # LLaVA-Llama-3 (15.6 GiB) moves whole at block level; at leaf level it streams too, and only that fits
    assert result.chosen is not None and result.chosen.placement == "group_offload_leaf"


def test_hunyuanvideo_15_is_planned_at_its_own_bucket_and_refuses_a_size_it_does_not_make():
    from i2v_daemon.errors import InputError

    result = planner.plan(str(CONFIGS / "hunyuanvideo-1.5-i2v"), budget_bytes=24 * GIB, num_frames=121)
    assert (result.width, result.height) == (848, 480)  # for the default 16:9 image, whatever the resolution
    assert any("resolution 512 was not used" in n for n in result.notes)
    with pytest.raises(InputError, match="makes only the sizes of its 640×640-pixel buckets"):
        plan("hunyuanvideo-1.5-i2v", 24, width=832, height=480)


def test_fp8_comes_after_every_exact_placement_and_stores_the_denoiser_in_half_the_bytes():
    exact = plan("wan2.1-i2v-14b-480p", 24)
    both = plan("wan2.1-i2v-14b-480p", 24, allow_fp8_fallback=True)
    names = [p.name for p in both.predictions]
    assert names[:5] == list(placement.PLACEMENTS) and all(n.endswith("+fp8") for n in names[5:])
    gpu, gpu_fp8 = both.predictions[0], both.predictions[5]
    # 16.4 B parameters: nearly all in Linear layers, 1 byte instead of 2
    assert 13 * GIB < gpu.peak_bytes - gpu_fp8.peak_bytes < 16 * GIB
    assert both.chosen == exact.chosen  # an exact placement fits: fp8 is not reached
    only = plan("wan2.1-i2v-14b-480p", 80, weights="fp8")
    assert only.chosen is not None and only.chosen.fp8 and only.chosen.placement == "gpu"


def test_a_job_too_big_for_every_placement_says_so_and_where_it_would_step_down_to():
    result = planner.plan(str(CONFIGS / "i2vgen-xl"), budget_bytes=2 * GIB, width=1024, height=1024, num_frames=32,
                          ladder=[768, 512, 256])
    assert result.chosen is None and not any(p.fits for p in result.predictions)
    assert [s["width"] for s in result.smaller] == [768, 512, 256]
    assert result.smaller[-1]["chosen"] is not None  # 256² fits by streaming the UNet


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "i2v_daemon.cli", "plan", "--data-dir", str(cwd / "data"), *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_plan_answers_for_a_config_only_folder_in_text_and_json(tmp_path: Path):
    folder = str(CONFIGS / "wan2.1-i2v-14b-480p")
    text = cli("--model", folder, "--vram-gib", "24", "--width", "832", "--height", "480", "--num-frames", "81",
               cwd=tmp_path)
    assert text.returncode == 0, text.stderr[-2000:]
    assert "chosen: group_offload" in text.stdout and "WanTransformer3DModel" in text.stdout
    assert "832x480, 81 frames" in text.stdout
    js = cli("--model", folder, "--vram-gib", "24", "--width", "832", "--height", "480", "--num-frames", "81",
             "--json", cwd=tmp_path)  # the same question: its replays are read back (models/replay_cache.py)
    assert js.returncode == 0, js.stderr[-2000:]
    data = json.loads(js.stdout)
    assert data["chosen"]["placement"] == "group_offload" and data["preset"] == "standard"
    assert data["weights"]["transformer"]["params"] > 16e9 and data["budget_bytes"] == 24 * GIB
    assert [p["placement"] for p in data["placements"]] == list(placement.PLACEMENTS)
    assert not (tmp_path / "data").exists()  # a question: nothing is made


def test_plan_exits_1_when_nothing_fits_and_78_for_a_question_it_cannot_answer(tmp_path: Path):
    folder = str(CONFIGS / "i2vgen-xl")
    small = cli("--model", folder, "--vram-gib", "1", "--width", "1024", "--height", "1024", cwd=tmp_path)
    assert small.returncode == 1, small.stderr[-2000:]
    assert "nothing fits" in small.stdout and "allow_fp8_fallback" in small.stdout
    half = cli("--model", folder, "--vram-gib", "24", "--width", "640", cwd=tmp_path)
    assert half.returncode == 78 and "--width and --height together" in half.stderr
    no_card = cli("--model", folder, cwd=tmp_path)  # no GPU here and no vram_budget_gib
    assert no_card.returncode == 78 and "--vram-gib" in no_card.stderr
    missing = cli("--model", str(tmp_path / "nope"), "--vram-gib", "24", cwd=tmp_path)
    assert missing.returncode == 78 and "does not exist" in missing.stderr
    # A size the model never makes is what a job would be refused with, said before any replay
    other = cli("--model", str(CONFIGS / "hunyuanvideo-1.5-i2v"), "--vram-gib", "24", "--width", "832", "--height",
                "480", cwd=tmp_path)
    assert other.returncode == 78, other.stderr[-2000:]
    assert "picks itself: not 832×480; remove 'width' and 'height', or set them to 848 and 480" in other.stderr


def test_under_group_offloading_the_decoders_left_on_the_card_count_in_every_phase():
    # diffusers keeps the modules group offloading leaves out (the VAE: adapter.DECODERS) on the GPU all job long
    w = placement.Weights(encoders=[4 * GIB], denoisers=[10 * GIB], vae=3 * GIB, denoiser_rest=1 * GIB,
                          largest_block=GIB // 2, largest_leaf=GIB // 8)
    peak, resident, _ = placement.predict("group_offload", w, placement.Costs(denoise=6 * GIB, decode=GIB))
    assert resident == 1 * GIB + 2 * (GIB // 2) + 3 * GIB  # the rest, two blocks in flight, the VAE
    assert peak == resident + 6 * GIB  # the step runs with the VAE's weights beside it


def test_weights_the_fast_path_does_not_take_are_planned_without_the_cudnn_workspace(tmp_path, monkeypatch):
    from i2v_daemon.models.holder import ModelHolder

    holder = ModelHolder(str(tmp_path), "cpu", "float32", accelerate="on")
    assert holder._autotunes("cuda", "auto") and not holder._autotunes("cuda", "fp8")
    assert not holder._autotunes("cuda", "gguf") and not holder._autotunes("cpu", "auto")
    assert not ModelHolder(str(tmp_path), "cpu", "float32", accelerate="off")._autotunes("cuda", "auto")
