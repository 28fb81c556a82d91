"""The product as a user meets it: drop files, `run --once`, look in output/ and at `status --json`."""

from __future__ import annotations

import json

import pytest

from i2v_daemon.work.video import probe_mp4
from tests.conftest import TINY_PRESET

pytestmark = pytest.mark.slow


def test_three_kinds_of_sidecar_produce_the_contracts_output(env, drop):
    cat = drop("cat", (".txt", "  a cat slowly turns its head \n"))
    dog = drop("dog", (".json", json.dumps({"prompt": "a dog wags", "num_frames": 3, "fps": 6, "seed": 7})))
    owl = drop("owl", (".toml", 'prompt = "an owl blinks"\nnegative_prompt = "blurry"\nsteps = 1\n'), ".jpg")
    dropped = {p.name: p.read_bytes() for p in cat + dog + owl}

    proc = env.cli("run", "--once", check=True)
    assert proc.returncode == 0

    for stem, frames, fps, image in (("cat", 4, 4, "cat.png"), ("dog", 3, 6, "dog.png"), ("owl", 4, 4, "owl.jpg")):
        folder = env.output / stem
        listing = sorted(p.name for p in folder.iterdir())
        assert listing == sorted([f"{stem}.mp4", "job.json", "job.log", "input", "poster.jpg"])
        meta = probe_mp4(folder / f"{stem}.mp4")
        # A 96x64 image at resolution 64: the short side is 64, the long side follows the aspect ratio.
        assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"]) == (96, 64, frames, fps)
        assert meta["codec"] == "h264" and meta["pix_fmt"] == "yuv420p"
        manifest = json.loads((folder / "job.json").read_text())
        assert manifest["status"] == "succeeded"
        assert manifest["output"] == f"{stem}.mp4"
        assert manifest["error"] is None
        assert manifest["inputs"][0] == image
        eff = manifest["effective"]
        assert (eff["width"], eff["height"], eff["num_frames"], eff["fps"]) == (96, 64, frames, fps)
        assert isinstance(eff["seed"], int)
        assert len(manifest["attempts"]) == 1
        attempt = manifest["attempts"][0]
        assert attempt["outcome"] == "succeeded" and attempt["width"] == 96 and attempt["seconds"] > 0
        assert set(manifest["versions"]) >= {"i2v-daemon", "torch", "diffusers", "transformers"}
        assert manifest["model"]["id"] == str(env.model_dir)
        assert manifest["device"] == "cpu"
        for key in ("created_at", "started_at", "finished_at"):
            assert manifest[key].endswith("Z")
        log = (folder / "job.log").read_text()
        assert "received" in log and "succeeded" in log
        for name in manifest["inputs"]:  # the inputs, under their own names and bytes
            assert (folder / "input" / name).read_bytes() == dropped[name]

    cat_manifest = json.loads((env.output / "cat" / "job.json").read_text())
    assert cat_manifest["prompt"] == "a cat slowly turns its head"
    assert cat_manifest["requested"]["num_frames"] == TINY_PRESET["num_frames"]
    dog_manifest = json.loads((env.output / "dog" / "job.json").read_text())
    assert dog_manifest["effective"]["seed"] == 7
    assert dog_manifest["requested"]["seed"] == 7
    owl_manifest = json.loads((env.output / "owl" / "job.json").read_text())
    assert owl_manifest["negative_prompt"] == "blurry" and owl_manifest["effective"]["steps"] == 1

    assert env.inbox_files() == []
    status = env.status()
    assert status["counts"] == {"queued": 0, "running": 0, "succeeded": 3, "failed": 0, "canceled": 0}
    assert [j["name"] for j in status["jobs"]] == ["owl", "dog", "cat"]  # newest first
    for job in status["jobs"]:
        assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["attempts"] == 1
        assert job["output"] == str(env.output / job["name"] / f"{job['name']}.mp4")
        assert job["error"] is None and job["width"] == 96 and job["height"] == 64
        assert set(job) >= {"id", "name", "status", "progress", "attempts", "created_at", "started_at",
                            "finished_at", "width", "height", "num_frames", "output", "error"}


