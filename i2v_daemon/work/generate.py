"""One job through a model: size, steps and seed decided once, the OOM ladder, every try recorded.

This module and `models/` are the only ones that import torch (here only through models/).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from i2v_daemon.errors import OutOfMemory, first_line
from i2v_daemon.intake.choices import resolve_lora
from i2v_daemon.logs import get_logger
from i2v_daemon.models.base import (
    SAVERS,
    ConditioningPlan,
    GenerationRequest,
    LoraChoice,
    PhaseCallback,
    StepCallback,
    VideoModel,
)
from i2v_daemon.models.gpu import (
    allocated_bytes,
    card,
    free_memory,
    gpu_budget_bytes,
    gpu_name,
    is_oom,
    memory_model_for,
    peak_bytes,
    reset_peak,
)
from i2v_daemon.models.memory import DEFAULT_FAST_DECODE_CHUNK, MemoryModel, choose_start
from i2v_daemon.models.placement import PLACEMENTS

if TYPE_CHECKING:
    # Only its attributes are read: the benchmark passes a plain stand-in where pydantic is missing.
    from i2v_daemon.params import Params

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
    accelerated: bool = False  # the fast path; an OOM there retries eagerly at the same size first
    placement: str | None = None  # a heavier placement than the planned one (None: the weights stay put)


def plan_rungs(
    model: VideoModel, plan_w: int, plan_h: int, ladder: list[int], *, accelerate: bool = False
) -> list[Rung]:
    """The tries in order: (the fast path,) the planned size with ever more savers, then with each heavier
    placement, then smaller sizes with all savers and the heaviest placement.

    Heavier placements are rungs only where a placement was planned for a card (models/holder.py): a
    model on the CPU has nothing to offload to.
    """
    supported = set(model.info.savers)
    heavier = heavier_placements(model)
    if not model.device.startswith("cuda") or heavier:  # with placements, model offload is one of them
        supported.discard("cpu_offload")
    steps: list[tuple[str, ...]] = [()]
    for s in SAVER_STEPS:
        kept = tuple(x for x in s if x in supported)
        if kept and kept != steps[-1]:
            steps.append(kept)
    rungs = [Rung(plan_w, plan_h, s) for s in steps]
    if accelerate:
        # Only the saver-free try at the planned size: once a job has run out of memory the eager
        # path's smaller peak is worth more than the compiled one's speed.
        rungs.insert(0, Rung(plan_w, plan_h, (), accelerated=True))
    savers = steps[-1]
    rungs += [Rung(plan_w, plan_h, savers, placement=p) for p in heavier]
    short = min(plan_w, plan_h)
    for r in ladder:
        if r < short:
            smaller = model.plan_size((plan_w, plan_h), r, None, None)
            if min(smaller.width, smaller.height) < short:
                rungs.append(Rung(smaller.width, smaller.height, savers, placement=heavier[-1] if heavier else None))
    return rungs


def heavier_placements(model: VideoModel) -> list[str]:
    """The placements after the model's own, in order of cost, where one was planned for a card; else none."""
    if not getattr(model, "placement_plan", None) or not hasattr(model, "place"):
        return []
    current = getattr(model, "placement", "gpu")
    return list(PLACEMENTS[PLACEMENTS.index(current) + 1:]) if current in PLACEMENTS else []


def decode_chunk_for(model: VideoModel, rung: Rung, num_frames: int, memory: MemoryModel | None) -> int | None:
    """Frames the VAE decodes at once in this try: the family's default eagerly, as many as fit on the fast path.

    Only for families whose VAE decodes in chunks (I2VGen-XL, SVD); the others decode the video whole.
    """
    if not rung.accelerated or not model.info.decode_chunks:
        return None
    if memory is None:
        return min(num_frames, DEFAULT_FAST_DECODE_CHUNK)
    return memory.decode_chunk(rung.width, rung.height, num_frames, rung.savers)


