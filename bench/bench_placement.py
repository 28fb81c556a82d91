"""The planned placement on a lent GPU, no downloads: full-size Wan 2.1 I2V 14B (random weights) under a 24 GiB cap.

The architecture is the released one, built from the config-only folder
tests/data/model_configs/wan2.1-i2v-14b-480p (16.4 B transformer, 5.7 B umT5-xxl text encoder,
0.63 B CLIP ViT-H image encoder, 0.13 B VAE): the same FLOPs and the same bytes to place as the
released weights, none of their quality. The transformer and the text encoder are built with their
parameters on the meta device and their buffers made by the modules' own constructors (accelerate's
`init_empty_weights(include_buffers=False)`: Wan's rotary tables are the real ones), then each
parameter is made on the host in the dtype a `from_pretrained(torch_dtype=bfloat16)` load gives it
(the classes' keep-in-float32 modules in float32) and filled with normal(0, 0.02) values tiled from
a pool of 2^24 draws from a random offset (norm layers' weights 1, their biases 0). The VAE and the
image encoder are small: built for real with their own init, in float32 as the model card runs them.
The tokenizer is a character-level T5 stand-in (tiny_families.t5_tokenizer, ids within umT5's
vocabulary; the pipeline pads every prompt to 512 tokens, as with the real one), so the text
encoder runs as it would in a job and the placement's encoder phase is measured too.

Then, in one process:
  1. `models/planner.plan` for 832×480×81 on a card of `--budget-gib` (24): the placement it
     chooses, its predicted peak, and every other placement's prediction;
  2. the allocator capped at `--cap-gib` (`torch.cuda.set_per_process_memory_fraction`);
  3. the pipeline wrapped in the daemon's adapter, `WanModel(..., placement=<chosen>)`, which
     applies the placement (models/adapter.py `place()`);
  4. jobs through the adapter's `generate()`: 2 steps at guidance 5 (the released settings: two
     transformer passes a step), then 4 steps at guidance 1 (the shape of the distillation-LoRA
     preset `wan-turbo`; no LoRA file exists here, so this is the base transformer at that preset's
     steps and guidance), then, if time is left, 1 step and again 2 steps at guidance 5, both warm
     (s/step as their difference; the first job's first step carries the one-time costs).
Each job records its measured peak (`torch.cuda.max_memory_allocated`, and reserved), seconds per
step (a device sync in the step callback; the first step includes the encoders and the VAE encode),
the decode, end to end, and the host memory (this process's resident set and its high-water mark).
Everything goes to $OUT/placement.json after every stage (a run stopped at its limit keeps what it
measured) and $OUT/placement.md.

    python bench/bench_placement.py                        # on the GPU (bash bench/gpu_placement.sh)
    python bench/bench_placement.py --tiny --device cpu    # the same code on the tiny Wan, on the CPU

Imports torch, diffusers, transformers, accelerate and i2v_daemon's model code only (no pydantic,
no settings): the GPU machine's image has no pydantic, and diffusers travels as a wheel.
"""

from __future__ import annotations

import os

