"""Benchmark on a lent GPU, no downloads: plain diffusers, the daemon's eager path and its fast path, side by side.

Full-size I2VGen-XL architecture with random weights (same FLOPs and memory as the release), fp16.
For each case (the three presets, and 1024²×32 under a 24 GiB cap), in this one process:
  - plain diffusers: `I2VGenXLPipeline.__call__` with the anchor script's settings (SDPA,
    decode_chunk_size=1, guidance batched) and the daemon's own inputs (its prompt embeddings, its
    fitted image, its seeding), so the frames are comparable;
  - the daemon's `generate()` on the eager path (`accelerate = "off"`);
  - the daemon's `generate()` on the fast path (`accelerate = "on"`: compiled UNet, fused QKV,
    channels_last, cuDNN autotuning, batched VAE decode, no per-step device sync).
Each is a real job of the case's full step count, repeated (`--repeats`): seconds end to end,
seconds per step from CUDA events recorded at each step (no sync inside the job), the tail
(last step to frames on the host), peak VRAM, and for the fast path its compile seconds. Frames
are compared with plain diffusers' (max and mean absolute difference, PSNR). Then a second
process on the same compile cache measures a warm restart: seconds from its start to the first
step. Memory hygiene over repeated jobs, and the capped 1024²×32 run through the OOM ladder,
close the run.

A time budget (`--budget-s`, and `--deadline-s`: when the caller's time limit will stop this
process) decides what starts: each path is estimated from the anchors' seconds per step, plus one
cold compile for each new shape the fast path has not compiled yet (each (size, frames) pair on
torch < 2.13, where the frame count is not symbolic in the graph on a GPU; each size from 2.13 on).
What would not fit is skipped and said so; when the fast path's compile would not fit after the
eager path, the eager path is skipped first. A failure, a timeout of the warm-restart child, or
the caller's SIGINT is recorded in bench.json, which is written after every path.

    python bench/bench_gpu.py --cases standard,fast            # on the GPU; writes $OUT/bench.json
    python bench/bench_gpu.py --tiny --device cpu               # the same code on a tiny model (CI)
    python bench/bench_gpu.py --render bench.json               # bench.json -> bench/RESULTS.md's table

Imports torch, diffusers, transformers and i2v_daemon's model code only (no pydantic, no
settings): the GPU machine's image has no pydantic, and diffusers travels as a wheel.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

T0 = time.perf_counter()  # the warm child's "time to first step" counts from here
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
PROMPT, NEGATIVE = "a cat slowly turns its head", "blurry"


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    frames: int
    steps: int
    guidance: float
    capped: bool = False  # run under --cap-gib, through the OOM ladder, for a couple of steps only


#: The presets (INTERFACE.md §2) as the anchors measured them: square frames.
CASES = {
    "fast": Case("fast", 512, 512, 8, 30, 9.0),
    "standard": Case("standard", 512, 512, 16, 50, 9.0),
    "high": Case("high", 768, 768, 24, 80, 10.0),
    "1024x32": Case("1024x32", 1024, 1024, 32, 100, 9.0, capped=True),
}
#: The same code on a tiny model: one size (the graph tests/test_accelerate.py compiles), few steps.
TINY_CASES = {
    "fast": Case("fast", 112, 64, 4, 6, 9.0),
    "standard": Case("standard", 112, 64, 6, 8, 9.0),
    "high": Case("high", 112, 64, 6, 10, 10.0),
    "1024x32": Case("1024x32", 112, 64, 4, 6, 9.0, capped=True),
}
#: Eager seconds per step and fixed seconds on an H200 (shared/anchors), to skip what would not fit.
ANCHOR_S = {"fast": (0.143, 0.3), "standard": (0.205, 0.64), "high": (0.695, 1.47), "1024x32": (1.646, 3.51)}
#: A cold compile of the full-size UNet for one shape: the anchors' 180 s at 512²×16 (H200, torch 2.11), for the same.
COLD_COMPILE_S = 180.0
#: The warm-restart child: start, build one model, load the compile cache, a warm compile and one job.
WARM_CHILD_S = 90.0
#: What a run needs after its last piece of work: the table, bench.json, the exit.
RESERVE_S = 10.0


@dataclass(frozen=True)
class BenchParams:
    """The attributes generate() reads from a job's Params (pydantic's Params is not on the GPU image)."""

    resolution: int
    num_frames: int
    steps: int
    guidance_scale: float
    fps: int = 8
    width: int | None = None
    height: int | None = None
    seed: int | None = 0
    model: str | None = None
    motion: float | None = None
    lora: str | None = None
    lora_scale: float | None = None
    scheduler: str | None = None
    cache: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model: checks the script, not the GPU")
    ap.add_argument("--cases", default="fast,standard,high,1024x32", help="comma-separated, run in this order")
    ap.add_argument("--repeats", type=int, default=2, help="timed jobs per path and case")
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--hygiene-jobs", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", "480")),
                    help="stop starting new work past this many seconds (what would not fit is skipped, and said so)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="seconds after this process starts at which the caller stops it (SIGINT): nothing is "
                         "started that would not end before it, and the warm-restart child's timeout ends before it")
    ap.add_argument("--cache-dir", type=Path, default=None, help="compile cache root (default: a fresh temp folder)")
    ap.add_argument("--cuda-graphs", action="store_true", help="the fast path with CUDA graphs (off in the daemon)")
    ap.add_argument("--no-warm-child", action="store_true", help="skip the second-process warm restart")
    ap.add_argument("--warm-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--render", type=Path, default=None, help="write RESULTS.md's table from this JSON, exit")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md", help="the file --render writes")
    args = ap.parse_args(argv)
    if args.tiny and args.device == "cpu":
        args.dtype = "float32"
    return args


# ---- set-up (torch imported only after the compile cache's variables are set) ----------------------


def activate_cache(args: argparse.Namespace) -> Any:
    from i2v_daemon.models.compile_cache import CompileCache

    root = args.cache_dir or Path(tempfile.mkdtemp(prefix="i2v-bench-compile-"))
    args.cache_dir = root
    cache = CompileCache(root)
    cache.activate()
    return cache


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def allocated(device: str) -> int:
    import torch

    return int(torch.cuda.memory_allocated()) if device.startswith("cuda") else 0


def build(args: argparse.Namespace, tiny_dir: Path | None) -> Any:
    """One I2VGen-XL model behind the daemon's adapter (random weights, seeded: every build is the same)."""
    import torch

    from i2v_daemon.models.i2vgen_xl import I2VGenXLModel

    if args.tiny:
        assert tiny_dir is not None
        return I2VGenXLModel(str(tiny_dir), device=args.device, dtype=args.dtype)
    from i2v_daemon.models.testing.tiny import build_full_size_i2vgen_xl

    pipe = build_full_size_i2vgen_xl(args.device, getattr(torch, args.dtype))
    return I2VGenXLModel("random-full-size-i2vgen-xl", device=args.device, dtype=args.dtype, pipeline=pipe)