@dataclass(frozen=True)
class _Plan:
    """What is decided once for the whole job, before the first try."""

    base: GenerationRequest  # the request at the planned size, without savers
    conditioning: ConditioningPlan
    scheduler: str
    fast: bool  # the job may start on the fast path
    notes: tuple[str, ...]


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
    on_phase: PhaseCallback | None = None,
) -> Outcome:
    """Run the job, stepping down the ladder on out-of-memory; raises OutOfMemory past the last rung.

    The model plans the size, the frame count, the steps and its own conditioning first; what it
    cannot honour is adjusted with a note, or refused with an InputError before any work is done.
    With a memory model, rungs predicted not to fit are skipped without a try. A ValueError the
    pipeline raises (a size it refuses) propagates as it is: the worker fails the job for good.
    """
    plan = _plan_request(model, image, prompt, negative_prompt, params, seed=seed, lora_dir=lora_dir)
    base = plan.base
    rungs = plan_rungs(model, base.width, base.height, ladder, accelerate=plan.fast)
    start, skipped = choose_start(memory, rungs, base.num_frames)
    notes = [*plan.notes, *skipped]
    last_error = ""
    placed = getattr(model, "placement", None)
    try:
        for n, rung in enumerate(rungs[start:], start + 1):
            tried = _try_rung(model, plan, rung, n, memory, on_step=on_step, on_phase=on_phase, on_try=on_try)
            if isinstance(tried, str):  # out of memory: on to the next rung
                last_error = tried
                continue
            video, entry = tried
            if n > 1:
                first = rungs[start]
                where = " on the fast path" if first.accelerated and n > start + 1 else ""
                moved = f" and the weights placed {rung.placement}" if rung.placement else ""
                notes.append(
                    f"ran out of GPU memory at {rungs[0].width}x{rungs[0].height}{where}; "
                    f"made it at {rung.width}x{rung.height} with savers {list(rung.savers) or 'none'}{moved}"
                )
            if entry.get("fell_back"):
                notes.append(entry["fell_back"])
            if entry.get("vae_float32"):
                notes.append(model.last_run["vae_float32"])
            return Outcome(frames=video, effective=_effective(model, params, plan, rung, entry), notes=notes)
    finally:
        if placed is not None and getattr(model, "placement", placed) != placed:
            _place_back(model, placed)
    smallest = rungs[-1]
    raise OutOfMemory(
        f"out of GPU memory even at {smallest.width}x{smallest.height}, {base.num_frames} frames, with "
        f"savers {list(smallest.savers) or 'none'} on {card(model.device)}; ask for fewer frames or a lower "
        f"resolution, or free the GPU of other programs ({last_error[:160]})"
    )


def _place_back(model: VideoModel, placed: str) -> None:
    """The weights back where the plan put them, for the next job; never raised over the job's outcome.

    If they do not fit there now (another program took GPU memory meanwhile), they stay on the heavier
    placement the job ran on, whole, and the log says so: slower jobs, not broken ones.
    """
    heavier = model.placement
    free_memory(model.device)
    try:
        model.place(placed)
    except Exception as err:
        get_logger().warning("placement_not_restored", planned=placed, kept=heavier, error=first_line(err))
        free_memory(model.device)
        model.place(heavier)


def _plan_request(
    model: VideoModel, image: Image.Image, prompt: str, negative_prompt: str, params: Params, *,
    seed: int | None, lora_dir: Path | None,
) -> _Plan:
    """Size, frames, steps, seed, LoRA, conditioning and scheduler, with a note for each adjustment.

    An InputError for what the model cannot do is raised here, before any work.
    """
    notes: list[str] = []
    plan = model.plan_size(image.size, params.resolution, params.width, params.height)
    notes.extend(plan.notes)
    frame_plan = model.plan_frames(params.num_frames)
    notes.extend(frame_plan.notes)
    steps, step_notes = model.plan_steps(params.steps)
    notes.extend(step_notes)
    seed = params.seed if params.seed is not None else (seed if seed is not None else secrets.randbelow(2**32))
    lora = None
    if params.lora:
        path = resolve_lora(lora_dir, params.lora)
        lora = LoraChoice(params.lora, str(path), 1.0 if params.lora_scale is None else params.lora_scale)
    base = GenerationRequest(
        image=image, prompt=prompt, negative_prompt=negative_prompt, width=plan.width, height=plan.height,
        num_frames=frame_plan.num_frames, steps=steps, guidance_scale=params.guidance_scale, fps=params.fps,
        seed=seed, motion=params.motion, lora=lora, scheduler=params.scheduler, cache=getattr(params, "cache", None),
    )
    conditioning = model.plan_conditioning(base)  # an unknown scheduler is refused here, before any work
    notes.extend(conditioning.notes)
    scheduler = model.scheduler_for(params.scheduler)
    limit = model.info.max_prompt_tokens
    if model.info.takes_prompt and limit:
        for label, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            n = model.prompt_tokens(text)
            if n > limit:
                notes.append(
                    f"{label} is {n} tokens; {model.info.family} reads only the first {limit}, the rest is ignored"
                )
    fast = model.info.accelerated and model.fast_path_for(replace(base, accelerated=True))
    return _Plan(base=base, conditioning=conditioning, scheduler=scheduler, fast=fast, notes=tuple(notes))


