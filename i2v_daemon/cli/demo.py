"""`i2v-daemon demo`: a first job without a GPU and without a download.

It builds a tiny random I2VGen-XL into the state folder (once; later demos reuse it), makes a fresh
data folder with a config file pointing `model` at it, drops a generated picture and its prompt
into the inbox the safe way, and runs the same drain as `i2v-daemon run --once`, in this process:
the real settings, intake, queue, worker, encoder and output folder. Then it prints where the video
and its manifest are. The video is noise (the weights are random); the rest is a real job.

The demo never uses the user's configuration: not their config file, not their `I2V_*` variables
(an `I2V_DATABASE_URL` would put the demo's job in their real queue), and never their data folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from i2v_daemon.settings import Settings

# Only what `i2v-daemon --help` and the quick commands load anyway: the parser imports this module.

EX_OK, EX_FAILED, EX_USAGE = 0, 1, 2

#: Where the tiny model goes under the state folder; the version names the build, so a changed
#: builder gets a fresh folder instead of a stale one.
MODEL_FOLDER = "demo-model/tiny-i2vgen-xl-v1"
#: Marks a data folder as the demo's (the first line of its config file), so a second demo may reuse it.
MARKER = "# made by `i2v-daemon demo`"
#: Small enough for two CPU cores in seconds: 16 frames of 192x128 in 4 steps, two seconds at 8 fps.
PRESET = {"resolution": 128, "num_frames": 16, "steps": 4, "guidance_scale": 2.0, "fps": 8}
PROMPT = "the red ball rolls slowly across the sunset sky"
NAME = "demo"


def add_command(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", help="a first job without a GPU or a download: a tiny random model, one picture, one video (noise)",
        description="Build a tiny random model, drop a generated picture and a prompt into a fresh data folder, "
        "run the job as `run --once` would and print where the video is. No GPU, no download; the video is "
        "noise because the model's weights are random. Your config file, I2V_* variables and data folder "
        "are not used.",
    )
    demo.add_argument("--data-dir", metavar="DIR", help="the demo's data folder: new or empty, or an earlier "
                      "demo's (default: a new temporary folder)")
    demo.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                      help="how much the job's run says (default info)")
    demo.add_argument("--log-format", choices=["auto", "console", "json"], default="auto",
                      help="log lines for a person or JSON lines (default: auto, console on a terminal)")


def run(args: argparse.Namespace) -> int:
    import time

    from i2v_daemon.locate import default_data_dir

    started = time.monotonic()
    # One thread, read when torch loads: the tiny model is no faster on more, and threads that wait for each
    # other make it many times slower whenever anything else is busy on the same cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    state = default_data_dir().expanduser().absolute()
    data = _data_folder(args.data_dir, state)
    if data is None:
        return EX_USAGE
    print(f"i2v-daemon demo: data folder {data}", flush=True)
    from i2v_daemon import logs

    logs.configure(args.log_level, args.log_format)  # the build's library warnings go through it too
    model_dir, built = _tiny_model(state, data)
    print(f"i2v-daemon demo: tiny random model {model_dir} ({'built now' if built else 'built before, reused'})",
          flush=True)

    config = _write_config(data, model_dir)
    settings = _settings(config)
    _drop_picture(Path(settings.inbox_dir))
    print("i2v-daemon demo: dropped inbox/demo.png and inbox/demo.json; running the job (as `run --once`)\n",
          flush=True)

    from i2v_daemon.daemon import Daemon

    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    code = daemon.run_once()
    try:
        job = max(daemon.store.list_jobs(1000), key=lambda j: j.id, default=None)
    finally:
        daemon.store.close()
    return _report(job, code, settings, config, time.monotonic() - started)


def _data_folder(flag: str | None, state: Path) -> Path | None:
    """The demo's data folder: a new temporary one, or DIR when it is empty, new, or an earlier demo's."""
    import tempfile

    if flag is None:
        return Path(tempfile.mkdtemp(prefix="i2v-daemon-demo-")).absolute()
    data = Path(flag).expanduser().absolute()
    if data.resolve() == state.resolve():  # through links too
        print(f"i2v-daemon demo: {data} is the daemon's own data folder; the demo uses a folder of its own "
              "(leave out --data-dir for a new temporary one)", file=sys.stderr)
        return None
    if data.exists() and not data.is_dir():
        print(f"i2v-daemon demo: {data} is not a folder", file=sys.stderr)
        return None
    if data.is_dir() and any(data.iterdir()) and not _is_demo_folder(data):
        print(f"i2v-daemon demo: {data} is not empty and is not an earlier demo's folder; give a new or empty "
              "folder (or leave out --data-dir for a new temporary one)", file=sys.stderr)
        return None
    data.mkdir(parents=True, exist_ok=True)
    return data


def _is_demo_folder(data: Path) -> bool:
    try:
        with (data / "config.toml").open(encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == MARKER
    except (OSError, UnicodeDecodeError):
        return False


def _tiny_model(state: Path, data: Path) -> tuple[Path, bool]:
    """The tiny model's folder under the state folder (or the data folder, if that one is not writable)."""
    try:
        return _build_once(state / MODEL_FOLDER)
    except OSError as err:
        print(f"i2v-daemon demo: cannot write the tiny model under {state} ({err.strerror or err}); "
              "building it into the demo's data folder instead", file=sys.stderr)
        return _build_once(data / "model")


