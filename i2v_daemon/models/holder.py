"""Keeps models warm across jobs (each with its memory model), loading on first use, evicting the least recently used.

A sidecar's `model` names one of the configured models ("default" is the `model` setting). On a
GPU, other models stay loaded only while all their weights together leave at least half of the
VRAM budget to the running job; on the CPU at most `max_loaded` stay loaded.

With `accelerate` on (the default on a GPU), each model gets the fast path when it loads, the
compile cache under the state folder is loaded once, and `warm_up` can compile the presets'
shapes before the first job. An idle accelerated model on a GPU is parked in host memory
rather than closed, so its compiled graphs survive and it returns in seconds.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from i2v_daemon.errors import ConfigError, EnvironmentProblem, GenerationError, I2VError, InputError
from i2v_daemon.logs import get_logger
from i2v_daemon.params import NEEDS_LORA
from i2v_daemon.weights import Weights

DEFAULT = "default"
#: On a GPU, the share of the budget that warm models' weights may take together.
WARM_SHARE = 0.5
#: The image shape warm-up plans for when the history has none: 16:9, the commonest camera frame.
WARM_UP_IMAGE = (1280, 720)
#: Park an idle model in host memory only while this much stays free beside it.
PARK_HEADROOM = 2 * 2**30

#: Reported to `warm_up`'s callback after each shape: (shapes done, shapes in all, what is next or "done").
WarmUpProgress = Callable[[int, int, str], None]


@dataclass
class _Warm:
    model: Any  # a loaded VideoModel (or its test seam)
    memory: Any  # its MemoryModel (CUDA only)
    resident_bytes: int  # what loading it added to the GPU (0 on the CPU)
    last_used: float
    parked: bool = False  # weights in host memory, pipeline and compiled graphs kept
    weights: Weights = field(default_factory=Weights)  # what it was loaded with (it may have stepped to fp8 since)

    def serves(self, wanted: Weights) -> bool:
        """Whether a job asking for `wanted` weights can run on this model as it is."""
        now = getattr(self.model.info, "weights", None)
        return self.weights.same_as(wanted) or (isinstance(now, Weights) and now.same_as(wanted))


@dataclass(frozen=True)
class WarmShape:
    """A shape to compile before the first job: a preset's resolution, frames and guidance (CFG or not)."""

    resolution: int
    num_frames: int
    guidance_scale: float = 9.0


def resolve_accelerate(accelerate: str, device: str) -> bool:
    """`auto`: on for CUDA, off on the CPU; `on` forces it (how CI checks it on a CPU); `off`: plain diffusers."""
    if accelerate not in ("auto", "on", "off"):
        raise ConfigError(f"accelerate {accelerate!r} is not one of auto, on, off")
    return accelerate == "on" or (accelerate == "auto" and device.startswith("cuda"))