# As the daemon runs (`i2v-daemon run` sets it before torch, unless the environment has one).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
CONFIGS = ROOT / "tests" / "data" / "model_configs" / "wan2.1-i2v-14b-480p"
PROMPT, NEGATIVE = "a cat slowly turns its head", "blurry, static"
#: Components built with meta parameters and filled on the host; the others are built for real.
BIG = ("transformer", "transformer_2", "text_encoder")
#: Random values each parameter is tiled from (from a random offset): filling 22 B parameters by copy,
#: not by drawing each one, keeps the build to seconds.
POOL = 2**24
#: What the run needs after its last job: the table, placement.json, the exit.
RESERVE_S = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny Wan (models/testing) through the same code, with a budget just big enough for the "
                         "leanest placement: checks the script, not the card")
    ap.add_argument("--model", type=Path, default=CONFIGS, help="a folder with model_index.json and the configs")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="the allocator's cap (GPU only)")
    ap.add_argument("--budget-gib", type=float, default=None, help="the card the planner plans for (default: the cap)")
    ap.add_argument("--width", type=int, default=None, help="default 832 (tiny: 96)")
    ap.add_argument("--height", type=int, default=None, help="default 480 (tiny: 64)")
    ap.add_argument("--frames", type=int, default=None, help="default 81 (tiny: 9)")
    ap.add_argument("--steps", type=int, default=2, help="the first job's steps (guidance --guidance)")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--preset-steps", type=int, default=4, help="the distillation preset's shape: steps ...")
    ap.add_argument("--preset-guidance", type=float, default=1.0, help="... and guidance (no LoRA is loaded)")
    ap.add_argument("--no-difference", action="store_true", help="skip the warm pair (s/step as a difference)")
    ap.add_argument("--no-jobs", action="store_true", help="plan, build and place only")
    ap.add_argument("--placement", default=None, help="apply this placement instead of the planned one")
    ap.add_argument("--std", type=float, default=0.02, help="the random weights' standard deviation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="seconds after this process starts at which the caller stops it (SIGINT): no job is "
                         "started that would not end before it")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model = None
        if args.device == "cpu":
            args.dtype = "float32"
    size = (96, 64, 9) if args.tiny else (832, 480, 81)
    args.width = args.width or size[0]
    args.height = args.height or size[1]
    args.frames = args.frames or size[2]
    return args