def fast_flags(on: bool, device: str) -> None:
    """The process-wide flags the fast path sets, off again for plain diffusers' runs (the anchors' settings).

    Only where the daemon sets them (models/accelerate.py: on CUDA): inductor keys its compile cache on
    the tf32 flag, so on the CPU a flag the daemon never sets would miss the graph the tests compiled.
    """
    import torch

    if not device.startswith("cuda"):
        return
    torch.backends.cudnn.benchmark = on
    torch.backends.cuda.matmul.allow_tf32 = on


class StepClock:
    """Times steps without syncing: a CUDA event per step on a GPU (wall time on the CPU, which is synchronous)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.marks: list[Any] = []
        self.first_step_wall: float | None = None

    def mark(self) -> None:
        if self.first_step_wall is None:
            self.first_step_wall = time.perf_counter()
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def end(self) -> None:
        self.mark()

    def seconds(self) -> list[float]:
        """Intervals between consecutive marks (call after a sync)."""
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def image_for() -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((720, 1280, 3)) * 255).astype("uint8"))


def plain_job(model: Any, image: Any, case: Case, steps: int, seed: int = 0) -> tuple[Any, StepClock, float]:
    """Plain diffusers: the pipeline's own __call__, fed exactly what the daemon's eager path feeds it."""
    import torch

    from i2v_daemon.models.runtime import cpu_generator, fit_image, seeded, to_uint8

    pipe = model.pipeline
    clock = StepClock(model.device)
    hook = pipe.unet.register_forward_hook(lambda *_: clock.mark())
    fitted = fit_image(image, case.width, case.height)
    sync(model.device)
    t = time.perf_counter()
    try:
        with torch.inference_mode(), seeded(seed, model.device):
            out = pipe(
                image=fitted, prompt_embeds=model.encode_prompt(PROMPT),
                negative_prompt_embeds=model.encode_prompt(NEGATIVE), clip_skip=None, height=case.height,
                width=case.width, num_frames=case.frames, num_inference_steps=steps, guidance_scale=case.guidance,
                target_fps=8, decode_chunk_size=1, generator=cpu_generator(seed), output_type="np",
            )
        frames = to_uint8(out.frames[0])
        clock.end()
        sync(model.device)
    finally:
        hook.remove()
    return frames, clock, time.perf_counter() - t


def daemon_job(model: Any, image: Any, case: Case, steps: int, seed: int = 0, memory: Any = None,
               ladder: list[int] | None = None) -> tuple[Any, StepClock, float, list[dict[str, Any]]]:
    from i2v_daemon.work.generate import generate

    clock = StepClock(model.device)
    tries: list[dict[str, Any]] = []
    params = BenchParams(resolution=min(case.width, case.height), num_frames=case.frames, steps=steps,
                         guidance_scale=case.guidance, width=case.width, height=case.height, seed=seed)
    sync(model.device)
    t = time.perf_counter()
    outcome = generate(model, image, PROMPT, NEGATIVE, cast(Any, params),
                       ladder=ladder or [min(case.width, case.height)], on_step=lambda _s, _n: clock.mark(),
                       on_try=tries.append, memory=memory)
    clock.end()
    sync(model.device)
    return outcome.frames, clock, time.perf_counter() - t, tries


def inductor_counters() -> dict[str, int]:
    """Inductor's and AOTAutograd's cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    names = ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss")
    merged = {**counters["inductor"], **counters["aot_autograd"]}
    return {k: int(merged.get(k, 0)) for k in names}


