"""Provenance through the real daemon: every published video and poster C2PA-signed and labelled AI-made,
its recipe readable by `inspect` (also after a remux), a crash or a signing failure never publishing an
unsigned file, and `inspect --sidecar` making the same job again."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import c2pa
import imageio_ffmpeg
import numpy as np
import pytest

from tests.conftest import Env, age, daemon_log, make_image, write_config

pytestmark = pytest.mark.slow

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def drop_json(env: Env, stem: str, values: dict, image: Path | None = None) -> None:
    target = env.inbox / f"{stem}.png"
    if image is None:
        make_image(env.inbox / f".{stem}.png").rename(target)
    else:
        target.write_bytes(image.read_bytes())
    side = env.inbox / f"{stem}.json"
    side.write_text(json.dumps(values))
    age(target, side)


def reader(path: Path, anchors: str | None = None) -> c2pa.Reader:
    settings = {"trust": {"trust_anchors": anchors}, "verify": {"verify_trust": True}} if anchors else {}
    mime = "video/mp4" if path.suffix == ".mp4" else "image/jpeg"
    with open(path, "rb") as fh:
        return c2pa.Reader(mime, fh, None, c2pa.Context.from_dict(settings))


def decode(path: Path) -> np.ndarray:
    frames = imageio_ffmpeg.read_frames(str(path))
    w, h = next(frames)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in frames])


def test_the_published_video_and_poster_validate_and_name_the_input_image_by_its_hash(env: Env) -> None:
    drop_json(env, "cat", {"prompt": "a cat turns its head", "seed": 7, "negative_prompt": "blur"})
    env.cli("run", "--once", check=True)
    folder = env.output / "cat"
    root = (env.data / "c2pa" / "root.pem").read_text()
    want = hashlib.sha256((folder / "input" / "cat.png").read_bytes()).hexdigest()
    for name in ("cat.mp4", "poster.jpg"):
        read = reader(folder / name, anchors=root)
        assert read.get_validation_state() == "Trusted", read.get_validation_results()
        manifest = read.get_active_manifest()
        action = next(a for x in manifest["assertions"] if x["label"] == "c2pa.actions.v2"
                      for a in x["data"]["actions"])
        assert action["digitalSourceType"] == TRAINED and action["softwareAgent"]["name"] == "i2v-daemon"
        assert action["parameters"]["org.i2v-daemon.model"]["id"] == str(env.model_dir)
        assert manifest["ingredients"][0]["metadata"]["org.i2v-daemon.sha256"] == want
    job = json.loads((folder / "job.json").read_text())
    assert job["provenance"]["method"] == "c2pa" and job["provenance"]["signed"] == ["cat.mp4", "poster.jpg"]
    assert job["provenance"]["self_signed"] is True
    assert "provenance" in (folder / "job.log").read_text()

    shown = json.loads(env.cli("inspect", str(folder / "cat.mp4"), "--json", check=True).stdout)
    assert shown["recipe_source"] == "xmp"
    made = shown["recipe"]
    eff = job["effective"]
    assert (made["prompt"], made["negative_prompt"], made["seed"]) == ("a cat turns its head", "blur", 7)
    assert {k: made[k] for k in ("width", "height", "num_frames", "steps", "guidance_scale", "fps", "scheduler")} \
        == {k: eff[k] for k in ("width", "height", "num_frames", "steps", "guidance_scale", "fps", "scheduler")}
    assert made["model_id"] == str(env.model_dir) and made["family"] == "i2vgen-xl"
    proof = shown["provenance"]
    assert proof["valid"] and proof["trusted"] and proof["digital_source_type"] == TRAINED
    assert proof["signer"]["common_name"] == "i2v-daemon signer" and proof["errors"] == []
    text = env.cli("inspect", str(folder / "cat.mp4"), check=True).stdout
    assert "a cat turns its head" in text and "AI-generated" in text and "valid" in text


def test_a_remux_that_strips_the_metadata_still_gives_the_recipe_to_inspect(env: Env, tmp_path: Path) -> None:
    drop_json(env, "cat", {"prompt": "waves", "seed": 3})
    env.cli("run", "--once", check=True)
    remuxed = tmp_path / "reuploaded.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(env.output / "cat" / "cat.mp4"),
                    "-map_metadata", "-1", "-c", "copy", str(remuxed)], check=True)
    shown = json.loads(env.cli("inspect", str(remuxed), "--json").stdout)
    assert shown["recipe_source"] == "sei" and shown["recipe"]["prompt"] == "waves" and shown["recipe"]["seed"] == 3
    assert shown["provenance"]["present"] is False  # a remux rewrites the boxes: the C2PA manifest is gone


def test_a_byte_changed_in_a_published_video_makes_inspect_say_invalid_and_exit_1(env: Env, tmp_path: Path) -> None:
    drop_json(env, "cat", {"prompt": "waves", "seed": 3})
    env.cli("run", "--once", check=True)
    data = bytearray((env.output / "cat" / "cat.mp4").read_bytes())
    data[data.rfind(b"mdat") + 64] ^= 0xFF
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(bytes(data))
    result = env.cli("inspect", str(tampered))
    assert result.returncode == 1 and "INVALID" in result.stdout and "bmffHash.mismatch" in result.stdout


def test_a_crash_between_encoding_and_signing_is_finished_by_the_next_run_with_a_signed_video(env: Env) -> None:
    drop_json(env, "cat", {"prompt": "a cat", "seed": 1})
    crashed = env.cli("run", "--once", env={"I2V_TEST_CRASH_AT": "video_written"})
    assert crashed.returncode == 99, crashed.stderr[-2000:]
    assert not list(env.output.glob("*")) if env.output.exists() else True
    env.cli("run", "--once", check=True)
    assert reader(env.output / "cat" / "cat.mp4").get_validation_state() == "Valid"
    assert reader(env.output / "cat" / "poster.jpg").get_validation_state() == "Valid"


def test_a_signing_failure_keeps_the_job_waiting_visibly_and_publishes_nothing_unsigned(env: Env) -> None:
    write_config(env.config, env.data, env.model_dir, c2pa_tsa_url="http://127.0.0.1:9/tsa")
    drop_json(env, "cat", {"prompt": "a cat", "seed": 1})
    proc = env.start("--once")  # it would wait out the backoffs (1+2+…+32 s); seen waiting, it is stopped
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, daemon_log(proc)
            shown = env.cli("status", "--json")  # not there before the daemon made its database
            jobs = json.loads(shown.stdout)["jobs"] if shown.returncode == 0 else []
            if jobs and "could not sign" in (jobs[0]["error"] or ""):
                break
            time.sleep(0.3)
        [job] = jobs
        assert job["status"] == "queued" and "the job waits" in job["error"]
        assert not (env.output / "cat").exists()  # nothing unsigned published while it waits
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    assert not (env.output / "cat").exists()
    shown = json.loads(env.cli("show", str(job["id"]), "--json", check=True).stdout)
    assert "c2pa_tsa_url" in json.dumps(shown)
    write_config(env.config, env.data, env.model_dir)  # the operator fixes it
    time.sleep(1.2)  # the wait's backoff (retry_backoff_seconds = 0: one second)
    env.cli("run", "--once", check=True)
    assert reader(env.output / "cat" / "cat.mp4").get_validation_state() == "Valid"
    log = (env.output / "cat" / "job.log").read_text()
    assert "frames_reused" in log  # the wait cost an encode, not a generation


def test_provenance_off_is_recorded_and_the_recipe_is_still_embedded(env: Env) -> None:
    write_config(env.config, env.data, env.model_dir, provenance="off")
    drop_json(env, "cat", {"prompt": "a cat", "seed": 1})
    env.cli("run", "--once", check=True)
    job = json.loads((env.output / "cat" / "job.json").read_text())
    assert job["provenance"]["method"] == "off" and "operator's choice" in job["provenance"]["note"]
    with open(env.output / "cat" / "cat.mp4", "rb") as fh:
        assert c2pa.Reader.try_create("video/mp4", fh) is None
    shown = json.loads(env.cli("inspect", str(env.output / "cat" / "cat.mp4"), "--json", check=True).stdout)
    assert shown["recipe"]["prompt"] == "a cat" and shown["provenance"]["present"] is False
    assert not (env.data / "c2pa").exists()


def test_the_sidecar_inspect_makes_reproduces_the_job_with_the_same_image(env: Env, tmp_path: Path) -> None:
    drop_json(env, "cat", {"prompt": "a cat", "preset": "tiny", "negative_prompt": "blur"})  # a random seed
    env.cli("run", "--once", check=True)
    first = env.output / "cat"
    side = env.cli("inspect", str(first / "cat.mp4"), "--sidecar", check=True).stdout
    (tmp_path / "again.json").write_text(side)
    drop_json(env, "again", json.loads(side), image=first / "input" / "cat.png")
    env.cli("run", "--once", check=True)
    second = env.output / "again"
    a, b = (json.loads((d / "job.json").read_text())["effective"] for d in (first, second))
    keys = ("width", "height", "num_frames", "steps", "guidance_scale", "fps", "seed", "scheduler", "output_fps")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert np.array_equal(decode(first / "cat.mp4"), decode(second / "again.mp4"))


def test_the_first_start_makes_the_self_made_chain_with_a_private_key_and_a_foreign_key_is_exit_78(
    env: Env, tmp_path: Path,
) -> None:
    import stat

    env.cli("run", "--once", check=True)  # nothing to do: only the start
    key = env.data / "c2pa" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and (env.data / "c2pa" / "chain.pem").is_file()
    other = tmp_path / "other"
    env.cli("run", "--once", "--data-dir", str(other), check=True)
    write_config(env.config, env.data, env.model_dir, c2pa_cert=str(env.data / "c2pa" / "chain.pem"),
                 c2pa_key=str(other / "c2pa" / "key.pem"))
    result = env.cli("run", "--once")
    assert result.returncode == 78 and "does not belong to the first certificate" in result.stderr
