"""Each model family through the real CLI: a sidecar names the model, `run --once` makes its video or says why not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from i2v_daemon.work.video import probe_mp4
from tests.conftest import Env, write_config

pytestmark = pytest.mark.slow

#: The config's names for the tiny models -> their families.
MODELS = {"svd": "svd", "wan": "wan", "ltx": "ltx-video", "cog": "cogvideox", "sky": "skyreels-v2",
          "ltxc": "ltx-video", "hy": "hunyuanvideo-i2v", "ltx2": "ltx-2", "hy15": "hunyuanvideo-1.5-i2v"}
#: Names whose tiny build is not their family's first one (tests/fixtures_models.py TINY_VARIANTS).
BUILDS = {"ltxc": "ltx-condition"}


@pytest.fixture()
def family_env(env: Env, tiny_family_dirs, tiny_lora_dir: Path, tmp_path: Path) -> Env:
    """`env` whose config allows every tiny family by name, with a lora_dir (and a link in it leading out)."""
    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(tiny_lora_dir / "style.safetensors", loras / "style.safetensors")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"not in lora_dir")
    (loras / "evil.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    write_config(env.config, env.data, env.model_dir, lora_dir=str(loras), max_loaded_models=1)
    with env.config.open("a") as fh:
        fh.write("[models]\n" + "".join(f'{name} = "{tiny_family_dirs(BUILDS.get(name, f))}"\n'
                                          for name, f in MODELS.items()))
    return env


def manifest(folder: Path) -> dict:
    return json.loads((folder / "job.json").read_text())


def test_each_family_makes_its_video_with_its_own_frame_count_and_size_and_notes_what_it_adjusted(
    family_env, drop, tiny_family_dirs
):
    jobs = {
        "calm": {"prompt": "the sea", "model": "svd", "motion": 0.25},
        "cat": {"prompt": "a cat turns", "model": "wan", "lora": "style", "lora_scale": 0.5, "motion": 0.5},
        "dog": {"prompt": "a dog wags", "model": "ltx", "width": 100, "height": 70, "fps": 8},
        "owl": {"prompt": "an owl blinks", "model": "cog", "resolution": 128},
        "fox": {"prompt": "a fox runs", "model": "sky", "num_frames": 6},
        "elk": {"prompt": "an elk turns", "model": "ltxc", "fps": 12},
        "bee": {"prompt": "a bee lands", "model": "hy", "width": 100, "height": 70},
        "ant": {"prompt": "an ant walks", "model": "ltx2", "fps": 12},
        "yak": {"prompt": "a yak turns", "model": "hy15", "resolution": 128},
    }
    for stem, doc in jobs.items():
        drop(stem, (".json", json.dumps(doc)), size=(64, 96) if stem == "yak" else (96, 64))  # a portrait one

    family_env.cli("run", "--once", check=True)

    expected = {  # (width, height, frames, fps) the video has; the tiny preset asks for 4 frames at 4 fps
        "calm": (96, 64, 4, 4), "cat": (96, 64, 5, 4), "dog": (96, 64, 9, 8), "owl": (96, 64, 9, 4),
        "fox": (96, 64, 5, 4), "elk": (96, 64, 9, 12), "bee": (96, 64, 5, 4), "ant": (96, 64, 9, 12),
        "yak": (64, 96, 5, 4),
    }
    docs = {}
    for stem, (w, h, frames, fps) in expected.items():
        folder = family_env.output / stem
        meta = probe_mp4(folder / f"{stem}.mp4")
        assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"]) == (w, h, frames, fps), stem
        doc = docs[stem] = manifest(folder)
        name = jobs[stem]["model"]
        build = BUILDS.get(name, MODELS[name])
        assert doc["model"] == {"name": name, "id": str(tiny_family_dirs(build)), "family": MODELS[name],
                                "revision": None, "weights": "auto"}
        eff = doc["effective"]
        assert (eff["width"], eff["height"], eff["num_frames"], eff["model"], eff["family"]) == (
            w, h, frames, name, MODELS[name])
        assert doc["requested"]["model"] == name and doc["requested"]["num_frames"] == jobs[stem].get("num_frames", 4)

    calm = docs["calm"]
    assert calm["effective"]["motion"] == 0.25 and calm["effective"]["conditioning"]["motion_bucket_id"] == 65
    assert any("svd takes no prompt" in n for n in calm["notes"])
    cat = docs["cat"]
    assert (cat["effective"]["lora"], cat["effective"]["lora_scale"]) == ("style", 0.5)
    assert cat["requested"]["lora"] == "style" and "motion" not in cat["effective"]
    assert "num_frames 4 rounded to 5 (wan makes 1 + a multiple of 4 frames, at least 5)" in cat["notes"]
    assert "wan has no motion control; motion 0.5 was not used" in cat["notes"]
    dog = docs["dog"]
    assert "width 100 rounded to 96 (the model needs multiples of 32)" in dog["notes"]
    assert dog["effective"]["conditioning"]["frame_rate"] == 8
    assert any("cogvideox makes only 96×64 videos" in n for n in docs["owl"]["notes"])
    assert "num_frames 4 rounded to 9" in (family_env.output / "owl" / "job.log").read_text()
    fox = docs["fox"]
    assert "num_frames 6 rounded to 5 (skyreels-v2 makes 1 + a multiple of 4 frames, at least 5)" in fox["notes"]
    assert any("skyreels-v2 makes motion for about 24 fps" in n for n in fox["notes"])
    bee = docs["bee"]
    assert "width 100 rounded to 96 (the model needs multiples of 16)" in bee["notes"]
    assert bee["effective"]["conditioning"]["true_cfg_scale"] == 1.0  # guidance embedded
    elk = docs["elk"]["effective"]["conditioning"]
    assert (elk["frame_rate"], elk["max_sequence_length"], elk["image_cond_noise_scale"]) == (12, 256, 0.025)
    ant = docs["ant"]
    assert ant["effective"]["conditioning"]["frame_rate"] == 12 and ant["effective"]["conditioning"]["stg_scale"] == 0
    assert "ltx-2 also generates an audio track with the video; it was not kept (the video is silent)" in ant["notes"]
    assert "hunyuanvideo-1.5-i2v makes the sizes of its 80×80-pixel buckets: 64×96 for this image; resolution 128 " \
           "was not used" in docs["yak"]["notes"]
    assert docs["yak"]["effective"]["conditioning"] == {"guidance_scale": 2.0}  # the tiny preset's, in its guider
    by_name = {j["name"]: j for j in family_env.status()["jobs"]}
    assert {n: by_name[n]["num_frames"] for n in expected} == {n: e[2] for n, e in expected.items()}


def test_requests_a_family_cannot_honour_fail_with_what_to_ask_for_and_the_daemon_keeps_serving(family_env, drop):
    jobs = {
        "cogsize": ({"model": "cog", "width": 128, "height": 128}, "cogvideox makes only 96×64 videos"),
        "hysize": ({"model": "hy15", "width": 128, "height": 128},
                   "hunyuanvideo-1.5-i2v makes only the sizes of its 80×80-pixel buckets"),
        "coglong": ({"model": "cog", "num_frames": 20}, "num_frames 20 is more than cogvideox can make (at most 9)"),
        "svdlora": ({"model": "svd", "lora": "style"}, "svd cannot apply a LoRA"),
        "nomodel": ({"model": "nope"}, "model 'nope' is not one the config allows; use one of cog, default, hy, hy15, "
                                       "ltx, ltx2, ltxc, sky, svd, wan"),
        "escape": ({"model": "wan", "lora": "evil"}, "evil.safetensors is a link that leads outside"),
        "absent": ({"model": "wan", "lora": "other"}, "there is no other.safetensors in"),
    }
    for stem, (doc, _) in jobs.items():
        drop(stem, (".json", json.dumps({"prompt": "x", **doc})))
    drop("fine", (".json", json.dumps({"prompt": "still serving", "model": "ltx"})))
    checked = family_env.cli("validate", str(family_env.inbox / "nomodel.json"))
    assert checked.returncode == 1 and "model 'nope' is not one the config allows" in checked.stdout

    family_env.cli("run", "--once", check=True)

    for stem, (_, message) in jobs.items():
        doc = manifest(family_env.failed / stem)
        assert doc["status"] == "failed" and doc["error"]["type"] == "invalid_input", stem
        assert message in doc["error"]["message"], doc["error"]["message"]
        assert doc["attempts"] == []  # refused before any work was done
    assert (family_env.output / "fine" / "fine.mp4").exists()
    assert family_env.status()["counts"]["failed"] == len(jobs)