def _build_once(target: Path) -> tuple[Path, bool]:
    """Build into a temporary sibling and rename it into place, so a broken build is never reused."""
    import shutil
    import tempfile

    if (target / "model_index.json").is_file():
        return target, False
    from i2v_daemon.models.testing.tiny import build_tiny_i2vgen_xl

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_i2vgen_xl(scratch, seed=0)
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not another demo's build that got there first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target, True


def _write_config(data: Path, model_dir: Path) -> Path:
    """A config file the user can read and run again (`run --once --config` it, with a new picture)."""
    import json

    values: dict[str, Any] = {
        "data_dir": str(data),
        "model": str(model_dir),
        "device": "cpu",
        "dtype": "float32",
        "accelerate": "off",
        "default_preset": "demo",
        "stable_seconds": 0.5,
        "sidecar_wait_seconds": 1,
        "max_attempts": 1,
    }
    lines = [MARKER, "# The demo's settings; run it again with a new picture in inbox/:",
             f"#   i2v-daemon run --once --config {data / 'config.toml'}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    lines += ["", "[presets.demo]"] + [f"{key} = {json.dumps(value)}" for key, value in PRESET.items()]
    path = data / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _settings(config: Path) -> Any:
    """The demo's config file alone: no `I2V_*` variable reaches it (they would outrank the file)."""
    from i2v_daemon.settings import load_settings

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("I2V_") and not k.startswith("I2V_TEST_")}
    try:
        return load_settings(str(config))
    finally:
        os.environ.update(saved)


def _drop_picture(inbox: Path) -> None:
    """A generated picture (a sky gradient, a sun, a ball) and its sidecar, written then renamed, already stable."""
    import json
    import time

    from PIL import Image, ImageDraw

    width, height = 192, 128
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):  # dusk at the top, orange at the horizon
        t = y / (height - 1)
        draw.line([(0, y), (width, y)], fill=(int(40 + 215 * t), int(30 + 120 * t), int(110 - 70 * t)))
    draw.ellipse((120, 70, 170, 120), fill=(255, 210, 90))
    draw.ellipse((30, 40, 70, 80), fill=(200, 30, 40), outline=(255, 255, 255), width=2)
    inbox.mkdir(parents=True, exist_ok=True)
    sidecar = {"prompt": PROMPT, "seed": 0}
    made = []
    for name, write in ((f"{NAME}.json", lambda p: p.write_text(json.dumps(sidecar) + "\n", encoding="utf-8")),
                        (f"{NAME}.png", lambda p: img.save(p, "PNG"))):
        temporary = inbox / f".{name}"
        write(temporary)
        made.append(temporary.rename(inbox / name))
    old = time.time() - 60  # older than stable_seconds: the first intake pass takes them
    for path in made:
        os.utime(path, (old, old))


def _report(job: Any, code: int, settings: Settings, config: Path, seconds: float) -> int:
    if job is not None and job.status == "succeeded" and job.output:
        folder = Path(job.final_dir or Path(job.output).parent)
        print(f"\nDone in {seconds:.0f} s.")
        print(f"  the video     {job.output}")
        print(f"  its manifest  {folder / 'job.json'}")
        print(f"  its log       {folder / 'job.log'}")
        print(
            "\nThe video is noise, by design: the tiny model's weights are random, so it draws nothing.\n"
            "Everything around it was real: intake, the queue, generation, encoding, the output folder.\n"
            "\nNext, real videos: a real model on a GPU (I2VGen-XL, the default, is about 10 GB to download;\n"
            "other families 10-60 GB): see Model families, docs/models.md, and Set up in the README.\n"
            f"This folder works as a daemon's too: drop a picture and prompt in {settings.inbox_dir}, then\n"
            f"  i2v-daemon run --once --config {config}"
        )
        return EX_OK
    print(f"\ni2v-daemon demo: the job did not succeed (run --once exit {code}).", file=sys.stderr)
    if job is not None:
        error = (job.error or {}).get("message")
        print(f"Job {job.id}: {job.status}" + (f": {error}" if error else ""), file=sys.stderr)
        if job.final_dir:
            print(f"Its folder, with the manifest and log: {job.final_dir}", file=sys.stderr)
    print(f"Failed jobs are in {settings.failed_dir}", file=sys.stderr)
    return EX_FAILED