def test_bad_inputs_fail_into_failed_with_a_manifest_that_says_what_to_fix_and_the_daemon_keeps_serving(env, drop):
    drop("typo", (".json", json.dumps({"prompt": "x", "step": 3})))
    drop("nan", (".json", '{"prompt": "x", "guidance_scale": NaN}'))
    drop("noprompt", (".toml", "steps = 2\n"))
    (env.inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (env.inbox / "broken.txt").write_text("hello")
    drop("twice", (".txt", "one"))
    (env.inbox / "twice.json").write_text('{"prompt": "two"}')
    drop("good", (".txt", "fine"))
    dropped = {p.name: p.read_bytes() for p in env.inbox.iterdir()}

    env.cli("run", "--once", check=True)

    expectations = {
        "typo": "did you mean 'steps'",
        "nan": "NaN",
        "noprompt": "prompt",
        "broken": "broken.png",
        "twice": "exactly one",
    }
    for stem, needle in expectations.items():
        folder = env.failed / stem
        manifest = json.loads((folder / "job.json").read_text())
        assert manifest["status"] == "failed"
        assert manifest["error"]["type"] == "invalid_input"
        assert needle in manifest["error"]["message"], manifest["error"]["message"]
        assert manifest["output"] is None
        assert not list(folder.glob("*.mp4"))
        assert "invalid_input" in (folder / "job.log").read_text()
    assert (env.output / "good" / "good.mp4").exists()
    # Nothing a user dropped is lost: every byte is in failed/S/input or output/S/input.
    found = {p.name: p.read_bytes() for p in env.data.glob("*/*/input/*")}
    assert found == dropped
    counts = env.status()["counts"]
    assert counts["failed"] == 5 and counts["succeeded"] == 1


def test_an_image_without_a_sidecar_runs_with_the_default_preset_and_says_so(env, drop):
    drop("lonely")
    env.cli("run", "--once", check=True)
    folder = env.output / "lonely"
    manifest = json.loads((folder / "job.json").read_text())
    assert manifest["prompt"] == "" and manifest["requested"]["preset"] == "tiny"
    assert manifest["inputs"] == ["lonely.png"]
    assert "no sidecar" in (folder / "job.log").read_text()


def test_a_second_job_with_the_same_name_gets_the_next_free_folder(env, drop):
    drop("cat", (".txt", "first"))
    env.cli("run", "--once", check=True)
    drop("cat", (".txt", "second"))
    env.cli("run", "--once", check=True)
    assert json.loads((env.output / "cat" / "job.json").read_text())["prompt"] == "first"
    assert json.loads((env.output / "cat-2" / "job.json").read_text())["prompt"] == "second"
    assert (env.output / "cat-2" / "cat.mp4").exists()


def test_show_cancel_and_retry_work_on_a_job_through_the_cli(env, drop):
    drop("later", (".txt", "wait for it"))
    # Take the files into the queue without running anything: a worker-less intake pass.
    from i2v_daemon.daemon import Daemon
    from i2v_daemon.settings import load_settings

    daemon = Daemon(load_settings(str(env.config)))
    daemon.intake_pass(once=True)
    job_id = daemon.store.list_jobs(1)[0].id
    daemon.store.close()

    shown = json.loads(env.cli("show", str(job_id), "--json", check=True).stdout)
    assert shown["status"] == "queued" and shown["inputs"] == ["later.png", "later.txt"]

    out = env.cli("cancel", str(job_id), check=True).stdout
    assert "canceled" in out
    # The CLI only asks; a daemon finishes the job (it moves the files, under its own lease and umask).
    assert not (env.failed / "later").exists()
    env.cli("run", "--once", check=True)
    manifest = json.loads((env.failed / "later" / "job.json").read_text())
    assert manifest["status"] == "canceled" and manifest["error"]["type"] == "canceled"
    assert manifest["error"]["message"] == "canceled on request (`i2v-daemon cancel` or the API) before it started"
    assert manifest["attempt_count"] == 0  # a job canceled before it ran used no attempt
    assert (env.failed / "later" / "input" / "later.png").exists()
    assert env.cli("cancel", str(job_id)).returncode == 1  # already canceled

    assert env.cli("retry", str(job_id), check=True).returncode == 0
    env.cli("run", "--once", check=True)
    assert (env.output / "later" / "later.mp4").exists()
    assert not (env.failed / "later").exists()
    log = (env.output / "later" / "job.log").read_text()
    assert "canceled" in log and "succeeded" in log  # one log, from intake to the final finish
    assert env.cli("show", "999").returncode == 1
    assert env.cli("retry", str(job_id)).returncode == 1  # succeeded jobs are not retried
