"""How fast intake takes a large drop: N image + sidecar pairs renamed into the inbox of a running, paused
daemon, timed until every one is queued, beside a bare watchdog observer that only counts the same renames.

    python bench/bench_intake.py [--pairs 2000]      # prints JSON

The files are written (and aged past `stable_seconds`) in a folder beside the inbox first, so the
timed part is what a user's `mv` into the inbox costs the daemon: seeing, checking, staging,
syncing and queueing. The goal (issue 11): 2,000 pairs queued in 5 s or less on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_drop(folder: Path, pairs: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 80, 40)).save(folder / "template.png")
    data = (folder / "template.png").read_bytes()
    made = []
    for i in range(pairs):
        image, side = folder / f"img{i:05d}.png", folder / f"img{i:05d}.txt"
        image.write_bytes(data)
        side.write_text(f"picture {i} slowly turns")
        os.utime(image, (1, 1))
        os.utime(side, (1, 1))
        made += [image, side]
    (folder / "template.png").unlink()
    return made


def rename_all(files: list[Path], inbox: Path) -> float:
    t0 = time.perf_counter()
    for f in files:
        os.rename(f, inbox / f.name)
    return t0


def bare_observer(root: Path, pairs: int) -> float:
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    inbox = root / "bare-inbox"
    inbox.mkdir()
    files = make_drop(root / "bare-drop", pairs)
    seen = threading.Event()
    count = [0]

    class Count(FileSystemEventHandler):
        def on_moved(self, event: object) -> None:
            count[0] += 1
            if count[0] >= len(files):
                seen.set()

        def on_created(self, event: object) -> None:
            self.on_moved(event)

    observer = Observer()
    observer.schedule(Count(), str(inbox), recursive=False)
    observer.start()
    time.sleep(0.5)
    t0 = rename_all(files, inbox)
    seen.wait(120)
    elapsed = time.perf_counter() - t0
    observer.stop()
    observer.join()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2000)
    args = ap.parse_args()
    from i2v_daemon.models.testing.tiny import build_tiny_i2vgen_xl

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        model = build_tiny_i2vgen_xl(root / "model")
        data = root / "data"
        config = root / "config.toml"
        config.write_text(f'data_dir = "{data}"\nmodel = "{model}"\ndevice = "cpu"\nstable_seconds = 2\n'
                          'log_format = "json"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")} | {"OMP_NUM_THREADS": "1",
                                                                                      "HF_HUB_OFFLINE": "1"}
        cli = [sys.executable, "-m", "i2v_daemon.cli"]
        subprocess.run([*cli, "migrate", "--config", str(config)], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        subprocess.run([*cli, "pause", "--config", str(config)], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        files = make_drop(root / "drop", args.pairs)
        daemon = subprocess.Popen([*cli, "run", "--config", str(config)], env=env, cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def watch() -> None:
            for line in daemon.stderr:  # type: ignore[union-attr]
                if '"event": "ready"' in line:
                    ready.set()

        threading.Thread(target=watch, daemon=True).start()
        db = sqlite3.connect(data / "jobs.db")
        if not ready.wait(120):  # ready: the model is loaded and the inbox watched
            raise SystemExit("the daemon did not get ready")
        t0 = rename_all(files, data / "inbox")
        renamed = time.perf_counter() - t0
        queued = 0
        while time.perf_counter() - t0 < 120:
            queued = db.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if queued >= args.pairs:
                break
            time.sleep(0.02)
        daemon_s = time.perf_counter() - t0
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        db.close()
        bare_s = bare_observer(root, args.pairs)
    result = {
        "machine": f"{os.cpu_count()} cores", "pairs": args.pairs, "renames_s": round(renamed, 2),
        "daemon_all_queued_s": round(daemon_s, 2), "queued": queued, "bare_watchdog_sees_all_s": round(bare_s, 2),
        "goal_s": 5.0,
    }
    print(json.dumps(result, indent=2))
    return 0 if queued >= args.pairs else 1


if __name__ == "__main__":
    sys.exit(main())
