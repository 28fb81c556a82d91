"""What interpolation to the delivered rate costs: motion, blend and rife at 512x512x16, 8 -> 24 fps.

RIFE runs the full-size IFNet (v4.25 layout, 5.7 M parameters) with random weights: the same
arithmetic as the released weights, not the same pictures. Every run goes through
`interpolate_to_mp4`, so the seconds include the H.264 encode of the 46 delivered frames; the
"encode only" row is that encode alone, for reference. RIFE on the CPU is measured with torch's
default threads and with one (`--threads`).

    python bench/bench_interpolation.py                         # CPU: prints JSON, writes bench/INTERPOLATION.md
    python bench/bench_interpolation.py --device cuda --out ""  # a GPU: RIFE in float16, peak VRAM too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from i2v_daemon.work import video
from i2v_daemon.work.interpolate import interpolate_to_mp4

ROOT = Path(__file__).resolve().parents[1]


def moving_frames(count: int, size: int, step: int = 6) -> np.ndarray:
    """A smooth textured scene panning `step` pixels a frame, with a bright disc crossing it faster."""
    rng = np.random.default_rng(0)
    big = size + count * step * 2
    y, x = np.mgrid[0:big, 0:big].astype(np.float32)
    scene = np.stack([
        128 + 60 * np.sin(x / 23.0 + c) * np.cos(y / 31.0 - c) + rng.normal(0, 12, (big, big)) for c in range(3)
    ], axis=-1)
    frames = np.empty((count, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        frame = scene[i * step : i * step + size, i * step : i * step + size].copy()
        disc = (yy - size * 0.5) ** 2 + (xx - size * 0.2 - i * 3 * step) ** 2 < (size * 0.08) ** 2
        frame[disc] = (250, 230, 60)
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU model and cores, memory, the GPU if any, library versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    import torch

    ffmpeg = subprocess.run([video._ffmpeg(), "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_default_threads": torch.get_num_threads(),
        "memory_gib": round(mem / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "ffmpeg": " ".join(ffmpeg.split()[:3]), "python": platform.python_version(),
        "load_average": round(os.getloadavg()[0], 2),  # other work on a shared machine slows every row
    }


def measure(
    mode: str, frames: np.ndarray, args: argparse.Namespace, folder: Path, weights: Path | None, threads: int
) -> dict:
    """Median seconds over the repeats, frames out, peak VRAM; `threads`: torch's CPU threads (0: its default)."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        row = _measure(mode, frames, args, folder, weights)
    finally:
        torch.set_num_threads(default)
    if mode == "rife" and args.device == "cpu":
        row["mode"] = f"rife ({threads or default} torch thread{'s' if (threads or default) > 1 else ''})"
    return row


def _measure(mode: str, frames: np.ndarray, args: argparse.Namespace, folder: Path, weights: Path | None) -> dict:
    if mode == "rife":  # torch's first calls pick kernels and allocate: the daemon pays that once, not per job
        interpolate_to_mp4(frames[:2], fps=args.fps, output_fps=args.output_fps, mode=mode,
                           path=folder / "warm.mp4", rife_model=weights, device=args.device)
    runs, out_frames, peaks = [], set(), set()
    for _ in range(args.repeats):
        target = folder / f"{mode}.mp4"
        started = time.perf_counter()
        if mode == "encode only":
            # What a perfect interpolator would deliver: as many frames, a third of the motion each.
            k = args.output_fps // args.fps
            delivered = moving_frames((len(frames) - 1) * k + 1, args.size, step=max(1, 6 // k))
            started = time.perf_counter()
            video.write_mp4(delivered, target, args.output_fps)
            made, peak = len(delivered), None
        else:
            result = interpolate_to_mp4(frames, fps=args.fps, output_fps=args.output_fps, mode=mode, path=target,
                                        rife_model=weights, device=args.device)
            made, peak = result.output_frames, result.peak_vram_bytes
        seconds = time.perf_counter() - started
        runs.append(seconds)
        out_frames.add(made)
        peaks.add(peak)
        print(f"{mode}: run {len(runs)}: {seconds:.2f} s, {made} frames", file=sys.stderr)
    return {"mode": mode, "median_s": round(statistics.median(runs), 3), "runs_s": [round(s, 3) for s in runs],
            "frames_out": sorted(out_frames), "peak_vram_bytes": max((p for p in peaks if p), default=None)}


def _row(r: dict[str, Any]) -> str:
    runs = ", ".join(f"{s:.2f}" for s in r["runs_s"])
    vram = "—" if r["peak_vram_bytes"] is None else f"{r['peak_vram_bytes'] / 2**30:.2f} GiB"
    return f"| {r['mode']} | {r['median_s']:.2f} | {runs} | {', '.join(map(str, r['frames_out']))} | {vram} |"


def markdown(result: dict[str, Any]) -> str:
    """bench/INTERPOLATION.md: how to run it, the machine, the table."""
    m, a = result["machine"], result["args"]
    rows = "\n".join(_row(r) for r in result["rows"])
    k = a["output_fps"] // a["fps"]
    return f"""# Interpolation benchmark

How to run (a few minutes on two CPU cores; nothing is downloaded, RIFE gets random weights):

```sh
.venv/bin/python bench/bench_interpolation.py                          # writes this file, prints JSON
.venv/bin/python bench/bench_interpolation.py --device cuda --out ""    # on a GPU: RIFE in float16 + peak VRAM
```

Case: {a['frames']} generated frames of {a['size']}x{a['size']} at {a['fps']} fps delivered at
{a['output_fps']} fps (k = {k}: {(a['frames'] - 1) * k + 1} frames),
through `interpolate_to_mp4` (H.264 CRF 18 encode included), {a['repeats']} runs each, median.
RIFE: the full-size IFNet (v4.25 layout, 5.7 M parameters) with random weights on `{a['device']}`,
after a warm-up on one pair of frames, once with torch's default threads and once with one (on a
busy machine, torch's threads waiting for each other can cost more than the second core gives).
"encode only" encodes as many distinct frames (the same scene moving a third as far each frame)
with no interpolation: the rest of each row is interpolating.

Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB,
GPU: {m['gpu'] or 'none'}; torch {m['torch']}, {m['ffmpeg']}, Python {m['python']}.
Measured {result['date']}, 1-minute load average {m['load_average_before']} before and {m['load_average']} after
(the machine is shared: a load above the core count means other work slowed these figures).

| mode | median s | runs (s) | frames out | peak VRAM |
|---|---|---|---|---|
{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--output-fps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default="0,1", help="torch threads for rife, a row each (0: torch's default)")
    parser.add_argument("--modes", default="encode only,blend,motion,rife")
    parser.add_argument("--out", default=str(ROOT / "bench" / "INTERPOLATION.md"), help='"" to write nothing')
    args = parser.parse_args()
    frames = moving_frames(args.frames, args.size)
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-interp-") as tmp:
        folder = Path(tmp)
        weights = None
        modes = [m.strip() for m in args.modes.split(",")]
        if "rife" in modes:
            from i2v_daemon.models.rife import save_random_rife

            weights = save_random_rife(folder / "ifnet.safetensors")
        rows = []
        for mode in modes:
            for threads in [int(t) for t in args.threads.split(",")] if mode == "rife" else [0]:
                rows.append(measure(mode, frames, args, folder, weights, threads))
    result = {"machine": {**machine(), "load_average_before": load_before}, "args": vars(args), "rows": rows,
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(markdown(result))


if __name__ == "__main__":
    main()
