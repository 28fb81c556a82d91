"""Benchmark on a lent GPU, no downloads: the daemon's generate path beside plain diffusers.

Full-size I2VGen-XL architecture with random weights (same FLOPs and memory as the release):
  - seconds per step, seconds per video and peak VRAM for the three presets and 1024²×32, both
    through plain `I2VGenXLPipeline.__call__` and through the daemon's own `generate()`;
  - memory hygiene: VRAM after each of many jobs returns to the resident model's level;
  - a 24 GiB-capped run (`torch.cuda.set_per_process_memory_fraction`) where 1024²×32 must finish
    through the ladder, its first try chosen by the memory model.

    python bench/bench_gpu.py                      # on the GPU (writes $OUT/bench.json if OUT is set)
    python bench/bench_gpu.py --tiny --device cpu  # the same code on a tiny model, for CI

Seconds per step come from the difference of a long and a short run (as in shared/anchors), so
the fixed part (encoders, VAE decode) is reported apart.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from i2v_daemon.generate import generate
from i2v_daemon.jobs import Params
from i2v_daemon.memory import GIB, MemoryModel
from i2v_daemon.models.i2vgen_xl import I2VGenXLModel
from i2v_daemon.settings import BUILTIN_PRESETS

SIZES = {name: (p.resolution, p.num_frames, p.steps) for name, p in BUILTIN_PRESETS.items()}
SIZES["1024x32"] = (1024, 32, 100)
TINY_SIZES = {"fast": (64, 4, 30), "standard": (64, 8, 50), "high": (96, 8, 80), "1024x32": (128, 8, 100)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build(args: argparse.Namespace) -> I2VGenXLModel:
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        from i2v_daemon.models.tiny import build_tiny_i2vgen_xl

        folder = build_tiny_i2vgen_xl(Path(tempfile.mkdtemp()) / "tiny")
        return I2VGenXLModel(str(folder), device=args.device, dtype=args.dtype)
    from i2v_daemon.models.tiny import build_full_size_i2vgen_xl

    pipe = build_full_size_i2vgen_xl(args.device, dtype)
    return I2VGenXLModel("random-full-size-i2vgen-xl", device=args.device, dtype=args.dtype, pipeline=pipe)


def plain_run(model: I2VGenXLModel, image: Image.Image, side: int, frames: int, steps: int) -> float:
    """Plain diffusers, as a user of the pipeline would call it (square, clip_skip off: v5 breaks it)."""
    sync(model.device)
    t = time.perf_counter()
    out = model.pipeline(
        prompt="a cat slowly turns its head", image=image, height=side, width=side, num_frames=frames,
        num_inference_steps=steps, guidance_scale=9.0, clip_skip=None, output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    )
    sync(model.device)
    assert np.isfinite(out.frames).all()
    return time.perf_counter() - t


def daemon_run(model: I2VGenXLModel, image: Image.Image, side: int, frames: int, steps: int,
               memory: MemoryModel | None = None, ladder: list[int] | None = None) -> tuple[float, list[dict]]:
    tries: list[dict] = []
    params = Params(preset="bench", resolution=side, num_frames=frames, steps=steps, guidance_scale=9.0,
                    fps=8, width=side, height=side, seed=0)
    sync(model.device)
    t = time.perf_counter()
    generate(model, image, "a cat slowly turns its head", "", params, ladder=ladder or [side],
             on_step=lambda k, n: None, on_try=tries.append, memory=memory)
    sync(model.device)
    return time.perf_counter() - t, tries


def per_step(run: Any, short: int, long: int) -> tuple[float, float]:
    a, b = run(short), run(long)
    step = (b - a) / (long - short)
    return step, a - short * step


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model: checks the script, not the GPU")
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--hygiene-jobs", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", "420")))
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        args.dtype = "float32" if args.device == "cpu" else args.dtype
    t0 = time.perf_counter()
    sizes = TINY_SIZES if args.tiny else SIZES
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    print(f"torch {torch.__version__} on {gpu}", flush=True)
    model = build(args)
    resident = allocated(args.device)
    print(f"built in {time.perf_counter() - t0:.1f} s; resident {resident / GIB:.2f} GiB", flush=True)
    image = Image.fromarray((np.random.default_rng(0).random((720, 1280, 3)) * 255).astype("uint8"))
    rows: list[dict[str, Any]] = []

    for name, (side, frames, steps) in sizes.items():
        if time.perf_counter() - t0 > args.budget_s:
            print(f"time budget reached; skipping {name}", flush=True)
            continue
        row: dict[str, Any] = {"case": name, "side": side, "frames": frames, "steps": steps}
        for path, fn in (("daemon", lambda n, s=side, f=frames: daemon_run(model, image, s, f, n)[0]),
                         ("plain", lambda n, s=side, f=frames: plain_run(model, image, s, f, n))):
            if path == "plain" and args.skip_plain:
                continue
            try:
                fn(1)  # warm-up
                reset_peak(args.device)
                step, fixed = per_step(fn, 2, 6)
                row[path] = {
                    "s_per_step": round(step, 4), "fixed_s": round(fixed, 3),
                    "s_per_video": round(fixed + steps * step, 2), "peak_gib": round(peak(args.device) / GIB, 2),
                }
            except torch.cuda.OutOfMemoryError:
                row[path] = {"error": "out of memory"}
                reset_peak(args.device)
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Memory hygiene: many jobs, VRAM back to the resident level after each.
    side, frames, _ = sizes["fast"]
    leaks = []
    for _ in range(args.hygiene_jobs):
        daemon_run(model, image, side, frames, 2)
        gc.collect()
        leaks.append(allocated(args.device) - resident)
    hygiene = {"jobs": args.hygiene_jobs, "max_growth_mib": round(max(leaks) / 2**20, 1) if leaks else 0.0}
    print(json.dumps({"hygiene": hygiene}), flush=True)
    assert max(leaks, default=0) < 64 * 2**20, f"VRAM grew by {max(leaks) / 2**20:.0f} MiB over {len(leaks)} jobs"

    # The capped run: a 24 GiB card, 1024²×32 must finish through the ladder, starting where it fits.
    capped: dict[str, Any] = {}
    if args.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        cap = int(args.cap_gib * GIB)
        torch.cuda.set_per_process_memory_fraction(cap / total)
        memory = MemoryModel(budget_bytes=cap, resident_bytes=resident)
        side, frames, _ = sizes["1024x32"]
        reset_peak(args.device)
        seconds, tries = daemon_run(model, image, side, frames, 2, memory=memory, ladder=[1024, 896, 768, 640, 512])
        capped = {"cap_gib": args.cap_gib, "seconds_2_steps": round(seconds, 1), "tries": tries,
                  "first_try": f"{tries[0]['width']}x{tries[0]['height']} {tries[0]['savers']}",
                  "finished": tries[-1]["outcome"] == "succeeded"}
        print(json.dumps({"capped": capped}), flush=True)
        assert capped["finished"], "1024x32 did not finish on the capped card"

    result = {"gpu": gpu, "dtype": args.dtype, "tiny": args.tiny, "resident_gib": round(resident / GIB, 2),
              "rows": rows, "hygiene": hygiene, "capped": capped, "total_s": round(time.perf_counter() - t0, 1)}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench.json").write_text(json.dumps(result, indent=2))
    print(f"total {result['total_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