def compare(frames: Any, reference: Any) -> dict[str, Any]:
    """How far `frames` are from `reference` (uint8 videos): max and mean |Δ| in 0..1, PSNR, share of pixels off."""
    import numpy as np

    if frames.shape != reference.shape:
        return {"error": f"shapes differ: {frames.shape} vs {reference.shape}"}
    diff = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
    mse = float(np.mean((diff / 255.0) ** 2))
    return {
        "max_abs": round(float(diff.max()) / 255, 4), "mean_abs": round(float(diff.mean()) / 255, 6),
        "psnr_db": round(10 * math.log10(1 / mse), 1) if mse > 0 else None,
        "pixels_off": round(float((diff > 0).mean()), 4),
    }


def timed(run: Any, repeats: int, device: str, resident: int = 0) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """`repeats` jobs of `run`; the median and every figure, the last frames, the last job's tries."""
    import torch

    e2e, per_step, tails, peaks = [], [], [], []
    frames: Any = None
    tries: list[dict[str, Any]] = []
    before = allocated(device)
    for _ in range(repeats):
        if device.startswith("cuda"):
            gc.collect()
            torch.cuda.reset_peak_memory_stats()
        result = run()
        frames, clock, seconds = result[0], result[1], result[2]
        tries = result[3] if len(result) > 3 else []
        e2e.append(seconds)
        steps = clock.seconds()
        per_step.append(statistics.median(steps[:-1]) if len(steps) > 1 else float("nan"))
        tails.append(steps[-1] if steps else float("nan"))
        if device.startswith("cuda"):
            peaks.append(torch.cuda.max_memory_allocated() - before)
    out = {
        "e2e_s": round(statistics.median(e2e), 3), "e2e_all_s": [round(x, 3) for x in e2e],
        "s_per_step": round(statistics.median(per_step), 4), "tail_s": round(statistics.median(tails), 3),
    }
    if peaks:  # the job's own peak over what was resident, plus one model's weights: the anchors' measure
        out["peak_gib"] = round((max(peaks) + resident) / GIB, 2)
    return out, frames, tries


# ---- the run ---------------------------------------------------------------------------------------


class Budget:
    """Seconds left for new work: the budget, and no later than the deadline less a reserve for the results."""

    def __init__(self, seconds: float, deadline: float | None = None) -> None:
        self.seconds = seconds
        self.deadline = deadline

    def until_deadline(self) -> float:
        return math.inf if self.deadline is None else self.deadline - (time.perf_counter() - T0)

    def left(self) -> float:
        return min(self.seconds - (time.perf_counter() - T0), self.until_deadline() - RESERVE_S)

    def allows(self, estimate: float) -> bool:
        return self.left() >= estimate


