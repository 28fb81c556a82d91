"""`i2v-daemon doctor` through the real CLI: a good set-up passes, a broken one names each problem and its fix,
and every condition under which `run` would stop (exit 78) or every job would fail is a FAIL (exit 1)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env, write_config

HUB_MODEL = "ali-vilab/i2vgen-xl"  # the default model, never in a test's empty cache


# ---- helpers: the CLI, the Hub's cache, and the network conditions --------------------------------


def doctor(env: Env, extra_env: dict[str, str] | None = None) -> tuple[int, dict[str, list[dict[str, str]]]]:
    """Run `doctor --json`; its exit status and its checks by name (a name may have several)."""
    proc = env.cli("doctor", "--json", "--min-free-gib", "0.001", env=extra_env, timeout=120)
    assert proc.stdout, proc.stderr
    by_name: dict[str, list[dict[str, str]]] = {}
    for check in json.loads(proc.stdout)["checks"]:
        by_name.setdefault(check["name"], []).append(check)
    return proc.returncode, by_name


def hub_env(hf_home: Path, endpoint: str, *, offline: bool) -> dict[str, str]:
    """An empty (or test-made) Hugging Face cache, the Hub at `endpoint`, HF_HUB_OFFLINE set or not."""
    return {"HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0"}


def refused_endpoint() -> str:
    """An address where nothing listens: connecting is refused at once, as with a network that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextmanager
def silent_hub() -> Iterator[tuple[str, list[socket.socket]]]:
    """A server that accepts connections and never answers (a firewall that drops replies); yields who came."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)  # held open, never answered

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def cache_model(hf_home: Path, repo: str, source: Path) -> Path:
    """Put `source` in a Hugging Face cache as `repo` at main, laid out as huggingface_hub writes it; the snapshot."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def add_models(config: Path, models: dict[str, str]) -> None:
    """A `[models]` table at the end of the config file."""
    table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in models.items())
    config.write_text(config.read_text() + "[models]\n" + table)


def only(checks: dict[str, list[dict[str, str]]], name: str) -> dict[str, str]:
    assert len(checks.get(name, [])) == 1, checks.get(name)
    return checks[name][0]


def download_command(fix: str) -> list[str]:
    """The `… download REPO` command a fix names, as argv (HF_HOME=… left off)."""
    words = fix.split("download it once, with network access, as the daemon's user: ", 1)[1].split(";")[0].split()
    return [w for w in words if not w.startswith("HF_HOME=")]


# ---- the whole set-up -------------------------------------------------------------------------