# ---- measuring --------------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def host_memory() -> dict[str, float]:
    """This process's resident set now and at its highest, and the machine's memory, in GiB (Linux /proc)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[{"VmRSS": "rss_gib", "VmHWM": "rss_peak_gib"}[key]] = round(int(value.split()[0]) / 2**20, 2)
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[{"MemTotal": "machine_total_gib", "MemAvailable": "machine_available_gib"}[key]] = round(
                    int(value.split()[0]) / 2**20, 2)
    except OSError:
        pass
    return out


def gpu_memory(device: str) -> dict[str, float]:
    import torch

    if not device.startswith("cuda"):
        return {}
    return {"allocated_gib": round(torch.cuda.memory_allocated() / GIB, 3),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}


def failure(err: BaseException) -> dict[str, Any]:
    import traceback

    return {"error": f"{type(err).__name__}: {err}"[:600],
            "traceback": "".join(traceback.format_exception(err))[-2500:]}


# ---- building the random full-size pipeline ---------------------------------------------------------


def keep_in_float32(module: Any, dtype: Any) -> tuple[str, ...]:
    """Module names a `from_pretrained(torch_dtype=dtype)` load keeps in float32 for this class.

    diffusers: `_keep_in_fp32_modules` whatever the half dtype (Wan's rope, time embedder, scale-shift
    tables, norms). transformers: `_keep_in_fp32_modules_strict` for fp16 and bf16, `_keep_in_fp32_modules`
    for fp16 only (umT5's `wo` stays bf16 in bf16)."""
    import torch
    import transformers

    if dtype == torch.float32:
        return ()
    loose = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    if not isinstance(module, transformers.PreTrainedModel):
        return tuple(loose)
    strict = list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    return tuple(strict + (loose if dtype == torch.float16 else []))


class Filler:
    """Random parameter values, tiled from a pool of draws (one pool per dtype)."""

    def __init__(self, std: float, seed: int) -> None:
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        self.std = std
        self.pools: dict[Any, Any] = {}

    def fill(self, tensor: Any) -> None:
        import torch

        if tensor.dtype not in self.pools:
            self.pools[tensor.dtype] = torch.randn(POOL, generator=self.generator).mul_(self.std).to(tensor.dtype)
        pool = self.pools[tensor.dtype]
        flat = tensor.view(-1)
        offset = int(torch.randint(0, POOL, (1,), generator=self.generator))
        done = 0
        while done < flat.numel():
            n = min(POOL - offset, flat.numel() - done)
            flat[done:done + n].copy_(pool[offset:offset + n])
            done += n
            offset = 0


def materialize(module: Any, dtype: Any, filler: Filler) -> dict[str, Any]:
    """Every meta parameter of `module` made on the host at the dtype a real load gives it, and filled."""
    import torch

    fp32 = keep_in_float32(module, dtype)
    made: dict[int, Any] = {}  # tied parameters stay tied
    counts = {"params": 0, "float32_params": 0, "bytes": 0}
    for mod_name, mod in module.named_modules():
        norm = "norm" in type(mod).__name__.lower()
        for name, param in list(mod._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) in made:
                mod._parameters[name] = made[id(param)]
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            want = torch.float32 if any(k in full.split(".") for k in fp32) else dtype
            data = torch.empty(param.shape, dtype=want)
            if norm and name == "weight":
                data.fill_(1.0)
            elif norm and name == "bias":
                data.zero_()
            else:
                filler.fill(data)
            new = torch.nn.Parameter(data, requires_grad=False)
            mod._parameters[name] = made[id(param)] = new
            counts["params"] += data.numel()
            counts["float32_params"] += data.numel() if want == torch.float32 else 0
            counts["bytes"] += data.numel() * data.element_size()
    counts["kept_in_float32"] = list(fp32)
    return counts


def build_component(library: str, class_name: str, sub: Path, dtype: Any, big: bool,
                    filler: Filler) -> tuple[Any, dict[str, Any]]:
    """One component from its config: meta parameters filled on the host (`big`), or built for real."""
    import importlib
    from contextlib import nullcontext

    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(library), class_name)
    t = time.perf_counter()
    with init_empty_weights(include_buffers=False) if big else nullcontext():
        if library == "diffusers":
            module = cls.from_config(cls.load_config(sub))
        else:
            import transformers

            module = cls(transformers.AutoConfig.from_pretrained(sub))
    if big and hasattr(module, "tie_weights"):
        # Under init_empty_weights every parameter set is wrapped anew, so the constructor's tying (umT5's
        # encoder embedding is its `shared` one) did not hold: tied here, outside it, as a real load has it.
        module.tie_weights()
    if big:
        info = materialize(module, dtype, filler)
    else:
        module = module.to(dtype)
        info = {"params": sum(p.numel() for p in module.parameters()),
                "bytes": sum(p.numel() * p.element_size() for p in module.parameters()), "built": "for real"}
    module.requires_grad_(False)
    module.eval()
    info["bytes"] += sum(b.numel() * b.element_size() for b in module.buffers())  # as the planner counts
    left = [n for n, x in [*module.named_parameters(), *module.named_buffers()] if x.is_meta]
    if left:
        raise RuntimeError(f"{class_name}: tensors left on the meta device: {left[:5]}")
    info.update(seconds=round(time.perf_counter() - t, 1), dtype=str(dtype).removeprefix("torch."),
                buffers=[f"{n} {tuple(b.shape)} {str(b.dtype).removeprefix('torch.')}"
                         for n, b in module.named_buffers()][:8])
    return module, info