def estimate(case: Case, variants: int, repeats: int, tiny: bool, compile_s: float = 0.0) -> float:
    """Seconds for `variants` paths of `case` (a warm-up job and `repeats` timed ones each), by the anchors."""
    if tiny:
        return 0.0
    per, fixed = ANCHOR_S[case.name]
    return variants * (repeats + 0.2) * (fixed + case.steps * per) + compile_s


def frames_symbolic() -> bool:
    """Whether one compiled graph serves every frame count at a size: from torch 2.13 on. Before it, each new
    (size, frames) pair is budgeted as a cold compile (the GPU's convolution guards may split frame counts)."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 13)


def compile_key(case: Case) -> tuple[int, ...]:
    """The shape a cold compile is budgeted for: (width, height), and the frames on torch < 2.13."""
    if frames_symbolic():
        return (case.width, case.height)
    return (case.width, case.height, case.frames)


def failure(err: BaseException) -> dict[str, Any]:
    """An exception as bench.json records it: the run goes on with the next piece of work."""
    import traceback

    return {"error": f"{type(err).__name__}: {err}"[:500],
            "traceback": "".join(traceback.format_exception(err))[-2000:]}


def run_case(case: Case, args: argparse.Namespace, base: Any, fast: Any, image: Any, budget: Budget,
             compiled: set[tuple[int, ...]], row: dict[str, Any], save: Any = lambda: None) -> dict[str, Any]:
    """Plain, eager and fast paths of `case` into `row` (saved after each path: a run stopped keeps them)."""
    from i2v_daemon.models.gpu import memory_model_for

    row.update({"case": case.name, "width": case.width, "height": case.height, "frames": case.frames,
                "steps": case.steps})
    device = args.device
    key = compile_key(case)
    cold = 0.0 if key in compiled else COLD_COMPILE_S
    one = estimate(case, 1, args.repeats, args.tiny)
    if not budget.allows(one):
        row["skipped"] = f"time budget: {budget.left():.0f} s left, about {one:.0f} s needed for plain diffusers"
        return row
    fast_flags(False, args.device)
    plain_job(base, image, case, 1)  # warm-up: cuDNN handles, lazy allocations
    row["plain"], plain_frames, _ = timed(lambda: plain_job(base, image, case, case.steps), args.repeats, device,
                                         base.resident)
    save()
    if budget.allows(2 * one + cold) or not budget.allows(one + cold):
        if budget.allows(one):
            daemon_job(base, image, case, 1)
            row["eager"], eager_frames, tries = timed(lambda: daemon_job(base, image, case, case.steps),
                                                      args.repeats, device, base.resident)
            row["eager"]["vs_plain"] = compare(eager_frames, plain_frames)
            row["eager"]["accelerated"] = [t.get("accelerated") for t in tries]
        else:
            row["eager"] = {"skipped": f"time budget: {budget.left():.0f} s left, about {one:.0f} s needed"}
    else:  # the fast path (and its compile) fits only without the eager path: the fast path matters more here
        row["eager"] = {"skipped": f"time budget: {budget.left():.0f} s left, kept for the fast path "
                                   f"(about {one + cold:.0f} s with a {cold:.0f} s cold compile)"}
    save()
    if not budget.allows(one + cold):
        row["fast"] = {"skipped": f"time budget: {budget.left():.0f} s left, about {one + cold:.0f} s needed "
                                  f"({cold:.0f} s of it compiling {'x'.join(map(str, key))} cold)"}
        return row
    fast_flags(True, args.device)
    memory = memory_model_for(fast, None, 0.10)
    t = time.perf_counter()
    hits = inductor_counters()
    _, _, _, first = daemon_job(fast, image, case, 1, memory=memory)  # compiles this size's graph, if new
    compile_info = {"first_job_s": round(time.perf_counter() - t, 2),
                    "compile_s": first[-1].get("compile_seconds", 0.0), "compiled": first[-1].get("compiled", []),
                    "cache": {k: v - hits.get(k, 0) for k, v in inductor_counters().items() if v != hits.get(k, 0)}}
    compiled.add(key)
    row["fast"] = dict(compile_info)  # kept if the time limit stops the timed jobs
    save()
    row["fast"], fast_frames, tries = timed(
        lambda: daemon_job(fast, image, case, case.steps, memory=memory), args.repeats, device, fast.resident)
    row["fast"].update(compile_info)
    row["fast"]["vs_plain"] = compare(fast_frames, plain_frames)
    row["fast"]["accelerated"] = [t.get("accelerated") for t in tries]
    row["fast"]["decode_chunk"] = tries[-1].get("decode_chunk") if tries else None
    if tries and tries[-1].get("fell_back"):
        row["fast"]["fell_back"] = tries[-1]["fell_back"]
    broken = [why for d in fast.accelerator.denoisers.values() for why in d.broken.values()]
    if broken:  # a compile that failed: the fast path ran eagerly, and this says why
        row["fast"]["broken"] = broken
    row["fast"]["speedup_vs_plain"] = round(row["plain"]["e2e_s"] / row["fast"]["e2e_s"], 2)
    row["fast"]["graphs"] = fast.accelerator.graphs
    fast_flags(False, args.device)
    return row


def capped_case(case: Case, args: argparse.Namespace, base: Any, fast: Any, image: Any) -> dict[str, Any]:
    """Under a `--cap-gib` card: plain diffusers runs out of memory, the daemon's ladder finishes (2 steps each).

    Each runs with its model alone on the card, as in the daemon: plain on `base`, which is then
    closed, and the daemon's fast-path model, whose first rung the memory model judges."""
    import torch

    from i2v_daemon.models.memory import MemoryModel

    total = torch.cuda.get_device_properties(0).total_memory
    cap = int(args.cap_gib * GIB)
    out: dict[str, Any] = {"case": case.name, "cap_gib": args.cap_gib, "steps": 2}
    fast.park()  # weights to host memory: plain diffusers has the capped card to itself
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        fast_flags(False, args.device)
        try:
            plain_job(base, image, case, 2)
            out["plain"] = "finished"
        except torch.cuda.OutOfMemoryError:
            out["plain"] = "out of memory"
        base.close()
        gc.collect()
        torch.cuda.empty_cache()
        fast.unpark()
        fast_flags(True, args.device)
        memory = MemoryModel(budget_bytes=cap, resident_bytes=allocated(args.device))
        _, _, seconds, tries = daemon_job(fast, image, case, 2, memory=memory, ladder=[1024, 896, 768, 640, 512])
        out.update(seconds=round(seconds, 1), finished=tries[-1]["outcome"] == "succeeded",
                   tries=[{k: t.get(k) for k in ("width", "height", "savers", "accelerated", "outcome",
                                                 "peak_vram_bytes")} for t in tries])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def warm_child(args: argparse.Namespace) -> int:
    """A second process on the same compile cache: how soon its first step comes (printed as one JSON line)."""
    cache = activate_cache(args)
    import torch

    t_import = time.perf_counter() - T0
    case = (TINY_CASES if args.tiny else CASES)["standard"]
    tiny_dir = Path(os.environ["I2V_BENCH_TINY_DIR"]) if args.tiny else None
    fast = build(args, tiny_dir)
    sync(args.device)
    t_build = time.perf_counter() - T0
    loaded = cache.load()
    t_cache = time.perf_counter() - T0
    fast.enable_acceleration(on_compiled=cache.save, cuda_graphs=args.cuda_graphs)
    fast_flags(True, args.device)
    from i2v_daemon.models.gpu import memory_model_for

    _, clock, seconds, tries = daemon_job(fast, image_for(), case, case.steps,
                                          memory=memory_model_for(fast, None, 0.10))
    first_step = (clock.first_step_wall or time.perf_counter()) - T0
    print(json.dumps({
        "cache": inductor_counters(),
        "import_s": round(t_import, 2), "build_s": round(t_build - t_import, 2),
        "cache_load_s": round(t_cache - t_build, 2), "cache_loaded": loaded,
        "compile_s": tries[-1].get("compile_seconds", 0.0), "accelerated": tries[-1].get("accelerated"),
        "first_step_after_start_s": round(first_step, 2), "job_e2e_s": round(seconds, 2),
        "torch": torch.__version__,
    }))
    return 0


