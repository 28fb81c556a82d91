"""Will this model fit this card at this size, and how: a plan from the model's configs alone.

`plan()` builds the pipeline on the meta device (sizing.py), lets the family's adapter plan the
size and frame count as it would for a job, replays one denoising step and the decode at that
size, and asks placement.py which placement fits the budget less the margin. It reads no weights
(a folder holding only `model_index.json` and each component's `config.json` is enough) and needs
no GPU: `i2v-daemon plan`, `doctor` and the worker all ask it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from i2v_daemon.errors import ConfigError, I2VError, first_line
from i2v_daemon.models import gpu, loader, placement, replay_cache, sizing
from i2v_daemon.models.memory import DEFAULT_MARGIN, GIB

#: When no image is given, sizes are planned for a landscape 16:9 picture.
DEFAULT_IMAGE_SIZE = (1280, 720)


@dataclass
class Plan:
    """The answer to "will it fit, and how" for one model, card budget and job size."""

    model: str
    family: str
    dtype: str
    budget_bytes: int
    margin: float
    width: int
    height: int
    num_frames: int
    components: dict[str, sizing.ComponentSize]
    costs: placement.Costs
    predictions: list[placement.Prediction]
    chosen: placement.Prediction | None
    notes: list[str] = field(default_factory=list)
    smaller: list[dict[str, Any]] = field(default_factory=list)  # the sizes a job would step down to

    @property
    def limit_bytes(self) -> float:
        return self.budget_bytes * (1 - self.margin)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "family": self.family, "dtype": self.dtype, "budget_bytes": self.budget_bytes,
            "margin": self.margin, "width": self.width, "height": self.height, "num_frames": self.num_frames,
            "weights": {name: {"class": c.class_name, "params": c.params, "bytes": c.bytes, "dtype": c.dtype}
                        for name, c in self.components.items()},
            "activation_bytes": {"denoise_step": self.costs.denoise, "decode": self.costs.decode,
                                 "cudnn_workspace": self.costs.workspace},
            "placements": [p.as_dict() for p in self.predictions],
            "chosen": self.chosen.as_dict() if self.chosen else None,
            "smaller": self.smaller, "notes": self.notes,
        }


def weights_of(components: dict[str, sizing.ComponentSize]) -> placement.Weights:
    denoisers = [c for c in components.values() if c.role == "denoiser"]
    biggest = max(denoisers, key=lambda c: c.bytes, default=None)
    return placement.Weights(
        encoders=[c.bytes for c in components.values() if c.role == "encoder"],
        denoisers=[c.bytes for c in denoisers],
        vae=sum(c.bytes for c in components.values() if c.role == "vae"),
        denoiser_rest=(biggest.bytes - biggest.blocks_bytes) if biggest else 0,
        largest_block=max((c.largest_block_bytes for c in denoisers), default=0),
        largest_leaf=max((c.largest_leaf_bytes for c in denoisers), default=0),
        castable=[c.castable_bytes for c in denoisers],
        encoder_leaf=max((c.largest_leaf_bytes for c in components.values() if c.role == "encoder"), default=0),
    )


@lru_cache(maxsize=64)
def _costs(folder: str, dtype: str, width: int, height: int, num_frames: int) -> placement.Costs:
    """One step's and the decode's activation peaks at this size: replayed on meta tensors, or as kept on disk."""
    adapter = loader.adapter_class(folder)
    kept_as = replay_cache.key(Path(folder), family=adapter.__name__, dtype=dtype, width=width, height=height,
                               num_frames=num_frames)
    kept = replay_cache.get(kept_as)
    if kept is not None and set(kept) == {"denoise", "decode"}:
        return placement.Costs(denoise=kept["denoise"], decode=kept["decode"])
    meta = sizing.meta_pipeline(folder, dtype, adapter.float32_components)
    try:
        denoise = sizing.replay_peak(adapter.meta_step(meta.pipeline, width, height, num_frames))
        decode = sizing.replay_peak(adapter.meta_decode(meta.pipeline, width, height, num_frames))
    except I2VError:
        raise
    except Exception as err:  # a config this family's replay does not understand
        raise ConfigError(
            f"model {folder!r}: cannot work out the memory of a {width}x{height}, {num_frames}-frame job from its "
            f"configs ({first_line(err, with_type=True)}); please report it with the folder's config.json files"
        ) from None
    replay_cache.put(kept_as, {"denoise": denoise, "decode": decode})
    return placement.Costs(denoise=denoise, decode=decode)


def _with_workspace(costs: placement.Costs, autotune: bool) -> placement.Costs:
    return dataclasses.replace(costs, workspace=gpu.cudnn_workspace_bytes() if autotune else 0)


def meta_model(model: str, dtype: str = "auto") -> tuple[Any, sizing.MetaPipeline, str]:
    """The family's adapter around a meta-device pipeline of `model` (a local folder), and the dtype used."""
    folder = loader.local_folder(model)
    if folder is None:
        raise ConfigError(f"model {model!r}: `plan` needs a local folder (the configs are enough, no weights)")
    family = loader.detect_family(str(folder))
    resolved = loader.resolve_dtype(dtype, "cuda", family)  # planned for a GPU, wherever it runs
    adapter = loader.adapter_class(str(folder))
    meta = sizing.meta_pipeline(folder, resolved, adapter.float32_components)
    try:
        model_view = adapter(str(folder), device="meta", dtype=resolved, pipeline=meta.pipeline)
    except I2VError:
        raise
    except Exception as err:
        raise ConfigError(f"model {model!r}: its configs do not make a {family} pipeline ({first_line(err)})") from None
    return model_view, meta, resolved