def test_doctor_on_a_good_set_up_finds_nothing_to_fix_and_exits_0(env: Env):
    env.cli("migrate", check=True)  # the database exists, with its schema
    proc = env.cli("doctor", "--json", "--min-free-gib", "0.001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    by_name = {c["name"]: c for c in report["checks"]}
    assert {"gpu", "ffmpeg", "data_dir", "inbox_dir", "output_dir", "failed_dir", "work_dir", "database",
            "model"} <= set(by_name)
    assert all(c["level"] == "ok" for c in report["checks"]), report["checks"]
    assert "device = cpu" in by_name["gpu"]["message"]
    assert "libx264" in by_name["ffmpeg"]["message"]
    assert "I2VGenXLPipeline" in by_name["model"]["message"]
    assert "queued 0" in by_name["database"]["message"]
    assert "no card to plan for" in by_name["fit"]["message"]  # the CPU; with a card it says what fits
    assert "GiB free" in by_name["inbox_dir"]["message"]


def test_doctor_says_which_presets_fit_the_card_from_the_models_configs(env: Env):
    env.cli("migrate", check=True)
    card = env.cli("doctor", "--json", "--min-free-gib", "0.001", env={"I2V_TEST_DEVICE_BUDGET_GIB": "2"})
    assert card.returncode == 0, card.stdout + card.stderr
    fit = {c["name"]: c for c in json.loads(card.stdout)["checks"]}["fit"]
    assert fit["level"] == "ok", fit
    head = f"{env.model_dir} on a 2 GiB card (predicted): placed gpu (planned for 1360x768x24); "
    assert fit["message"].startswith(head), fit["message"]
    for preset in ("fast", "standard", "high", "tiny"):
        assert re.search(rf"; {preset} \d+x\d+x\d+ \(0\.\d GiB\)", fit["message"]), fit["message"]
    assert "wan-turbo" not in fit["message"]  # not usable without its LoRA

    tiny = env.cli("doctor", "--json", "--min-free-gib", "0.001", env={"I2V_TEST_DEVICE_BUDGET_GIB": "0.01"})
    fit = {c["name"]: c for c in json.loads(tiny.stdout)["checks"]}["fit"]
    assert tiny.returncode == 0 and fit["level"] == "warn"  # a warning: the daemon still serves what fits
    assert "tiny 112x64x4 does not fit at any size of resolution_ladder" in fit["message"], fit["message"]
    assert fit["fix"].startswith("presets fast, standard, high") and "allow_fp8_fallback" in fit["fix"]


def test_doctor_names_each_broken_part_with_a_fix_and_exits_1(env: Env, tmp_path: Path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    proc = env.cli("doctor", env={
        "I2V_INBOX_DIR": str(a_file / "inbox"),  # cannot be created: its parent is a file
        "I2V_MODEL": str(tmp_path / "no-such-model"),
        "I2V_DATABASE_URL": "postgresql+psycopg://i2v@127.0.0.1:9/nothing",  # nothing listens on port 9
    })
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAIL  inbox_dir:" in out and "is a file, not a folder" in out
    assert "FAIL  model:" in out and "no-such-model" in out and "does not exist" in out
    # Refused connections are not a mistake in the config: `run` waits for the server (and doctor says so).
    assert "WAIT  database: cannot open postgresql+psycopg://i2v@127.0.0.1:9/nothing now: connection refused" in out
    fails = [i for i, line in enumerate(out.splitlines()) if line.startswith(("FAIL", "WAIT"))]
    assert len(fails) >= 3 and all(out.splitlines()[i + 1].strip().startswith("fix:") for i in fails)
    assert "OK    ffmpeg" in out  # the rest is still checked
    summary = out.strip().splitlines()[-1]
    assert summary.startswith(f"{len(fails) - 1} problem(s) to fix") and summary.endswith(
        ", 1 not there now (the daemon waits for it)")


def test_a_folder_on_a_read_only_mount_is_reported_as_waited_for_and_doctor_exits_1(env: Env):
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only filesystem needs root")
    env.output.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "i2v-test", str(env.output)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(env.output)], check=True)
        proc = env.cli("doctor", "--min-free-gib", "0.001")
    finally:
        subprocess.run(["umount", "-l", str(env.output)], check=False)
    assert proc.returncode == 1, proc.stdout
    assert f"WAIT  output_dir: {env.output} is on a read-only filesystem: `run` and `serve` wait for it" in proc.stdout
    assert "remount it read-write" in proc.stdout


def test_a_cuda_torch_that_sees_no_gpu_is_waited_for_and_a_cpu_only_one_is_a_fail(
    env: Env, monkeypatch: pytest.MonkeyPatch,
):
    from i2v_daemon.models import gpu
    from i2v_daemon.service.doctor import check_gpu

    seen = {"torch": "2.13.0", "cuda_build": "12.8", "cuda_available": False, "devices": [], "error": None}
    monkeypatch.setattr(gpu, "describe", lambda: seen)
    [waiting] = [c for c in check_gpu(settings(env, device="cuda")) if c.name == "gpu"]
    assert waiting.level == "wait" and "`run` waits until the driver shows the GPU" in waiting.message
    seen["cuda_build"] = None
    [wrong] = [c for c in check_gpu(settings(env, device="cuda")) if c.name == "gpu"]
    assert wrong.level == "fail" and "cannot work" in wrong.message


def test_doctor_warns_about_a_paused_queue_but_still_exits_0(env: Env):
    env.cli("migrate", check=True)  # `pause` needs a database; it never makes one
    env.cli("pause", check=True)
    proc = env.cli("doctor", "--min-free-gib", "0.001")
    assert proc.returncode == 0, proc.stdout
    assert "WARN  queue: paused since" in proc.stdout and "fix: i2v-daemon resume" in proc.stdout


def test_doctor_changes_nothing_on_disk(tmp_path: Path, tiny_i2vgen_dir: Path):
    config = write_config(tmp_path / "config.toml", tmp_path / "data", tiny_i2vgen_dir)
    add_models(config, {"hub": HUB_MODEL})
    env = Env(data=tmp_path / "data", config=config, model_dir=tiny_i2vgen_dir)
    before = sorted(tmp_path.rglob("*"))
    code, _ = doctor(env, hub_env(tmp_path / "hf", refused_endpoint(), offline=False))
    assert code == 1  # the Hub model cannot be had; everything else is fine
    assert sorted(tmp_path.rglob("*")) == before  # no data folder, database, cache or token file was made