def _tail(text: str | bytes | None, n: int = 1500) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def run_warm_child(args: argparse.Namespace, tiny_dir: Path | None, budget: Budget) -> dict[str, Any]:
    """The warm restart in a second process; its own timeout ends before the caller's deadline, and a child
    that times out, fails or prints no figures is recorded as such (the run goes on)."""
    estimate_s = 0.0 if args.tiny else WARM_CHILD_S
    if not budget.allows(estimate_s):
        return {"skipped": f"time budget: {budget.left():.0f} s left, about {estimate_s:.0f} s needed"}
    limit = max(60.0, budget.left()) if budget.deadline is None else budget.until_deadline() - RESERVE_S
    if limit < 10:
        return {"skipped": f"{budget.until_deadline():.0f} s left before the caller's deadline"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--warm-child", "--device", args.device,
           "--dtype", args.dtype, "--cache-dir", str(args.cache_dir)]
    if args.tiny:
        cmd.append("--tiny")
    if args.cuda_graphs:
        cmd.append("--cuda-graphs")
    env = {**os.environ, "I2V_BENCH_TINY_DIR": str(tiny_dir or "")}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired as err:  # run() has killed the child
        return {"error": f"timed out: no result within its own limit of {limit:.0f} s",
                "timeout_s": round(limit, 1), "stdout_tail": _tail(err.stdout), "stderr_tail": _tail(err.stderr)}
    seconds = round(time.perf_counter() - t, 1)
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode} after {seconds} s", "stderr_tail": _tail(proc.stderr)}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"no JSON line in its output after {seconds} s", "stdout_tail": _tail(proc.stdout),
                "stderr_tail": _tail(proc.stderr)}