def _try_rung(
    model: VideoModel, plan: _Plan, rung: Rung, n: int, memory: MemoryModel | None, *,
    on_step: StepCallback, on_phase: PhaseCallback | None, on_try: Callable[[dict[str, Any]], None],
) -> tuple[np.ndarray, dict[str, Any]] | str:
    """Try number `n`, at one rung of the ladder: the frames and the try's entry, or the out-of-memory message.

    Every try is reported to `on_try` (and taught to the memory model, whatever its outcome but an
    error); an error other than out-of-memory is reported, then propagates.
    """
    if rung.placement is not None and getattr(model, "placement", None) != rung.placement:
        free_memory(model.device)
        model.place(rung.placement)  # heavier than planned: less on the GPU at once
    chunk = decode_chunk_for(model, rung, plan.base.num_frames, memory)
    req = replace(plan.base, width=rung.width, height=rung.height, savers=rung.savers, accelerated=rung.accelerated,
                  decode_chunk=chunk)
    entry = _try_entry(model, req, n, memory)
    reset_peak(model.device)
    t0 = time.monotonic()
    oom = None
    stale = getattr(model, "last_run", None)  # the model replaces it when it starts a call
    try:
        video = model.generate(req, on_step, on_phase)
    except BaseException as err:
        entry.update(seconds=round(time.monotonic() - t0, 3), peak_vram_bytes=peak_bytes(model.device))
        _record_run(model, entry, stale, finished=False)
        if not is_oom(err):
            entry.update(outcome=getattr(err, "kind", "error"), error=f"{type(err).__name__}: {err}"[:500])
            on_try(entry)
            raise
        # Keep the message only: the error's traceback holds the failed try's frames, and with
        # them every tensor it allocated.
        oom = first_line(err, limit=300, default="out of memory")
    if oom is not None:
        # Out of the except block, so nothing of the failed try is referenced while memory is freed.
        free_memory(model.device)
        entry.update(outcome="out_of_memory", error=oom)
        on_try(entry)
        if memory is not None and rung.placement is None:  # it models the planned placement only
            memory.learn([entry])
        return oom
    entry.update(
        outcome="succeeded", error=None, seconds=round(time.monotonic() - t0, 3),
        peak_vram_bytes=peak_bytes(model.device),
    )
    _record_run(model, entry, stale, finished=True)
    on_try(entry)
    if memory is not None and rung.placement is None:
        memory.learn([entry])
    return video, entry


def _try_entry(model: VideoModel, req: GenerationRequest, n: int, memory: MemoryModel | None) -> dict[str, Any]:
    """The record of try number `n` as it starts (what it runs, and the memory model's prediction)."""
    entry: dict[str, Any] = {
        "try": n, "width": req.width, "height": req.height, "num_frames": req.num_frames, "steps": req.steps,
        "savers": list(req.savers), "accelerated": req.accelerated, "gpu": gpu_name(model.device),
        "dtype": model.dtype, "family": model.info.family, "weights": model.info.weights.label(),
        "cache": req.cache or "off",
    }
    if req.decode_chunk is not None:
        entry["decode_chunk"] = req.decode_chunk
    entry["placement"] = getattr(model, "placement", "gpu")  # where the weights were (models/placement.py)
    planned = getattr(model, "placement_plan", None) or {}
    if planned.get("placement") == entry["placement"]:
        entry["placement_predicted_peak_bytes"] = planned.get("predicted_peak_bytes")
    if memory is not None:
        entry["budget_bytes"] = memory.budget_bytes
        entry["predicted_peak_bytes"] = memory.predict(
            req.width, req.height, req.num_frames, req.savers, req.accelerated, req.decode_chunk)
    return entry


def _effective(model: VideoModel, params: Params, plan: _Plan, rung: Rung, entry: dict[str, Any]) -> dict[str, Any]:
    """The values the video was made with, as the job records them (its `effective`)."""
    base = plan.base
    effective: dict[str, Any] = {
        "width": rung.width, "height": rung.height, "num_frames": base.num_frames, "steps": base.steps,
        "guidance_scale": params.guidance_scale, "fps": params.fps, "seed": base.seed, "savers": list(rung.savers),
        "model": params.model or "default", "family": model.info.family, "scheduler": plan.scheduler,
        "accelerated": entry["accelerated"], "cache": entry["cache"],
    }
    if params.motion is not None and model.info.motion:
        effective["motion"] = params.motion
    if base.lora is not None:
        effective.update(lora=base.lora.name, lora_scale=base.lora.scale)
    effective["conditioning"] = dict(plan.conditioning.values)  # the pipeline's own names for what it was told
    return effective


def _record_run(model: VideoModel, entry: dict[str, Any], stale: Any, *, finished: bool) -> None:
    """What the model says of how the try ran: the fast path kept or left, shapes compiled on the way.

    A try that failed before the model started its call leaves `last_run` as it was (`stale`): then
    the entry keeps the path the try was meant to run.
    """
    run = getattr(model, "last_run", None)
    if run is None or run is stale:
        if finished:  # a model that does not report: the fast path cannot be vouched for
            entry["accelerated"] = entry["accelerated"] and run is not None
        return
    if entry["accelerated"] and (finished or run.get("fell_back")):
        entry["accelerated"] = bool(run.get("accelerated", False))
    if run.get("compiled"):
        entry.update(compiled=list(run["compiled"]), compile_seconds=run.get("compile_seconds"))
    if run.get("fell_back"):
        entry["fell_back"] = run["fell_back"]
    if run.get("vae_float32"):  # NaN or Inf decoded in half precision: the try ran again with the VAE in float32
        entry["vae_float32"] = True


__all__ = [
    "SAVERS", "Outcome", "Rung", "allocated_bytes", "decode_chunk_for", "free_memory", "generate",
    "gpu_budget_bytes", "is_oom", "memory_model_for", "plan_rungs",
]