class ModelHolder:
    def __init__(
        self, model: str, device: str = "auto", dtype: str = "auto", *, vram_budget_gib: float | None = None,
        memory_margin: float = 0.10, history: Callable[[], Iterable[dict[str, Any]]] | None = None,
        models: Mapping[str, str] | None = None, max_loaded: int = 1, accelerate: str = "auto",
        compile_cache_dir: Path | None = None, warm_shapes: Sequence[WarmShape] = (),
        cuda_graphs: bool = False, weights: Mapping[str, Weights] | None = None, allow_fp8_fallback: bool = False,
    ) -> None:
        self.model_id = model
        self.choices: dict[str, str] = {**(models or {}), DEFAULT: model}  # name -> repo id or folder
        #: name -> the weights it loads with unless a job's preset asks for others
        self.weights: dict[str, Weights] = {name: (weights or {}).get(name, Weights()) for name in self.choices}
        #: whether a placement may step `auto` weights down to fp8 (model.use_fp8()) to fit a job
        self.allow_fp8_fallback = allow_fp8_fallback
        self.device = device
        self.dtype = dtype
        self.vram_budget_gib = vram_budget_gib
        self.memory_margin = memory_margin
        self.max_loaded = max(1, max_loaded)
        self.accelerate = accelerate
        self.cuda_graphs = cuda_graphs
        self.warm_shapes = list(warm_shapes)
        self._history = history  # recorded attempts, to refit the memory model after a (re)load
        self._warm: OrderedDict[str, _Warm] = OrderedDict()  # least recently used first
        self.last_used = time.monotonic()
        self._lock = threading.RLock()
        self.compile_cache: Any = None  # a CompileCache once accelerate is on
        if compile_cache_dir is not None and _might_accelerate(accelerate, device):
            from i2v_daemon.models.compile_cache import CompileCache

            # Before torch is imported where possible: Inductor and Triton read their folders once.
            self.compile_cache = CompileCache(Path(compile_cache_dir))
            self.compile_cache.activate()
        self._cache_loaded = False

    @classmethod
    def from_settings(
        cls, settings: Any, *, history: Callable[[], Iterable[dict[str, Any]]] | None = None,
    ) -> ModelHolder:
        """The holder the daemon uses, built from its settings (the one place that reads them for models/)."""
        presets = settings.all_presets() if hasattr(settings, "all_presets") else {}
        # Not the presets with a LoRA: their graphs hold the adapter, compiled at their first job.
        shapes = [WarmShape(p.resolution, p.num_frames, p.guidance_scale) for name, p in presets.items()
                  if p.lora is None and name not in NEEDS_LORA]
        return cls(
            settings.model, settings.device, settings.dtype, vram_budget_gib=settings.vram_budget_gib,
            memory_margin=settings.memory_margin, history=history, models=settings.model_choices(),
            max_loaded=settings.max_loaded_models, accelerate=getattr(settings, "accelerate", "auto"),
            compile_cache_dir=Path(settings.data_dir) / "cache" / "compile", warm_shapes=shapes,
            weights=settings.model_weights(), allow_fp8_fallback=settings.allow_fp8_fallback,
        )

    @property
    def current(self) -> Any:
        """The model used last (the one the running job holds), or None when none is loaded."""
        return next(reversed(self._warm.values())).model if self._warm else None

    @property
    def memory(self) -> Any:
        """The memory model of `current` (CUDA only)."""
        return next(reversed(self._warm.values())).memory if self._warm else None

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first (parked ones included)."""
        return list(self._warm)

    def parked(self) -> list[str]:
        """Names of the models parked in host memory."""
        return [n for n, w in self._warm.items() if w.parked]

    def get(self, name: str = DEFAULT, weights: str | None = None) -> Any:
        """The model called `name`, warm, loading it (and making room) the first time.

        `weights` is the job's preset's (None: the model's own). A warm model with other weights is
        closed and loaded again with these: a precision is chosen at load, and two copies of one model
        would take the room the smaller weights were asked for to free. The default model failing to
        load is a ConfigError (the daemon cannot serve); another one is this job's failure, and the
        daemon goes on serving the rest.
        """
        if name not in self.choices:
            raise InputError(
                f"model {name!r} is not (or no longer) in the config's models; "
                f"use one of {', '.join(sorted(self.choices))}"
            )
        from i2v_daemon.models import gpu

        wanted = self.weights[name].asking(weights)
        with self._lock:
            self.last_used = now = time.monotonic()
            warm = self._warm.get(name)
            if warm is not None and not warm.serves(wanted):
                self._evict(name)
                warm = None
            if warm is not None and warm.parked:
                self._unpark(name, warm)
            if warm is None:
                warm = self._load(name, wanted)
                self._warm[name] = warm
            warm.last_used = now
            self._warm.move_to_end(name)
            if warm.memory is not None:  # the others' weights are resident too, or were evicted since
                warm.memory.resident_bytes = gpu.allocated_bytes(warm.model.device)
            return warm.model

    def touch(self) -> None:
        self.last_used = time.monotonic()
        if self._warm:
            next(reversed(self._warm.values())).last_used = self.last_used

    def info(self, name: str | None = None) -> dict[str, Any]:
        """What the manifest says about a model (without loading it); `name` None: the default."""
        name = name or DEFAULT
        warm = self._warm.get(name)
        if warm is None:
            configured = self.weights.get(name, Weights())
            return {"name": name, "id": self.choices.get(name), "family": None, "revision": None,
                    **configured.record()}
        info = warm.model.info
        weights = getattr(info, "weights", None)
        used = weights if isinstance(weights, Weights) else warm.weights
        return {"name": name, "id": info.model_id, "family": info.family, "revision": info.revision, **used.record()}

    def acceleration(self) -> dict[str, Any]:
        """The fast path's state, for doctor and the log: on or off and why, cache folder, compiled shapes."""
        out: dict[str, Any] = {"setting": self.accelerate, "models": {}}
        if self.compile_cache is not None:
            out.update(cache_dir=str(self.compile_cache.folder), cache_notes=list(self.compile_cache.notes),
                       cache_loaded=dict(self.compile_cache.loaded))
        for name, warm in self._warm.items():
            acc = getattr(warm.model, "accelerator", None)
            out["models"][name] = {
                "accelerated": bool(getattr(warm.model.info, "accelerated", False)), "parked": warm.parked,
                "graphs": acc.graphs if acc else 0, "shapes": acc.compiled_shapes() if acc else [],
                "prepared": list(acc.prepared) if acc else [],
            }
        return out

    def unload_if_idle(self, idle_seconds: float, busy: bool) -> bool:
        """Free every model unused for `idle_seconds`; the next job that names one loads it again.

        An accelerated model on a GPU is parked in host memory instead (when there is room), so
        its compiled graphs are not thrown away; the GPU memory is freed either way.
        """
        if idle_seconds <= 0 or busy:
            return False
        with self._lock:  # checked and unloaded under the lock that get() holds: no job starts in between
            now = time.monotonic()
            everything = now - self.last_used >= idle_seconds  # no job at all for that long
            idle = [n for n, w in self._warm.items()
                    if not w.parked and (everything or now - w.last_used >= idle_seconds)]
            for name in idle:
                if self._can_park(self._warm[name]):
                    self._park(name)
                else:
                    self._evict(name)
        return bool(idle)

    def unload(self) -> None:
        with self._lock:
            for name in list(self._warm):
                self._evict(name)

    # ---- the fast path's warm-up ----------------------------------------------------------------

    def warm_up(self, on_progress: WarmUpProgress | None = None, name: str = DEFAULT) -> list[dict[str, Any]]:
        """Compile the shapes the next jobs will most likely have, before the first one; one entry per shape.

        Shapes: the configured presets at the image shape seen most often in recent jobs (16:9
        without any), then the most frequent recent shapes, at most the graphs kept per model.
        `on_progress(done, total, next)` runs before each shape and at the end: a cold compile of
        one shape can take minutes, so whoever feeds a watchdog should also keep a timer running.
        Does nothing (returns []) when the model is not accelerated.
        """
        from PIL import Image

        from i2v_daemon.models.base import GenerationRequest

        model = self.get(name)
        acc = getattr(model, "accelerator", None)
        if acc is None:
            return []
        shapes = self._shapes_to_warm(model)
        report = on_progress or (lambda _d, _t, _n: None)
        done: list[dict[str, Any]] = []
        image = Image.new("RGB", WARM_UP_IMAGE, (127, 127, 127))
        for i, (w, h, frames, guidance) in enumerate(shapes):
            label = f"{w}x{h}x{frames}"
            report(i, len(shapes), label)
            t0 = time.monotonic()
            request = GenerationRequest(
                image=image, prompt="", negative_prompt="", width=w, height=h, num_frames=frames,
                steps=model.info.min_steps, guidance_scale=guidance, fps=8, seed=0, accelerated=True,
            )
            try:
                model.generate(request, lambda _s, _t: None)
            except Exception as err:  # out of memory, or a shape this card cannot take: the job will tell
                done.append({"shape": label, "error": f"{type(err).__name__}: {str(err)[:200]}"})
                from i2v_daemon.models import gpu

                gpu.free_memory(model.device)
                continue
            run = dict(getattr(model, "last_run", {}))
            done.append({"shape": label, "seconds": round(time.monotonic() - t0, 3), **run})
            self.touch()
        report(len(shapes), len(shapes), "done")
        return done

    def _shapes_to_warm(self, model: Any) -> list[tuple[int, int, int, float]]:
        """(width, height, frames, guidance) to compile: the presets first, then the commonest recent shapes."""
        from i2v_daemon.models.accelerate import MAX_GRAPHS

        recent: dict[tuple[int, int, int], int] = {}
        if self._history is not None:
            for t in self._history():
                if t.get("outcome") == "succeeded" and t.get("family", "i2vgen-xl") == model.info.family:
                    shape = (int(t["width"]), int(t["height"]), int(t["num_frames"]))
                    recent[shape] = recent.get(shape, 0) + 1
        common = sorted(recent, key=lambda s: -recent[s])
        aspect = (common[0][0], common[0][1]) if common else WARM_UP_IMAGE
        out: list[tuple[int, int, int, float]] = []
        seen: set[tuple[int, int, int, bool]] = set()

        def add(w: int, h: int, frames: int, guidance: float) -> None:
            frames = model.plan_frames(frames).num_frames
            if (w, h, frames, guidance > 1) not in seen and len(out) < MAX_GRAPHS:
                seen.add((w, h, frames, guidance > 1))
                out.append((w, h, frames, guidance))

        for preset in self.warm_shapes:
            with contextlib.suppress(I2VError):
                plan = model.plan_size(aspect, preset.resolution, None, None)
                add(plan.width, plan.height, preset.num_frames, preset.guidance_scale)
        default_guidance = self.warm_shapes[0].guidance_scale if self.warm_shapes else 9.0
        for w, h, frames in common:
            add(w, h, frames, default_guidance)
        return out

    # ---- loading and making room ----------------------------------------------------------------

    def _load(self, name: str, weights: Weights) -> _Warm:
        from i2v_daemon.models import gpu
        from i2v_daemon.models.loader import load_model, resolve_device, weights_bytes

        model_id = self.choices[name]
        try:
            device = resolve_device(self.device)
        except I2VError as err:
            raise ConfigError(f"model: {err}") from err
        self._make_room(device, weights_bytes(model_id, "float32" if "32" in self.dtype or device == "cpu" else "half"))
        before = gpu.allocated_bytes(device)
        planned = self._plan_placement(model_id, device, weights)
        placement = planned.get("placement", "gpu")
        try:
            model = None
            try:
                model = load_model(model_id, self.device, self.dtype, weights, placement=placement)
            except Exception as err:
                if not (gpu.is_oom(err) and self._warm):
                    raise
            if model is None:  # out of memory beside the warm ones (the estimate was short): all out, once more
                for other in list(self._warm):
                    self._evict(other)
                gpu.free_memory(device)
                model = load_model(model_id, self.device, self.dtype, weights, placement=placement)
        except EnvironmentProblem:
            raise  # cannot be fetched now: the daemon keeps the jobs and tries again later
        except I2VError as err:
            if name == DEFAULT:
                raise ConfigError(f"model: {err}") from err
            raise GenerationError(
                f"model {name!r} ({model_id}) cannot be loaded: {err} Fix `models.{name}` in the config."
            ) from err
        model.placement_plan = planned
        if planned.get("fp8") and model.use_fp8():  # only where the user allowed it (weights, allow_fp8_fallback)
            get_logger().info("weights_stored_in_fp8", model=model_id, why="the planned placement needs the room")
        self._accelerate(model)
        memory = gpu.memory_model_for(model, self.vram_budget_gib, self.memory_margin)
        if memory is not None and self._history is not None:
            family = model.info.family
            memory.learn(
                t for t in self._history()
                if t.get("gpu") == gpu.gpu_name(model.device) and t.get("family", "i2vgen-xl") == family
                and t.get("placement", "gpu") == model.placement  # per family and placement
            )
        return _Warm(_test_seam(model), memory, max(0, gpu.allocated_bytes(device) - before), time.monotonic(),
                     weights=weights)

    def card_budget(self) -> int | None:
        """The bytes this worker's card offers a job, or None where there is no card to plan for (the CPU).

        The card's memory, or `vram_budget_gib` of it where that is smaller; on the CPU the test seam
        I2V_TEST_DEVICE_BUDGET_GIB pretends a card of that size (and `vram_budget_gib` caps it as on a GPU).
        """
        from i2v_daemon.models.loader import resolve_device

        try:
            return self._budget(resolve_device(self.device))
        except I2VError:
            return None

    def _budget(self, device: str) -> int | None:
        from i2v_daemon.models import gpu
        from i2v_daemon.models.memory import GIB

        seam = os.environ.get("I2V_TEST_DEVICE_BUDGET_GIB")
        if seam:
            card = int(float(seam) * GIB)
            return min(card, int(self.vram_budget_gib * GIB)) if self.vram_budget_gib else card
        if device.startswith("cuda"):
            return gpu.gpu_budget_bytes(device, self.vram_budget_gib)
        return None

    def need(self, name: str, params: Any, image_size: tuple[int, int], ladder: list[int]) -> Any:
        """The smallest card this job can run on (`planner.Need`), from the model's configs; None: unknown.

        Unknown where the model's configs are not on this host (a Hub model not yet downloaded) or its
        configs cannot be planned; the job is then left to the out-of-memory ladder, as before plans.
        """
        from i2v_daemon.models import loader, planner

        model_id = self.choices.get(name)
        if model_id is None:
            return None
        weights = self.weights[name].asking(getattr(params, "weights", None))
        try:
            folder = loader.config_folder(model_id)
            if folder is None:
                return None
            device = loader.resolve_device("auto") if self.device == "auto" else self.device
            return planner.need(
                str(folder), num_frames=params.num_frames, resolution=params.resolution, width=params.width,
                height=params.height, image_size=image_size, ladder=ladder, dtype=self.dtype,
                weights=weights.kind, margin=self.memory_margin, autotune=self._autotunes(device, weights.kind),
            )
        except I2VError as err:  # an unplannable job is left to the ladder, never failed by the plan
            get_logger().warning("need_not_planned", model=model_id, error=str(err))
            return None

    def autotunes(self, weights: str = "auto") -> bool:
        """Whether cuDNN autotunes where this worker's jobs run (its workspace then counts in each plan)."""
        from i2v_daemon.models.loader import resolve_device

        try:
            return self._autotunes(resolve_device(self.device), weights)
        except I2VError:
            return False

    def _autotunes(self, device: str, weights: str) -> bool:
        """cuDNN autotuning runs where the job does: the fast path on a GPU (models/accelerate.py), which
        only a model with its own dtype's weights takes (adapter.enable_acceleration)."""
        return device.startswith("cuda") and resolve_accelerate(self.accelerate, device) and weights == "auto"

    def _plan_placement(self, model_id: str, device: str, weights: Weights) -> dict[str, Any]:
        """Where the weights go, decided before they are loaded (models/planner.py), for the largest preset.

        On a GPU the budget is the card's (or `vram_budget_gib`); on the CPU nothing is planned unless
        the test seam I2V_TEST_DEVICE_BUDGET_GIB says how big a card to pretend it is. {} when no plan
        is made (the CPU, a model without configs at hand); then everything goes on the device.
        """
        from i2v_daemon.models import loader, planner

        budget = self._budget(device)
        if budget is None or not self.warm_shapes:
            return {}
        shape = max(self.warm_shapes, key=lambda s: s.resolution * s.resolution * s.num_frames)
        try:
            folder = loader.config_folder(model_id)
            if folder is None:
                return {}
            plan = planner.plan(str(folder), budget_bytes=budget, resolution=shape.resolution,
                                num_frames=shape.num_frames, dtype=self.dtype if device.startswith("cuda") else
                                "float32", margin=self.memory_margin, weights=weights.kind,
                                allow_fp8_fallback=self.allow_fp8_fallback and weights.kind == "auto",
                                autotune=self._autotunes(device, weights.kind))
        except I2VError as err:  # a plan that cannot be made costs the plan, never the model
            get_logger().warning("placement_not_planned", model=model_id, error=str(err))
            return {}
        chosen = plan.chosen or plan.predictions[-1]  # nothing fits: the leanest
        out = {**chosen.as_dict(), "planned_for": f"{plan.width}x{plan.height}x{plan.num_frames}",
               "budget_bytes": budget}
        get_logger().info("placement_planned", model=model_id, **out)
        return out

    def _accelerate(self, model: Any) -> None:
        """Give a freshly loaded model the fast path when `accelerate` says so, warm from the compile cache."""
        if not resolve_accelerate(self.accelerate, model.device) or not hasattr(model, "enable_acceleration"):
            return
        if self.compile_cache is not None and not self._cache_loaded:
            self._cache_loaded = True
            self.compile_cache.load()
        on_compiled = self._save_compile_cache if self.compile_cache is not None else None
        model.enable_acceleration(on_compiled=on_compiled, cuda_graphs=self.cuda_graphs)

    def _save_compile_cache(self) -> None:
        """After a new graph: keep the portable artefacts, so a restart or a second daemon starts warm."""
        try:
            self.compile_cache.save()
        except Exception as err:  # a full disk must not fail the job that compiled
            self.compile_cache.notes.append(f"saving the compile cache failed: {type(err).__name__}: {err}")

    def _make_room(self, device: str, need: int | None) -> None:
        """Evict least recently used models until the next one fits beside the rest."""
        if not device.startswith("cuda"):
            while len(self._warm) >= self.max_loaded:
                self._evict(next(iter(self._warm)))
            return
        from i2v_daemon.models import gpu

        budget = gpu.gpu_budget_bytes(device, self.vram_budget_gib)
        if need is None:  # unknown size: assume it is as large as the largest we know of
            need = max((w.resident_bytes for w in self._warm.values()), default=0)
        while self._on_gpu() and self._on_gpu_bytes() + need > budget * WARM_SHARE:
            self._evict(self._on_gpu()[0])

    def _on_gpu(self) -> list[str]:
        return [n for n, w in self._warm.items() if not w.parked]

    def _on_gpu_bytes(self) -> int:
        return sum(w.resident_bytes for w in self._warm.values() if not w.parked)

    def _evict(self, name: str) -> None:
        from i2v_daemon.models import gpu

        warm = self._warm.pop(name)
        warm.model.close()
        gpu.free_memory(warm.model.device)

    # ---- parking: idle on a GPU without losing the compiled graphs --------------------------------

    def _can_park(self, warm: _Warm) -> bool:
        model = warm.model
        if not (model.device.startswith("cuda") and getattr(model.info, "accelerated", False)):
            return False
        if not hasattr(model, "park"):
            return False
        return _available_host_bytes() > warm.resident_bytes + PARK_HEADROOM

    def _park(self, name: str) -> None:
        from i2v_daemon.models import gpu

        warm = self._warm[name]
        warm.model.park()
        warm.parked = True
        gpu.free_memory(warm.model.device)

    def _unpark(self, name: str, warm: _Warm) -> None:
        """Back onto the GPU, making room first; out of memory beside the others: they go, once more."""
        from i2v_daemon.models import gpu

        self._make_room(warm.model.device, warm.resident_bytes)
        try:
            warm.model.unpark()
        except Exception as err:
            if not gpu.is_oom(err):
                raise
            for other in self._on_gpu():
                if other != name:
                    self._evict(other)
            gpu.free_memory(warm.model.device)
            warm.model.unpark()
        warm.parked = False


def _might_accelerate(accelerate: str, device: str) -> bool:
    """Whether the fast path can come on, told without importing torch (the cache must be set up first)."""
    if accelerate == "on":
        return True
    if accelerate != "auto" or device == "cpu":
        return False
    # "auto" or "cuda…": a GPU is likely where the NVIDIA driver is loaded; if torch then sees none,
    # nothing compiles and the variables set are harmless.
    return device.startswith("cuda") or os.path.exists("/proc/driver/nvidia/version")


def _available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where it cannot be read: then nothing is parked)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _test_seam(model: Any) -> Any:
    limit = os.environ.get("I2V_TEST_OOM_ABOVE_PIXEL_FRAMES")
    if not limit:
        return model
    from i2v_daemon.models.seams import OOMAbove

    return OOMAbove(model, int(limit))