#: Memory a job may leave allocated behind it and still count as clean.
HYGIENE_LIMIT = 64 * 2**20


def hygiene(model: Any, image: Any, case: Case, jobs: int, device: str) -> dict[str, Any]:
    """VRAM left allocated after each of `jobs` short jobs, recorded (a leak is a finding, not an abort)."""
    resident = allocated(device)
    growth = []
    for _ in range(jobs):
        daemon_job(model, image, case, 2)
        gc.collect()
        growth.append(allocated(device) - resident)
    worst = max(growth, default=0)
    return {"jobs": jobs, "growth_mib": [round(g / 2**20, 1) for g in growth],
            "max_growth_mib": round(worst / 2**20, 1), "clean": worst < HYGIENE_LIMIT,
            "limit_mib": HYGIENE_LIMIT // 2**20}


def hygiene_estimate(case: Case, jobs: int, tiny: bool) -> float:
    if tiny:
        return 0.0
    per, fixed = ANCHOR_S[case.name]
    return 1.5 * jobs * (fixed + 2 * per)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        render(json.loads(args.render.read_text()), args.results)
        return 0
    if args.warm_child:
        return warm_child(args)
    cache = activate_cache(args)
    import torch

    cases_all = TINY_CASES if args.tiny else CASES
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in cases_all]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {', '.join(cases_all)}")
    budget = Budget(args.budget_s, args.deadline_s)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    print(f"torch {torch.__version__} on {gpu}; compile cache {args.cache_dir}; budget {args.budget_s:.0f} s, "
          f"deadline {'none' if args.deadline_s is None else f'{args.deadline_s:.0f} s'}", flush=True)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "gpu": gpu, "torch": torch.__version__, "dtype": args.dtype, "tiny": args.tiny, "repeats": args.repeats,
        "cases": wanted, "budget_s": args.budget_s, "deadline_s": args.deadline_s,
        "compile_budgeted_per": "size" if frames_symbolic() else "size and frames",
        "cuda_graphs": args.cuda_graphs, "rows": rows, "compile_cache": str(args.cache_dir),
        "cache_notes": cache.notes, "warm_restart": {}, "hygiene": {}, "capped": {}, "errors": [],
    }

    def save() -> None:  # after every path: a run stopped at its time limit keeps what it measured
        result["total_s"] = round(time.perf_counter() - T0, 1)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "bench.json").write_text(json.dumps(result, indent=2))
            try:
                text = table(result)
            except Exception as err:  # bench.json holds the figures; the table is only their view
                text = f"the table could not be made: {type(err).__name__}: {err}\n"
                print(text, flush=True)
            Path(os.environ["OUT"], "table.md").write_text(text)

    def failed(where: str, err: BaseException) -> dict[str, Any]:
        out = {"where": where, **failure(err)}
        result["errors"].append(out)
        print(json.dumps({"failed": out}), flush=True)
        if args.device.startswith("cuda"):  # an OOM or a failed job must not leave the next one short of memory
            gc.collect()
            torch.cuda.empty_cache()
        return out

    try:
        run(args, cases_all, wanted, budget, cache, result, save, failed)
    except KeyboardInterrupt:  # the caller's time limit (timeout --signal=INT): keep what was measured
        result["interrupted"] = f"SIGINT after {time.perf_counter() - T0:.0f} s (the caller's time limit)"
        print(result["interrupted"], flush=True)
        save()
        return 124
    save()
    print(table(result), flush=True)
    print(f"total {result['total_s']} s", flush=True)
    return 1 if result["errors"] else 0


