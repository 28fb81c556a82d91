"""One job through a model: size and seed decided once, the OOM ladder, every try recorded.

This module and `models/` are the only ones that import torch.
"""

from __future__ import annotations

import gc
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from i2v_daemon.choices import resolve_lora
from i2v_daemon.errors import OutOfMemory
from i2v_daemon.jobs import Params
from i2v_daemon.memory import ANCHOR_SLOPE, GIB, MemoryModel, choose_start
from i2v_daemon.models.base import SAVERS, GenerationRequest, LoraChoice, StepCallback, VideoModel

#: Cheapest first: slicing/tiling only touch the VAE decode, chunking costs a little speed,
#: offload costs a lot of speed. (Issue 4's benchmark refines this order on real cards.)
SAVER_STEPS: tuple[tuple[str, ...], ...] = (
    ("vae_slicing", "vae_tiling"),
    ("vae_slicing", "vae_tiling", "forward_chunking"),
    ("vae_slicing", "vae_tiling", "forward_chunking", "cpu_offload"),
)


@dataclass
class Outcome:
    frames: np.ndarray
    effective: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rung:
    width: int
    height: int
    savers: tuple[str, ...]


def plan_rungs(model: VideoModel, plan_w: int, plan_h: int, ladder: list[int]) -> list[Rung]:
    """The tries in order: the planned size with ever more savers, then smaller sizes with all of them."""
    supported = set(model.info.savers)
    if not model.device.startswith("cuda"):
        supported.discard("cpu_offload")
    steps = [()]
    for s in SAVER_STEPS:
        kept = tuple(x for x in s if x in supported)
        if kept and kept != steps[-1]:
            steps.append(kept)
    rungs = [Rung(plan_w, plan_h, s) for s in steps]
    short = min(plan_w, plan_h)
    for r in ladder:
        if r < short:
            smaller = model.plan_size((plan_w, plan_h), r, None, None)
            if min(smaller.width, smaller.height) < short:
                rungs.append(Rung(smaller.width, smaller.height, steps[-1]))
    return rungs


def is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom | torch.cuda.OutOfMemoryError)