def plan(
    model: str, *, budget_bytes: int, num_frames: int, resolution: int = 512, width: int | None = None,
    height: int | None = None, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, ladder: list[int] | None = None,
    dtype: str = "auto", weights: str = "auto", allow_fp8_fallback: bool = False, margin: float = DEFAULT_MARGIN,
    autotune: bool = False,
) -> Plan:
    """The placement a job of this size would start with on a card of `budget_bytes`, and why.

    `autotune`: cuDNN autotuning is on where the job runs (the fast path on a GPU): its workspace cap is
    counted on top of the denoising step and the decode.
    """
    view, meta, resolved = meta_model(model, dtype)
    size = view.plan_size(image_size, resolution, width, height)
    frames = view.plan_frames(num_frames)
    notes = [*size.notes, *frames.notes]
    fp8 = "only" if weights == "fp8" else ("fallback" if allow_fp8_fallback else "no")
    weights_ = weights_of(meta.components)
    limit = budget_bytes * (1 - margin)

    def at(w: int, h: int) -> tuple[placement.Costs, list[placement.Prediction]]:
        costs = _with_workspace(_costs(str(meta.folder), resolved, w, h, frames.num_frames), autotune)
        return costs, placement.predictions(weights_, costs, limit, fp8=fp8)

    costs, preds = at(size.width, size.height)
    chosen = placement.choose(preds)
    smaller: list[dict[str, Any]] = []
    short = min(size.width, size.height)
    for r in ladder or []:
        if r >= short:
            continue
        step = view.plan_size((size.width, size.height), r, None, None)
        if min(step.width, step.height) >= short or any(s["width"] == step.width for s in smaller):
            continue
        _, step_preds = at(step.width, step.height)
        pick = placement.choose(step_preds)
        smaller.append({"width": step.width, "height": step.height,
                        "chosen": pick.as_dict() if pick else None})
    return Plan(
        model=model, family=view.info.family, dtype=resolved, budget_bytes=budget_bytes, margin=margin,
        width=size.width, height=size.height, num_frames=frames.num_frames, components=meta.components,
        costs=costs, predictions=preds, chosen=chosen, notes=notes, smaller=smaller,
    )


@dataclass(frozen=True)
class Need:
    """The smallest card a job can run on: its leanest placement at the smallest size it may step down to."""

    budget_bytes: int  # the card's budget that placement needs: its predicted peak plus the margin
    placement: str  # the leanest placement's name (fp8 variants carry "+fp8")
    peak_bytes: int
    width: int
    height: int
    num_frames: int

    def describe(self) -> str:
        return (f"{gib(self.budget_bytes)} ({self.placement} at {self.width}x{self.height}, {self.num_frames} frames, "
                f"predicted peak {gib(self.peak_bytes)})")

    def as_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "placement": self.placement, "peak_bytes": self.peak_bytes,
                "width": self.width, "height": self.height, "num_frames": self.num_frames}


def need(
    model: str, *, num_frames: int, resolution: int = 512, width: int | None = None, height: int | None = None,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, ladder: list[int] | None = None, dtype: str = "auto",
    weights: str = "auto", margin: float = DEFAULT_MARGIN, autotune: bool = False,
) -> Need:
    """The least a card must offer for this job to run at all, from the model's configs alone.

    The job may step down to the smallest rung of `ladder` below its size (the out-of-memory ladder's
    last resort) and to any placement; the need is the leanest of those, with `margin` of the card kept
    free as a job keeps it. fp8 storage counts only with `weights = "fp8"`: `allow_fp8_fallback` decides
    at load, for the largest preset, and the ladder never switches a loaded model to fp8.
    """
    view, meta, resolved = meta_model(model, dtype)
    size = view.plan_size(image_size, resolution, width, height)
    frames = view.plan_frames(num_frames).num_frames
    w, h = size.width, size.height
    lower = [r for r in ladder or [] if r < min(w, h)]
    if lower:
        step = view.plan_size((w, h), min(lower), None, None)
        w, h = step.width, step.height
    fp8 = "only" if weights == "fp8" else "no"
    costs = _with_workspace(_costs(str(meta.folder), resolved, w, h, frames), autotune)
    leanest = min(placement.predictions(weights_of(meta.components), costs, 0, fp8=fp8), key=lambda p: p.peak_bytes)
    return Need(budget_bytes=math.ceil(leanest.peak_bytes / (1 - margin)), placement=leanest.name,
                peak_bytes=leanest.peak_bytes, width=w, height=h, num_frames=frames)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"