def run(args: argparse.Namespace, cases_all: dict[str, Case], wanted: list[str], budget: Budget, cache: Any,
        result: dict[str, Any], save: Any, failed: Any) -> None:
    """Build, then each case, the warm restart, hygiene and the capped run, each recorded as it ends."""
    tiny_dir = None
    if args.tiny:
        from i2v_daemon.models.testing.tiny import build_tiny_i2vgen_xl

        tiny_dir = build_tiny_i2vgen_xl(Path(tempfile.mkdtemp()) / "tiny")
    models = []
    for _ in range(2):  # plain and eager share one; the fast path changes its modules, so it gets its own
        before = allocated(args.device)
        model = build(args, tiny_dir)
        sync(args.device)
        model.resident = allocated(args.device) - before
        models.append(model)
    base, fast = models
    fast.enable_acceleration(on_compiled=cache.save, cuda_graphs=args.cuda_graphs)
    result.update(resident_gib=round(base.resident / GIB, 2), prepared=list(fast.accelerator.prepared),
                  build_s=round(time.perf_counter() - T0, 1))
    print(f"built in {time.perf_counter() - T0:.1f} s; resident {base.resident / GIB:.2f} GiB each; "
          f"fast path prepared: {fast.accelerator.prepared}", flush=True)
    save()
    image = image_for()
    compiled: set[tuple[int, ...]] = set()
    for name in wanted:
        case = cases_all[name]
        if case.capped:
            continue
        row: dict[str, Any] = {"case": case.name}
        result["rows"].append(row)
        try:
            run_case(case, args, base, fast, image, budget, compiled, row, save)
        except Exception as err:  # recorded; the next case may still run
            row["error"] = failed(f"case {name}", err)["error"]
        print(json.dumps(row), flush=True)
        save()
        fast_ran = "e2e_s" in (row.get("fast") or {})
        if name == "standard" and not args.no_warm_child and fast_ran:
            try:
                result["warm_restart"] = run_warm_child(args, tiny_dir, budget)
            except Exception as err:
                result["warm_restart"] = {"error": failed("warm restart", err)["error"]}
            print(json.dumps({"warm_restart": result["warm_restart"]}), flush=True)
            save()
    hygiene_case = cases_all["fast"]
    if budget.allows(hygiene_estimate(hygiene_case, args.hygiene_jobs, args.tiny)):
        try:
            result["hygiene"] = hygiene(base, image, hygiene_case, args.hygiene_jobs, args.device)
        except Exception as err:
            result["hygiene"] = {"error": failed("hygiene", err)["error"]}
    else:
        result["hygiene"] = {"skipped": f"time budget: {budget.left():.0f} s left"}
    print(json.dumps({"hygiene": result["hygiene"]}), flush=True)
    save()
    capped: dict[str, Any] = {}
    if "1024x32" in wanted:
        case = cases_all["1024x32"]
        if not args.device.startswith("cuda"):
            capped = {"case": case.name, "skipped": "no GPU: the cap needs CUDA's allocator"}
        elif budget.allows(60):
            try:
                capped = capped_case(case, args, base, fast, image)
            except Exception as err:
                capped = {"case": case.name, "error": failed("capped run", err)["error"]}
        else:
            capped = {"case": case.name, "skipped": f"time budget: {budget.left():.0f} s left"}
        print(json.dumps({"capped": capped}), flush=True)
    result["capped"] = capped