def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_reset(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def _peak(device: str) -> int | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    return None


def allocated_bytes(device: str) -> int:
    """What PyTorch holds on `device` now (0 on the CPU): between jobs, the warm models' weights."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated(torch.device(device)))
    return 0


def gpu_budget_bytes(device: str, vram_budget_gib: float | None) -> int:
    """The card's memory, or `vram_budget_gib` of it where that is smaller."""
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return min(total, int(vram_budget_gib * GIB)) if vram_budget_gib else total


def gpu_name(device: str) -> str | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return None


def memory_model_for(model: VideoModel, vram_budget_gib: float | None, margin: float) -> MemoryModel | None:
    """The memory model for a loaded model on a CUDA card (None on the CPU: no prediction there).

    `vram_budget_gib` also caps PyTorch's allocator, so the daemon never takes more of a shared
    card than it was given; going over raises OutOfMemoryError and the ladder steps down.
    """
    if not (model.device.startswith("cuda") and torch.cuda.is_available()):
        return None
    dev = torch.device(model.device)
    total = torch.cuda.get_device_properties(dev).total_memory
    budget = total
    if vram_budget_gib:
        budget = min(total, int(vram_budget_gib * GIB))
        torch.cuda.set_per_process_memory_fraction(budget / total, dev)
    return MemoryModel(
        budget_bytes=budget,
        resident_bytes=torch.cuda.memory_allocated(dev),
        dtype_scale=2.0 if model.dtype == "float32" else 1.0,
        margin=margin,
        # The anchors were measured on I2VGen-XL; other families learn theirs from their own tries.
        anchor_slope=ANCHOR_SLOPE if model.info.family == "i2vgen-xl" else None,
    )


def _card(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} with {props.total_memory / 2**30:.1f} GiB"
    return device


def generate(
    model: VideoModel,
    image: Image.Image,
    prompt: str,
    negative_prompt: str,
    params: Params,
    *,
    ladder: list[int],
    on_step: StepCallback,
    on_try: Callable[[dict[str, Any]], None],
    seed: int | None = None,
    memory: MemoryModel | None = None,
    lora_dir: Path | None = None,
) -> Outcome:
    """Run the job, stepping down the ladder on out-of-memory; raises OutOfMemory past the last rung.

    The model plans the size, the frame count and its own conditioning first; what it cannot
    honour is adjusted with a note, or refused with an InputError before any work is done.
    With a memory model, rungs predicted not to fit are skipped without a try.
    """
    notes: list[str] = []
    plan = model.plan_size(image.size, params.resolution, params.width, params.height)
    notes.extend(plan.notes)
    frame_plan = model.plan_frames(params.num_frames)
    notes.extend(frame_plan.notes)
    num_frames = frame_plan.num_frames
    seed = params.seed if params.seed is not None else (seed if seed is not None else secrets.randbelow(2**32))
    lora = None
    if params.lora:
        path = resolve_lora(lora_dir, params.lora)
        lora = LoraChoice(params.lora, str(path), 1.0 if params.lora_scale is None else params.lora_scale)
    base = GenerationRequest(
        image=image, prompt=prompt, negative_prompt=negative_prompt, width=plan.width, height=plan.height,
        num_frames=num_frames, steps=params.steps, guidance_scale=params.guidance_scale, fps=params.fps,
        seed=seed, motion=params.motion, lora=lora,
    )
    conditioning = model.plan_conditioning(base)
    notes.extend(conditioning.notes)
    limit = model.info.max_prompt_tokens
    if model.info.takes_prompt and limit:
        for label, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            n = model.prompt_tokens(text)
            if n > limit:
                notes.append(
                    f"{label} is {n} tokens; {model.info.family} reads only the first {limit}, the rest is ignored"
                )
    rungs = plan_rungs(model, plan.width, plan.height, ladder)
    start, skipped = choose_start(memory, rungs, num_frames)
    notes.extend(skipped)
    last_err: BaseException | None = None
    for n, rung in enumerate(rungs[start:], start + 1):
        req = replace(base, width=rung.width, height=rung.height, savers=rung.savers)
        entry: dict[str, Any] = {
            "try": n, "width": rung.width, "height": rung.height, "num_frames": num_frames,
            "savers": list(rung.savers), "gpu": gpu_name(model.device), "dtype": model.dtype,
            "family": model.info.family,
        }
        if memory is not None:
            entry["budget_bytes"] = memory.budget_bytes
            entry["predicted_peak_bytes"] = memory.predict(rung.width, rung.height, num_frames, rung.savers)
        _peak_reset(model.device)
        t0 = time.monotonic()
        try:
            video = model.generate(req, on_step)
        except BaseException as err:
            entry.update(seconds=round(time.monotonic() - t0, 3), peak_vram_bytes=_peak(model.device))
            if is_oom(err):
                entry.update(outcome="out_of_memory", error=(str(err).splitlines() or ["out of memory"])[0][:300])
                on_try(entry)
                if memory is not None:
                    memory.learn([entry])
                last_err = err
                del err  # the traceback holds the frames that hold the tensors
                free_memory(model.device)
                continue
            entry.update(outcome=getattr(err, "kind", "error"), error=f"{type(err).__name__}: {err}"[:500])
            on_try(entry)
            raise
        entry.update(
            outcome="succeeded", error=None, seconds=round(time.monotonic() - t0, 3),
            peak_vram_bytes=_peak(model.device),
        )
        on_try(entry)
        if memory is not None:
            memory.learn([entry])
        if n > 1:
            notes.append(
                f"ran out of GPU memory at {rungs[0].width}x{rungs[0].height}; "
                f"made it at {rung.width}x{rung.height} with savers {list(rung.savers) or 'none'}"
            )
        effective: dict[str, Any] = {
            "width": rung.width, "height": rung.height, "num_frames": num_frames, "steps": params.steps,
            "guidance_scale": params.guidance_scale, "fps": params.fps, "seed": seed, "savers": list(rung.savers),
            "model": params.model or "default", "family": model.info.family,
        }
        if params.motion is not None and model.info.motion:
            effective["motion"] = params.motion
        if lora is not None:
            effective.update(lora=lora.name, lora_scale=lora.scale)
        effective["conditioning"] = dict(conditioning.values)  # the pipeline's own names for what it was told
        return Outcome(frames=video, effective=effective, notes=notes)
    smallest = rungs[-1]
    if last_err is None:  # pragma: no cover - the loop always tries at least the last rung
        raise AssertionError("no rung was tried")
    raise OutOfMemory(
        f"out of GPU memory even at {smallest.width}x{smallest.height}, {num_frames} frames, with "
        f"savers {list(smallest.savers) or 'none'} on {_card(model.device)}; ask for fewer frames or a lower "
        f"resolution, or free the GPU of other programs ({str(last_err).splitlines()[0][:160]})"
    )


__all__ = [
    "SAVERS", "Outcome", "Rung", "allocated_bytes", "free_memory", "generate", "gpu_budget_bytes", "is_oom",
    "memory_model_for", "plan_rungs",
]