def build_pipeline(folder: Path, dtype: Any, std: float, seed: int) -> tuple[Any, dict[str, Any]]:
    """A WanImageToVideoPipeline of the architecture in `folder`, random weights, on the host."""
    import diffusers
    import torch
    from transformers import CLIPImageProcessor

    from i2v_daemon.models.testing.tiny_families import t5_tokenizer
    from i2v_daemon.models.wan import MAX_SEQUENCE_LENGTH, WanModel

    index = json.loads((folder / "model_index.json").read_text())
    filler = Filler(std, seed)
    torch.manual_seed(seed)  # the small components' own init
    parts: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, class_name = str(spec[0]), str(spec[1])
        sub = folder / name
        if name == "scheduler":
            cls = getattr(diffusers, class_name)
            parts[name] = cls.from_config(cls.load_config(sub))
        elif name == "tokenizer":  # ids within umT5's vocabulary; padded to 512 tokens by the pipeline
            parts[name] = t5_tokenizer(MAX_SEQUENCE_LENGTH)
            info[name] = {"stand_in": "character-level T5 tokenizer (tiny_families.t5_tokenizer)",
                          "vocab": len(parts[name])}
        elif name == "image_processor":
            has = (sub / "preprocessor_config.json").is_file()
            parts[name] = CLIPImageProcessor.from_pretrained(sub) if has else CLIPImageProcessor()
            info[name] = {"from": str(sub) if has else "CLIPImageProcessor() defaults (224, OpenAI CLIP mean/std)"}
        else:
            want = torch.float32 if name in WanModel.float32_components else dtype
            parts[name], info[name] = build_component(library, class_name, sub, want, name in BIG, filler)
            info[name]["class"] = class_name
            print(f"built {name} ({class_name}) in {info[name]['seconds']} s; host {host_memory()}", flush=True)
    pipeline_class = getattr(diffusers, str(index["_class_name"]))
    accepted = inspect.signature(pipeline_class.__init__).parameters
    config = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    args = {k: v for k, v in {**parts, **config}.items() if k in accepted}
    for name, param in accepted.items():
        if name != "self" and name not in args and param.default is inspect.Parameter.empty:
            args[name] = None
    return pipeline_class(**args), info


# ---- the run ----------------------------------------------------------------------------------------


def plan_for(args: argparse.Namespace, folder: Path, budget_bytes: int | None) -> Any:
    from i2v_daemon.models import planner

    dtype = args.dtype
    if budget_bytes is None:  # tiny: just big enough for the leanest placement, so the plan picks an offloading one
        probe = planner.plan(str(folder), budget_bytes=2**50, num_frames=args.frames, width=args.width,
                             height=args.height, dtype=dtype)
        leanest = min(p.peak_bytes for p in probe.predictions)
        budget_bytes = int(leanest / (1 - probe.margin)) + 1
    return planner.plan(str(folder), budget_bytes=budget_bytes, num_frames=args.frames, width=args.width,
                        height=args.height, dtype=dtype)


def image_for(width: int, height: int) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return Image.fromarray((0.6 * ramp + 0.4 * rng.random((height, width, 3)) * 255).astype("uint8"))