# ---- the models: doctor fails exactly where `run` stops or the jobs fail ------------------------


def test_a_hub_model_missing_from_the_cache_with_hf_hub_offline_is_a_fail_without_touching_the_network(
    env: Env, tmp_path: Path,
):
    with silent_hub() as (endpoint, came):
        code, checks = doctor(env, {"I2V_MODEL": HUB_MODEL, **hub_env(tmp_path / "hf", endpoint, offline=True)})
    assert came == []  # HF_HUB_OFFLINE: not one connection
    assert code == 1
    model = only(checks, "model")
    assert model["level"] == "fail"
    assert HUB_MODEL in model["message"] and "HF_HUB_OFFLINE" in model["message"]
    assert str(tmp_path / "hf" / "hub") in model["message"]  # which cache was looked in
    fix = model["fix"]
    assert f"HF_HOME={tmp_path / 'hf'} " in fix and f"download {HUB_MODEL}" in fix
    assert "huggingface-cli" not in fix  # the installed huggingface_hub ships `hf`, not that
    assert "HF_HUB_OFFLINE=1" in fix and "--local-dir" in fix and 'model = "DIR"' in fix
    # The command it names exists in the installed huggingface_hub and knows `download`.
    argv = download_command(fix)
    assert argv[-2:] == ["download", HUB_MODEL]
    assert subprocess.run([*argv[:-1], "--help"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.parametrize("network", ["refused", "silent"])
def test_a_hub_model_missing_from_the_cache_with_the_hub_unreachable_is_a_fail_after_one_bounded_probe(
    env: Env, tmp_path: Path, network: str,
):
    with silent_hub() as (silent, came):
        endpoint = silent if network == "silent" else refused_endpoint()
        # The subprocess timeout only guards against a hang; the probe itself gives up after a few seconds.
        code, checks = doctor(env, {"I2V_MODEL": HUB_MODEL, **hub_env(tmp_path / "hf", endpoint, offline=False)})
        if network == "silent":
            assert len(came) == 1  # it did ask, once, and did not wait for the client's retries
    assert code == 1
    model = only(checks, "model")
    assert model["level"] == "fail" and "the Hub cannot be reached" in model["message"]
    assert "jobs stay queued" in model["message"]  # what `run` does about it
    assert f"download {HUB_MODEL}" in model["fix"] and "HF_HUB_OFFLINE=1" in model["fix"]


def test_every_entry_of_the_models_table_is_checked_and_a_broken_one_fails(env: Env, tmp_path: Path):
    not_a_pipeline = tmp_path / "just-a-folder"
    not_a_pipeline.mkdir()
    add_models(env.config, {
        "good": str(env.model_dir), "gone": str(tmp_path / "gone"), "plain": str(not_a_pipeline), "hub": HUB_MODEL,
    })
    code, checks = doctor(env, hub_env(tmp_path / "hf", refused_endpoint(), offline=True))
    assert code == 1
    assert only(checks, "model")["level"] == "ok"
    assert only(checks, "models.good")["level"] == "ok"
    for name, says in [("gone", "does not exist"), ("plain", "no model_index.json"), ("hub", "HF_HUB_OFFLINE")]:
        check = only(checks, f"models.{name}")
        assert check["level"] == "fail" and says in check["message"], check
        if name == "hub":  # cannot be fetched now: its jobs wait, as the worker does with them
            assert f'jobs with model = "{name}" wait in the queue (using no attempt)' in check["message"]
        else:
            assert f'every job with model = "{name}" fails' in check["message"]
    assert "set `models.gone` to an existing diffusers folder" in only(checks, "models.gone")["message"]


def _file(tmp: Path, tiny: Path) -> str:
    (tmp / "model.safetensors").write_bytes(b"x")
    return str(tmp / "model.safetensors")


def _no_index(tmp: Path, tiny: Path) -> str:
    shutil.copytree(tiny, tmp / "m", ignore=shutil.ignore_patterns("model_index.json"))
    return str(tmp / "m")


def _unsupported(tmp: Path, tiny: Path) -> str:
    shutil.copytree(tiny, tmp / "m")
    index = json.loads((tmp / "m" / "model_index.json").read_text())
    (tmp / "m" / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    return str(tmp / "m")


def _no_unet(tmp: Path, tiny: Path) -> str:
    shutil.copytree(tiny, tmp / "m", ignore=shutil.ignore_patterns("unet"))
    return str(tmp / "m")


@pytest.mark.slow
@pytest.mark.parametrize(("make", "says"), [
    (_file, "is a file"), (_no_index, "no model_index.json"), (_unsupported, "does not support"),
    (_no_unet, "unet/ is missing"),
], ids=["a-file", "no-model-index", "unsupported-pipeline", "a-part-missing"])
def test_a_local_model_that_can_never_load_fails_in_doctor_and_stops_run_once_with_78(
    env: Env, drop: Callable[..., list[Path]], tmp_path: Path, make: Callable[[Path, Path], str], says: str,
):
    model = make(tmp_path, env.model_dir)
    code, checks = doctor(env, {"I2V_MODEL": model})
    check = only(checks, "model")
    assert code == 1 and check["level"] == "fail" and says in check["message"], check
    assert "exit 78" in check["message"] and check["fix"]
    drop("cat", (".txt", "a cat"))
    run = env.cli("run", "--once", env={"I2V_MODEL": model})
    assert run.returncode == 78, run.stderr[-2000:]


@pytest.mark.slow
def test_a_hub_model_that_cannot_be_fetched_now_fails_in_doctor_and_run_once_keeps_the_job_queued(
    env: Env, drop: Callable[..., list[Path]], tmp_path: Path,
):
    offline = {"I2V_MODEL": HUB_MODEL, **hub_env(tmp_path / "hf", refused_endpoint(), offline=True)}
    code, checks = doctor(env, offline)
    assert code == 1 and only(checks, "model")["level"] == "fail"
    drop("cat", (".txt", "a cat"))
    run = env.cli("run", "--once", env=offline)
    assert run.returncode == 78, run.stderr[-2000:]
    assert env.status()["counts"]["queued"] == 1  # taken in, waiting for the model


@pytest.mark.slow
def test_a_cached_hub_model_is_ok_offline_and_a_half_downloaded_one_fails_like_run_does(
    env: Env, drop: Callable[..., list[Path]], tmp_path: Path,
):
    snapshot = cache_model(tmp_path / "hf", "tiny/i2vgen", env.model_dir)
    cached = {"I2V_MODEL": "tiny/i2vgen", **hub_env(tmp_path / "hf", refused_endpoint(), offline=True)}
    code, checks = doctor(env, cached)
    model = only(checks, "model")
    assert code == 0 and model["level"] == "ok", model
    assert "in the Hugging Face cache" in model["message"] and "I2VGenXLPipeline" in model["message"]
    drop("cat", (".txt", "a cat"))
    assert env.cli("run", "--once", env=cached).returncode == 0  # doctor's ok is run's ok
    assert (env.output / "cat" / "cat.mp4").exists()

    # A download that stopped half-way: the UNet's weights never arrived.
    weights = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    weights.resolve().unlink()
    weights.unlink()
    code, checks = doctor(env, cached)
    model = only(checks, "model")
    assert code == 1 and model["level"] == "fail" and "unet/ has no complete weights" in model["message"]
    assert "download tiny/i2vgen" in model["fix"]
    drop("dog", (".txt", "a dog"))
    assert env.cli("run", "--once", env=cached).returncode == 78


def test_a_cached_hub_model_with_the_hub_unreachable_and_no_hf_hub_offline_is_a_warning_saying_to_set_it(
    env: Env, tmp_path: Path,
):
    cache_model(tmp_path / "hf", "tiny/i2vgen", env.model_dir)
    code, checks = doctor(env, {"I2V_MODEL": "tiny/i2vgen", **hub_env(tmp_path / "hf", refused_endpoint(),
                                                                       offline=False)})
    model = only(checks, "model")
    assert code == 0 and model["level"] == "warn", model
    assert "HF_HUB_OFFLINE=1" in model["fix"]


# ---- ffmpeg's interpolation filters -----------------------------------------------------------------


def test_an_ffmpeg_without_minterpolate_is_a_warning_naming_the_motion_mode(env: Env, tmp_path: Path):
    import imageio_ffmpeg

    # The real ffmpeg, with `-filters` as a build without minterpolate would list them.
    real = imageio_ffmpeg.get_ffmpeg_exe()
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$*" = "-hide_banner -filters" ]; then "{real}" "$@" | grep -v " minterpolate "; '
        f'else exec "{real}" "$@"; fi\n'
    )
    wrapper.chmod(0o755)
    code, checks = doctor(env, {"IMAGEIO_FFMPEG_EXE": str(wrapper)})
    levels = {c["level"] for c in checks["ffmpeg"]}
    warns = [c for c in checks["ffmpeg"] if c["level"] == "warn"]
    assert code == 0 and levels == {"ok", "warn"} and len(warns) == 1
    assert "minterpolate" in warns[0]["message"] and 'interpolation = "motion"' in warns[0]["message"]
    assert "framerate" not in warns[0]["message"]  # blend still works
    assert "IMAGEIO_FFMPEG_EXE" in warns[0]["fix"]


# ---- RIFE weights, the on_finish hook, the API token -------------------------------------------------


def settings(env: Env, **extra: Any) -> Any:
    """The real settings of `env`'s config with `extra` keys added."""
    from i2v_daemon.settings import load_settings

    write_config(env.config, env.data, env.model_dir, **extra)
    return load_settings(str(env.config))


@pytest.mark.parametrize(("extra", "key"), [
    ('interpolation = "rife"\n', "rife_model: interpolation = 'rife' needs rife_model"),
    ('[presets.standard]\ninterpolation = "rife"\n', "presets.standard.interpolation: 'rife' needs rife_model"),
])
def test_rife_as_a_default_or_in_a_preset_without_rife_model_stops_doctor_and_run_alike_with_78(
    env: Env, extra: str, key: str,
):
    # A top-level key goes before the config's tables; a table after them.
    text = env.config.read_text()
    env.config.write_text(text + extra if extra.startswith("[") else extra + text)
    for command in ("doctor", "run"):
        proc = env.cli(command, "--once") if command == "run" else env.cli(command)
        assert proc.returncode == 78 and key in proc.stderr, (command, proc.stderr)


def test_a_rife_model_that_is_missing_a_folder_or_not_weights_is_a_fail(env: Env, tmp_path: Path):
    from i2v_daemon.service.doctor import check_rife_model

    garbage = tmp_path / "flownet.safetensors"
    garbage.write_bytes(os.urandom(64))
    for path, says in [(tmp_path / "nope.safetensors", "does not exist"), (tmp_path, "not a regular file"),
                       (garbage, "")]:
        [check] = check_rife_model(settings(env, rife_model=str(path)))
        assert check.level == "fail" and str(path) in check.message and says in check.message, check


def test_usable_rife_weights_are_ok(env: Env, tmp_path: Path):
    from i2v_daemon.service.doctor import check_rife_model

    rife = pytest.importorskip("i2v_daemon.models.rife")
    weights = rife.save_random_rife(tmp_path / "flownet.safetensors")
    [check] = check_rife_model(settings(env, rife_model=str(weights), interpolation="rife"))
    assert check.level == "ok" and "used by interpolation" in check.message, check


def test_an_on_finish_hook_that_cannot_run_is_a_fail_naming_the_key(env: Env, tmp_path: Path):
    from i2v_daemon.service.doctor import check_on_finish

    not_executable = tmp_path / "notify.sh"
    not_executable.write_text("#!/bin/sh\n")
    for argv, says in [(["/no/such/hook"], "does not exist"), ([str(not_executable)], "not an executable"),
                       (["no-such-program-anywhere"], "not on PATH"), (["./notify.sh"], "relative path")]:
        [check] = check_on_finish(settings(env, on_finish=argv))
        assert check.level == "fail" and check.name == "on_finish" and says in check.message, check
        assert "on_finish = [" in check.fix
    [ok] = check_on_finish(settings(env, on_finish=["true", "--flag"]))
    assert ok.level == "ok" and shutil.which("true") in ok.message  # type: ignore[operator]
    assert check_on_finish(settings(env)) == []


def test_an_api_token_file_that_others_can_read_is_a_warning_with_the_chmod(env: Env, tmp_path: Path):
    from i2v_daemon.service.doctor import check_api_token_file

    token = tmp_path / "api-token"
    s = settings(env, api_token_file=str(token))
    assert check_api_token_file(s)[0].level == "ok"  # `serve` makes it when missing
    token.write_text("secret\n")
    token.chmod(0o644)
    [check] = check_api_token_file(s)
    assert check.level == "warn" and "0644" in check.message and f"chmod 600 {token}" in check.fix
    token.chmod(0o600)
    assert check_api_token_file(s)[0].level == "ok"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_an_api_token_file_owned_by_another_user_is_a_warning_with_the_chown(env: Env, tmp_path: Path):
    from i2v_daemon.service.doctor import check_api_token_file

    token = tmp_path / "api-token"
    token.write_text("secret\n")
    token.chmod(0o600)
    os.chown(token, 65534, 65534)
    [check] = check_api_token_file(settings(env, api_token_file=str(token)))
    assert check.level == "warn" and "sudo chown" in check.fix and str(token) in check.fix