# ---- the table -------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """The figures as bench/RESULTS.md shows them (only what was measured; skipped work says so)."""
    lines = [
        f"Measured on {result['gpu']}, torch {result['torch']}, {result['dtype']}, "
        f"{result['repeats']} timed jobs per path (median), CUDA graphs {'on' if result['cuda_graphs'] else 'off'}.",
        "",
        "| case | size | steps | path | end to end s | s/step | tail s | peak GiB | compile s |"
        " vs plain | max abs diff | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "width" not in row:  # failed before it started
            lines.append(f"| {row['case']} | | | all | {row.get('error', 'not run')} | | | | | | | |")
            continue
        size = f"{row['width']}x{row['height']}x{row['frames']}"
        if "skipped" in row:
            lines.append(f"| {row['case']} | {size} | {row['steps']} | all | {row['skipped']} | | | | | | | |")
            continue
        for path in ("plain", "eager", "fast"):
            if path not in row:
                if "error" in row:
                    lines.append(f"| {row['case']} | {size} | {row['steps']} | {path} | not run: {row['error']} "
                                 "| | | | | | | |")
                    break
                continue
            fig = row.get(path) or {}
            if "skipped" in fig:
                lines.append(f"| {row['case']} | {size} | {row['steps']} | {path} | {fig['skipped']} | | | | | | | |")
                continue
            if "e2e_s" not in fig:  # the fast path's compiling job ran, its timed jobs did not finish
                lines.append(f"| {row['case']} | {size} | {row['steps']} | {path} | not finished | | | | "
                             f"{fig.get('compile_s', '')} | | | |")
                continue
            diff = fig.get("vs_plain", {})
            speed = fig.get("speedup_vs_plain") or (round(row["plain"]["e2e_s"] / fig["e2e_s"], 2) if fig else "")
            lines.append(
                f"| {row['case']} | {size} | {row['steps']} | {path} | {fig.get('e2e_s', '')} | "
                f"{fig.get('s_per_step', '')} | {fig.get('tail_s', '')} | {fig.get('peak_gib', '')} | "
                f"{fig.get('compile_s', '')} | {'1.0' if path == 'plain' else speed}x | "
                f"{diff.get('max_abs', '') if diff else ''} | {diff.get('psnr_db', '') if diff else ''} |"
            )
    lines += ["", *goals(result)]
    warm = result.get("warm_restart") or {}
    if warm:
        lines += ["", "Warm restart (a second process on the same compile cache): "
                  + ", ".join(f"{k} {v}" for k, v in warm.items() if k != "cache_loaded")]
    if result.get("capped"):
        lines += ["", f"Capped run: {json.dumps(result['capped'])}"]
    if result.get("hygiene"):
        lines += ["", f"Memory hygiene: {json.dumps(result['hygiene'])}"]
    for err in result.get("errors") or []:
        lines += ["", f"Failed ({err['where']}): {err['error']}"]
    if result.get("interrupted"):
        lines += ["", f"Interrupted: {result['interrupted']}; what is above was measured before it."]
    return "\n".join(lines) + "\n"


def goals(result: dict[str, Any]) -> list[str]:
    """The issue's goals against what this run measured (a goal with nothing measured says so)."""
    if result.get("tiny"):
        return ["Goals (issue 14): not judged on a tiny model (its figures check the script, not the card)."]
    rows = {r["case"]: r for r in result["rows"] if "skipped" not in r}
    out = ["Goals (issue 14):", ""]
    std = rows.get("standard", {}).get("fast", {})
    if "e2e_s" in std:
        plain = rows["standard"]["plain"]["e2e_s"]
        out.append(f"- standard end to end {std['e2e_s']} s (goal ≤ 5.0): "
                   f"{'met' if std['e2e_s'] <= 5.0 else 'not met'}")
        out.append(f"- standard {plain / std['e2e_s']:.2f}× plain diffusers (goal ≥ 2.2): "
                   f"{'met' if plain / std['e2e_s'] >= 2.2 else 'not met'}")
        diff = std.get("vs_plain", {})
        out.append(f"- standard frames vs plain: max |Δ| {diff.get('max_abs')}, mean |Δ| {diff.get('mean_abs')}, "
                   f"PSNR {diff.get('psnr_db')} dB")
    else:
        out.append("- standard on the fast path: not measured in this run")
    warm = result.get("warm_restart") or {}
    if "first_step_after_start_s" in warm:
        first = warm["first_step_after_start_s"]
        out.append(f"- warm restart, process start to first step {first} s (goal ≤ 20): "
                   f"{'met' if first <= 20 else 'not met'} (building the random weights took {warm.get('build_s')} s "
                   "of it; the daemon loads them from disk instead)")
    else:
        out.append("- warm restart: not measured in this run")
    slower = [c for c, r in rows.items() if "e2e_s" in r.get("fast", {}) and r["fast"]["e2e_s"] > r["plain"]["e2e_s"]]
    measured = [c for c, r in rows.items() if "e2e_s" in r.get("fast", {})]
    out.append(f"- presets measured on the fast path: {', '.join(measured) or 'none'}; slower than plain diffusers: "
               f"{', '.join(slower) or 'none'}")
    return out


BEGIN, END = "<!-- bench_gpu.py --render: begin -->", "<!-- bench_gpu.py --render: end -->"


def render(result: dict[str, Any], results_md: Path) -> None:
    """Put `table(result)` between the markers in RESULTS.md (added at the end the first time)."""
    text = results_md.read_text()
    block = f"{BEGIN}\n{table(result)}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    results_md.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
