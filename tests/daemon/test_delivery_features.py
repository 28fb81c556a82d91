"""Interpolation to the delivered frame rate, per-folder presets, posters and the on_finish hook, through the
real daemon with the tiny model: exact frame counts and positions, the fallback, and the hook's contract."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Env, age, make_image, write_config

pytestmark = pytest.mark.slow


def decode(path: Path) -> np.ndarray:
    """Every frame of an mp4, decoded by ffmpeg (imageio-ffmpeg's reader)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    return np.stack(frames)


def drop_json(env: Env, stem: str, values: dict, folder: str = "") -> None:
    where = env.inbox / folder if folder else env.inbox
    where.mkdir(exist_ok=True)
    image = make_image(where / f".{stem}.png").rename(where / f"{stem}.png")
    side = where / f"{stem}.json"
    side.write_text(json.dumps({"prompt": "a cat", "seed": 1, **values}))
    age(image, side)


@pytest.mark.parametrize("mode", ["motion", "blend", "rife"])
def test_interpolation_delivers_exactly_the_frames_with_generated_frame_i_at_i_times_k(env: Env, tmp_path: Path,
                                                                                      mode: str) -> None:
    extra = {}
    if mode == "rife":
        from i2v_daemon.models.rife import save_random_rife

        extra["rife_model"] = str(save_random_rife(tmp_path / "rife.safetensors"))
    write_config(env.config, env.data, env.model_dir, **extra)
    drop_json(env, "cat", {"fps": 4, "output_fps": 12, "interpolation": mode, "num_frames": 4})
    env.cli("run", "--once", check=True)
    folder = env.output / "cat"
    manifest = json.loads((folder / "job.json").read_text())
    eff = manifest["effective"]
    assert (eff["fps"], eff["output_fps"], eff["interpolation"], eff["output_frames"]) == (4, 12, mode, 10)
    generated, delivered = decode(folder / "cat.generated.mp4"), decode(folder / "cat.mp4")
    assert len(generated) == 4 and len(delivered) == (4 - 1) * 3 + 1
    for i in range(4):
        # Generated frame i is delivered frame 3i, unchanged but for encoding: both files are lossy
        # encodes (CRF 18) of the same frame, within a few levels out of 255 of each other, and it is
        # nearer to delivered frame 3i than to any other delivered frame (the made-up ones included).
        diffs = [np.abs(d.astype(int) - generated[i].astype(int)).mean() for d in delivered]
        assert diffs[i * 3] < 8.0 and int(np.argmin(diffs)) == i * 3, (i, [round(x, 1) for x in diffs])
    [post] = manifest["postprocess"]
    assert post["step"] == "interpolation" and post["outcome"] == "succeeded" and post["mode"] == mode
    assert post["output_frames"] == 10 and post["seconds"] >= 0 and "peak_vram_bytes" in post
    assert manifest["poster"] == "poster.jpg" and (folder / "poster.jpg").exists()


def test_when_interpolation_fails_the_job_still_succeeds_with_the_generated_video_and_says_why(
    env: Env, tmp_path: Path,
) -> None:
    broken = tmp_path / "rife.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    write_config(env.config, env.data, env.model_dir, rife_model=str(broken))
    drop_json(env, "cat", {"fps": 4, "output_fps": 8, "interpolation": "rife"})
    env.cli("run", "--once", check=True)
    folder = env.output / "cat"
    manifest = json.loads((folder / "job.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["effective"]["output_fps"] == 4 and manifest["effective"]["interpolation"] is None
    assert decode(folder / "cat.mp4").shape[0] == decode(folder / "cat.generated.mp4").shape[0] == 4
    assert any("interpolation to 8 fps (rife) failed" in n and "rife_model" in n for n in manifest["notes"])
    assert manifest["postprocess"][0]["outcome"] == "failed"
    assert "interpolation_failed" in (folder / "job.log").read_text()


@pytest.mark.parametrize(("values", "words"), [
    ({"fps": 8, "output_fps": 4}, ["output_fps", "below fps"]),
    ({"fps": 8, "interpolation": "blend"}, ["interpolation", "output_fps"]),
    ({"fps": 8, "output_fps": 24, "interpolation": "rife"}, ["rife_model"]),
    ({"fps": 8, "output_fps": 24, "interpolation": "optical"}, ["'interpolation' must be one of", "'motion'"]),
])
def test_interpolation_requests_that_cannot_be_met_fail_at_intake_naming_the_keys(
    env: Env, values: dict, words: list[str],
) -> None:
    drop_json(env, "cat", values)
    env.cli("run", "--once", check=True)
    [job] = env.status()["jobs"]
    assert job["status"] == "failed" and job["attempts"] == 0
    for word in words:
        assert word in job["error"], (word, job["error"])
    proc = env.cli("validate", str(env.failed / "cat" / "input" / "cat.json"))
    assert proc.returncode == 1 and words[0] in proc.stdout


def test_a_presets_folder_makes_its_preset_the_default_and_the_manifest_says_where_it_came_from(env: Env) -> None:
    write_config(env.config, env.data, env.model_dir,
                 presets_extra={"quick": {"resolution": 64, "num_frames": 3, "steps": 1, "guidance_scale": 1.0,
                                          "fps": 6, "output_fps": 12}})
    env.cli("run", "--once", check=True)  # creates the built-in presets' folders
    assert all((env.inbox / name).is_dir() for name in ("fast", "standard", "high"))
    assert not (env.inbox / "wan-turbo").exists()  # not while it has no LoRA: its jobs could only fail
    (env.inbox / "quick").mkdir()  # a preset from the config: taken once its folder exists
    drop_json(env, "cat", {}, folder="quick")
    drop_json(env, "dog", {"num_frames": 2}, folder="quick")  # the sidecar's keys still win
    drop_json(env, "owl", {})  # the inbox itself: the default preset
    (env.inbox / "album").mkdir()
    drop_json(env, "yak", {}, folder="album")  # not a preset's folder: left alone
    env.cli("run", "--once", check=True)
    cat = json.loads((env.output / "cat" / "job.json").read_text())
    assert cat["folder"] == "inbox/quick" and cat["requested"]["preset"] == "quick"
    assert cat["effective"]["num_frames"] == 3 and cat["effective"]["output_fps"] == 12  # preset's interpolation
    assert cat["effective"]["output_frames"] == (3 - 1) * 2 + 1
    dog = json.loads((env.output / "dog" / "job.json").read_text())
    assert dog["effective"]["num_frames"] == 2 and dog["folder"] == "inbox/quick"
    owl = json.loads((env.output / "owl" / "job.json").read_text())
    assert owl["folder"] == "inbox" and owl["requested"]["preset"] == "tiny"
    assert (env.inbox / "album" / "yak.png").exists() and not (env.output / "yak").exists()


HOOK = """#!{python}
import json, os, sys
keys = ["I2V_JOB_ID", "I2V_STATUS", "I2V_JOB_DIR", "I2V_MANIFEST", "I2V_VIDEO"]
seen = {{k: os.environ.get(k) for k in keys}}
seen["job_dir_exists"] = os.path.isdir(seen["I2V_JOB_DIR"])
seen["argv"] = sys.argv[1:]
with open(os.path.join({out!r}, "hook-" + seen["I2V_JOB_ID"] + ".json"), "w") as fh:
    json.dump(seen, fh)
print("hook ran for", seen["I2V_JOB_ID"])
sys.exit(int(os.environ.get("HOOK_EXIT", "0")))
"""


def hook_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "hook.py"
    script.write_text(body)
    script.chmod(0o755)
    return script


def test_the_hook_runs_once_for_a_succeeded_and_a_failed_job_with_their_environment(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "seen"
    out.mkdir()
    script = hook_script(tmp_path, HOOK.format(python=sys.executable, out=str(out)))
    write_config(env.config, env.data, env.model_dir, on_finish=[str(script), "--flag"])
    drop_json(env, "cat", {})
    drop_json(env, "dog", {"steps": 0})  # out of range: a failed job
    proc = env.cli("run", "--once", check=True)
    ok = json.loads((out / "hook-1.json").read_text())
    assert ok == {"I2V_JOB_ID": "1", "I2V_STATUS": "succeeded", "I2V_JOB_DIR": str(env.output / "cat"),
                  "I2V_MANIFEST": str(env.output / "cat" / "job.json"),
                  "I2V_VIDEO": str(env.output / "cat" / "cat.mp4"), "job_dir_exists": True, "argv": ["--flag"]}
    bad = json.loads((out / "hook-2.json").read_text())
    assert bad["I2V_STATUS"] == "failed" and bad["I2V_VIDEO"] == "" and bad["job_dir_exists"]
    assert bad["I2V_JOB_DIR"] == str(env.failed / "dog")
    assert proc.stderr.count('"hook_finished"') == 2 and "hook ran for 1" in proc.stderr
    env.cli("run", "--once", check=True)
    assert sorted(p.name for p in out.iterdir()) == ["hook-1.json", "hook-2.json"]  # once each


def test_a_hook_that_fails_or_hangs_changes_nothing_about_the_job_and_does_not_delay_the_next(
    env: Env, tmp_path: Path,
) -> None:
    hang = hook_script(tmp_path, "#!/bin/sh\nsleep 300 &\necho hanging; sleep 300\n")
    write_config(env.config, env.data, env.model_dir, on_finish=[str(hang)], on_finish_timeout_seconds=1)
    drop_json(env, "cat", {})
    drop_json(env, "dog", {})
    t0 = time.monotonic()
    proc = env.cli("run", "--once", check=True)
    assert time.monotonic() - t0 < 120
    jobs = {j["name"]: j["status"] for j in env.status()["jobs"]}
    assert jobs == {"cat": "succeeded", "dog": "succeeded"}
    assert proc.stderr.count('"hook_timed_out"') == 2 and "hanging" in proc.stderr
    failing = hook_script(tmp_path, "#!/bin/sh\necho 'could not notify' >&2\nexit 3\n")
    write_config(env.config, env.data, env.model_dir, on_finish=[str(failing)])
    drop_json(env, "owl", {})
    proc = env.cli("run", "--once", check=True)
    assert '"hook_failed"' in proc.stderr and "could not notify" in proc.stderr and '"exit_code": 3' in proc.stderr
    assert {j["name"]: j["status"] for j in env.status()["jobs"]}["owl"] == "succeeded"
    assert os.path.exists(env.output / "owl" / "owl.mp4")
