"""The worker's own cost per job: a tiny job through the daemon's whole worker (claim, progress writes, generate,
poster, encode, frame check, publish, status) beside the same job through plain diffusers and an mp4 write.

    python bench/bench_worker.py [--jobs 8] [--steps 30]      # prints JSON

Both run in this one process on the same loaded tiny I2VGen-XL (64x64, 8 frames), alternately, and
the median seconds per job are compared. The goal (issue 11): the daemon within 1.1x plain diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import imageio_ffmpeg
    import numpy as np
    import torch
    from PIL import Image

    from i2v_daemon.intake.staging import Intake
    from i2v_daemon.models.holder import ModelHolder
    from i2v_daemon.models.testing.tiny import build_tiny_i2vgen_xl
    from i2v_daemon.queue.store import Store
    from i2v_daemon.settings import load_settings
    from i2v_daemon.views.jobs import job_summary
    from i2v_daemon.work.closer import Closer
    from i2v_daemon.work.finish import Finisher
    from i2v_daemon.work.worker import Worker, model_name

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_tiny_i2vgen_xl(root / "model")
        config = root / "config.toml"
        config.write_text(
            f'data_dir = "{root / "data"}"\nmodel = "{model_dir}"\ndevice = "cpu"\ndefault_preset = "bench"\n'
            f'log_level = "error"\n[presets.bench]\nresolution = 64\nnum_frames = 8\nsteps = {args.steps}\n'
            "guidance_scale = 9.0\nfps = 8\n"
        )
        from i2v_daemon import logs

        settings = load_settings(str(config))
        logs.configure("error", "json")
        for folder in settings.folders().values():
            folder.mkdir(parents=True, exist_ok=True)
        store = Store(settings.database_url, describe=job_summary)  # type: ignore[arg-type]
        store.create_schema()
        holder = ModelHolder.from_settings(settings)
        model = holder.get()
        finisher = Finisher(settings, store, model_info=lambda job: holder.info(model_name(job)))
        worker = Worker(settings, store, Closer(settings, store, finisher), worker_id="bench/1/cpu", models=holder)
        intake = Intake(settings, store, owner="bench/1/intake", host="bench", finish_rejected=lambda j, o: None)
        image = Image.new("RGB", (96, 64), (200, 80, 40))
        daemon_s, plain_s = [], []
        for i in range(args.jobs + 1):  # the first round warms both paths up
            image.save(settings.inbox_dir / f"job{i}.png")  # type: ignore[operator]
            (settings.inbox_dir / f"job{i}.txt").write_text("a cat turns its head")  # type: ignore[operator]
            result = intake.scanner.scan(once=True, wall_now=time.time() + 3600)
            intake.take(result.ready)
            t0 = time.perf_counter()
            assert worker.run_once()
            d = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.pipeline(
                prompt="a cat turns its head", image=image.resize((96, 64)), height=64, width=96, num_frames=8,
                num_inference_steps=args.steps, guidance_scale=9.0, clip_skip=None, output_type="np",
                generator=torch.Generator("cpu").manual_seed(i), decode_chunk_size=1,
            )
            frames = (np.clip(out.frames[0], 0, 1) * 255).round().astype(np.uint8)
            writer = imageio_ffmpeg.write_frames(str(root / f"plain{i}.mp4"), (96, 64), fps=8, quality=None,
                                                 output_params=["-crf", "18"])
            writer.send(None)
            for f in frames:
                writer.send(np.ascontiguousarray(f))
            writer.close()
            p = time.perf_counter() - t0
            if i:
                daemon_s.append(d)
                plain_s.append(p)
        counts = store.counts()
        store.close()
    result = {
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread", "jobs": args.jobs,
        "size": "96x64x8", "steps": args.steps, "daemon_s_per_job": round(statistics.median(daemon_s), 3),
        "plain_s_per_job": round(statistics.median(plain_s), 3),
        "ratio": round(statistics.median(daemon_s) / statistics.median(plain_s), 3), "succeeded": counts["succeeded"],
        "goal_ratio": 1.1,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