def job(model: Any, image: Any, args: argparse.Namespace, steps: int, guidance: float, label: str) -> dict[str, Any]:
    """One job through the adapter's generate(): timings per step, peaks on the GPU and the host."""
    import numpy as np
    import torch

    from i2v_daemon.models.base import GenerationRequest

    device = args.device
    request = GenerationRequest(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, width=args.width,
                                height=args.height, num_frames=args.frames, steps=steps, guidance_scale=guidance,
                                fps=16, seed=args.seed)
    marks: list[float] = []
    phases: dict[str, float] = {}

    def on_step(_i: int, _n: int) -> None:
        sync(device)
        marks.append(time.perf_counter())

    def on_phase(name: str) -> None:
        sync(device)
        phases[name] = time.perf_counter()

    out: dict[str, Any] = {"job": label, "size": f"{args.width}x{args.height}x{args.frames}", "steps": steps,
                           "guidance": guidance, "transformer_passes_per_step": 2 if guidance > 1 else 1}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    try:
        video = model.generate(request, on_step, on_phase)
    except torch.cuda.OutOfMemoryError as err:
        out.update(outcome="out of memory", error=str(err).splitlines()[0][:300], seconds=round(
            time.perf_counter() - t, 2), gpu=gpu_memory(device), host=host_memory())
        return out
    sync(device)
    end = time.perf_counter()
    start = phases.get("denoising", t)
    intervals = [b - a for a, b in zip([start, *marks], marks, strict=False)]
    out.update(
        outcome="finished", e2e_s=round(end - t, 2),
        first_step_s=round(intervals[0], 2) if intervals else None,  # with the encoders and the VAE encode
        step_s=[round(x, 3) for x in intervals],
        s_per_step=round(statistics.median(intervals[1:]), 3) if len(intervals) > 1 else None,
        decode_s=round(end - marks[-1], 2) if marks else None,
        frames=list(video.shape), frames_mean=round(float(np.mean(video)), 1),
        frames_std=round(float(np.std(video)), 1), gpu=gpu_memory(device), host=host_memory(),
        last_run=getattr(model, "last_run", {}),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    result: dict[str, Any] = {
        "gpu": gpu, "torch": torch.__version__, "dtype": args.dtype, "tiny": args.tiny,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "size": f"{args.width}x{args.height}x{args.frames}",
        "weights": f"random, normal(0, {args.std}) tiled from a pool of {POOL} draws; norms 1 and 0",
        "lora": "none: the 4-step job stands for the distillation-LoRA preset (wan-turbo) by its steps and "
                "guidance only; no LoRA file exists here",
        "host_start": host_memory(), "errors": [], "jobs": [],
    }
    try:
        import diffusers
        import transformers

        result.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError as err:
        print(f"missing {err.name}: carry it as a wheel (bench/RESULTS.md)", flush=True)
        return 1
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    def save() -> None:
        result["total_s"] = round(time.perf_counter() - T0, 1)
        if out_dir is not None:
            (out_dir / "placement.json").write_text(json.dumps(result, indent=2))
            (out_dir / "placement.md").write_text(table(result))

    print(f"torch {torch.__version__}, diffusers {result['diffusers']}, transformers {result['transformers']} on "
          f"{gpu}; host {result['host_start']}", flush=True)
    try:
        run(args, device, dtype, result, save)
    except KeyboardInterrupt:
        result["interrupted"] = f"SIGINT after {time.perf_counter() - T0:.0f} s (the caller's time limit)"
        print(result["interrupted"], flush=True)
        save()
        return 124
    except Exception as err:  # recorded with what came before it
        result["errors"].append({"where": result.get("stage", "?"), **failure(err)})
        save()
        print(table(result), flush=True)
        raise
    save()
    print(table(result), flush=True)
    return 1 if result["errors"] else 0


def run(args: argparse.Namespace, device: str, dtype: Any, result: dict[str, Any], save: Any) -> None:
    import torch

    from i2v_daemon.models.wan import WanModel

    def stage(name: str) -> None:
        result["stage"] = name
        print(f"[{time.perf_counter() - T0:6.1f} s] {name}", flush=True)

    def left() -> float:
        return float("inf") if args.deadline_s is None else args.deadline_s - (time.perf_counter() - T0) - RESERVE_S

    folder = args.model
    if args.tiny:
        from i2v_daemon.models.testing.tiny import build_tiny

        stage("building the tiny Wan's folder")
        folder = build_tiny("wan", Path(tempfile.mkdtemp(prefix="tiny-wan-")) / "wan")
    result["model"] = str(folder)

    stage("planning")
    t = time.perf_counter()
    budget = None if args.tiny and args.budget_gib is None else int((args.budget_gib or args.cap_gib) * GIB)
    plan = plan_for(args, Path(folder), budget)
    chosen = plan.chosen or plan.predictions[-1]  # nothing fits: the leanest, as the holder does
    result["plan"] = {
        "seconds": round(time.perf_counter() - t, 1), "budget_gib": round(plan.budget_bytes / GIB, 3),
        "margin": plan.margin, "limit_gib": round(plan.limit_bytes / GIB, 3),
        "planned_size": f"{plan.width}x{plan.height}x{plan.num_frames}",
        "weights_gib": {n: round(c.bytes / GIB, 2) for n, c in plan.components.items()},
        "activation_gib": {"denoise_step": round(plan.costs.denoise / GIB, 3),
                           "decode": round(plan.costs.decode / GIB, 3)},
        "placements": [{"placement": p.name, "predicted_peak_gib": round(p.peak_bytes / GIB, 3),
                        "resident_gib": round(p.resident_bytes / GIB, 3), "fits": p.fits} for p in plan.predictions],
        "chosen": chosen.name, "chosen_fits": chosen.fits, "predicted_peak_gib": round(chosen.peak_bytes / GIB, 3),
        "notes": plan.notes,
    }
    placement = args.placement or chosen.placement
    result["placement"] = placement
    applied = chosen if placement == chosen.placement else next(
        (p for p in plan.predictions if p.placement == placement and not p.fp8), None)
    predicted = round(applied.peak_bytes / GIB, 3) if applied is not None else None
    print(f"plan: {chosen.name}, predicted peak {chosen.peak_bytes / GIB:.2f} GiB on {plan.budget_bytes / GIB:.1f} "
          f"GiB; applying {placement}", flush=True)
    save()

    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        cap = min(int(args.cap_gib * GIB), total)
        torch.cuda.set_per_process_memory_fraction(cap / total)
        result["cap"] = {"cap_gib": round(cap / GIB, 2), "card_gib": round(total / GIB, 2),
                         "fraction": round(cap / total, 4)}

    stage("building the random pipeline on the host")
    t = time.perf_counter()
    pipe, built = build_pipeline(Path(folder), dtype, args.std, args.seed)
    result["build"] = {"seconds": round(time.perf_counter() - t, 1), "components": built, "host": host_memory()}
    # What was built against what the planner weighed (it counts the float32-kept modules at the half dtype).
    result["build"]["vs_plan"] = {
        name: {"built_gib": round(built[name]["bytes"] / GIB, 3), "planned_gib": round(c.bytes / GIB, 3),
               "within_1_percent": abs(built[name]["bytes"] - c.bytes) <= 0.01 * c.bytes}
        for name, c in plan.components.items() if name in built and "bytes" in built[name]}
    print(f"built vs planned: {result['build']['vs_plan']}", flush=True)
    save()

    stage(f"placing ({placement})")
    t = time.perf_counter()
    model = WanModel(str(folder), device=device, dtype=args.dtype, pipeline=pipe, placement=placement)
    sync(device)
    result["place"] = {"seconds": round(time.perf_counter() - t, 1), "placement": model.placement,
                       "gpu": gpu_memory(device), "host": host_memory()}
    save()
    del pipe

    if args.no_jobs:
        result.pop("stage", None)
        return
    image = image_for(args.width, args.height)
    g, n = args.guidance, args.steps
    # (steps, guidance, label, how many jobs from here on must fit together): the first job is also the
    # first on the card (its first step carries the one-time costs; its later steps are warm); the last
    # two, both warm, give s/step as a difference.
    planned = [(n, g, f"{n} steps, guidance {g:g}", 1),
               (args.preset_steps, args.preset_guidance,
                f"{args.preset_steps} steps, guidance {args.preset_guidance:g} (distillation preset's shape, no LoRA)",
                1)]
    if not args.no_difference and n > 1:
        planned += [(1, g, f"1 step, guidance {g:g} (warm, for the difference)", 2),
                    (n, g, f"{n} steps, guidance {g:g} again (warm, for the difference)", 1)]
    first: dict[str, Any] | None = None
    done: list[dict[str, Any]] = []

    def need(steps: int, guidance: float) -> float:
        """Seconds a job should take, from the first one: its fixed part and its warm seconds per pass."""
        assert first is not None
        passes = first["transformer_passes_per_step"]
        per = (first["s_per_step"] or first["first_step_s"]) / passes
        fixed = first["e2e_s"] - first["steps"] * per * passes
        return 1.2 * (fixed + steps * per * (2 if guidance > 1 else 1))

    for i, (steps, guidance, label, together) in enumerate(planned):
        if first is not None and "e2e_s" in first:
            group = planned[i:i + together]
            needed = sum(need(s_, g_) for s_, g_, _, _ in group)
            if left() < needed:
                skip = f"time: {left():.0f} s left, about {needed:.0f} s needed"
                for _, _, skipped_label, _ in planned[i:]:  # what comes later is no shorter
                    result["jobs"].append({"job": skipped_label, "skipped": skip})
                save()
                break
        elif first is not None:  # the first job failed: nothing to estimate from, and likely to fail again
            result["jobs"].append({"job": label, "skipped": "the first job did not finish"})
            continue
        stage(f"job: {label}")
        try:
            figures = job(model, image, args, steps, guidance, label)
        except Exception as err:  # recorded; the next job may still run
            figures = {"job": label, "outcome": "failed", **failure(err)}
            result["errors"].append({"where": label, **failure(err)})
        figures["placement"] = model.placement
        figures["predicted_peak_gib"] = predicted
        result["jobs"].append(figures)
        done.append(figures)
        print(json.dumps({k: v for k, v in figures.items() if k != "traceback"}), flush=True)
        save()
        first = first or figures
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    warm = [j for j in done if "warm, for the difference" in j["job"] and "e2e_s" in j]
    if len(warm) == 2:
        one, more = sorted(warm, key=lambda j: j["steps"])
        diff = (more["e2e_s"] - one["e2e_s"]) / (more["steps"] - one["steps"])
        result["s_per_step_by_difference"] = round(diff, 3)
    result.pop("stage", None)


def table(result: dict[str, Any]) -> str:
    """placement.md: what was planned, applied and measured (only what was measured)."""
    plan = result.get("plan") or {}
    cap = result.get("cap") or {}
    lines = [
        f"Measured on {result['gpu']}, torch {result['torch']}, diffusers {result.get('diffusers')}, "
        f"transformers {result.get('transformers')}, {result['dtype']}"
        + (f", allocator capped at {cap['cap_gib']} GiB of {cap['card_gib']}" if cap else "")
        + f"; model {result.get('model')} ({'tiny' if result['tiny'] else 'full size'}, {result['weights']}).",
        "",
    ]
    if plan:
        lines += [f"Plan for {plan['planned_size']} on {plan['budget_gib']} GiB (margin {plan['margin']}): "
                  f"**{plan['chosen']}**, predicted peak {plan['predicted_peak_gib']} GiB"
                  f"{'' if plan['chosen_fits'] else ' (nothing fits: the leanest)'}; applied: "
                  f"{result.get('placement')}. Others: "
                  + ", ".join(f"{p['placement']} {p['predicted_peak_gib']}" for p in plan["placements"]) + " GiB.", ""]
    lines += ["| job | size | placement | predicted peak GiB | measured peak GiB (allocated / reserved) | s/step | "
              "first step s | decode s | end to end s | host RSS GiB (peak) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for j in result.get("jobs", []):
        if "skipped" in j or "e2e_s" not in j:
            why = j.get("skipped") or j.get("outcome", "") + (f": {j['error']}" if j.get("error") else "")
            lines.append(f"| {j['job']} | {j.get('size', '')} | {j.get('placement', '')} | | {why} | | | | | |")
            continue
        g, h = j.get("gpu") or {}, j.get("host") or {}
        peak = f"{g['peak_allocated_gib']} / {g['peak_reserved_gib']}" if g else "no CUDA (CPU)"
        lines.append(f"| {j['job']} | {j['size']} | {j['placement']} | {j.get('predicted_peak_gib')} | {peak} | "
                     f"{j['s_per_step']} | {j['first_step_s']} | {j['decode_s']} | {j['e2e_s']} | "
                     f"{h.get('rss_gib')} ({h.get('rss_peak_gib')}) |")
    if "s_per_step_by_difference" in result:
        lines += ["", "s/step by difference (the warm multi-step job minus the warm 1-step job, per step): "
                  f"{result['s_per_step_by_difference']}"]
    build, place = result.get("build") or {}, result.get("place") or {}
    if build:
        lines += ["", f"Build on the host: {build['seconds']} s, host {build['host']}; "
                  f"placing: {place.get('seconds')} s, host {place.get('host')}, GPU {place.get('gpu')}."]
    lines += ["", f"LoRA: {result['lora']}."]
    for err in result.get("errors") or []:
        lines += ["", f"Failed ({err['where']}): {err['error']}"]
    if result.get("interrupted"):
        lines += ["", f"Interrupted: {result['interrupted']}; what is above was measured before it."]
    lines += ["", f"Total {result.get('total_s')} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
