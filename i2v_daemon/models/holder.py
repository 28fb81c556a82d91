"""Keeps models warm across jobs (each with its memory model), loading on first use, evicting the least recently used.

A sidecar's `model` names one of the configured models ("default" is the `model` setting). On a
GPU, other models stay loaded only while all their weights together leave at least half of the
VRAM budget to the running job; on the CPU at most `max_loaded` stay loaded.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from i2v_daemon.errors import ConfigError, GenerationError, I2VError, InputError

DEFAULT = "default"
#: On a GPU, the share of the budget that warm models' weights may take together.
WARM_SHARE = 0.5


@dataclass
class _Warm:
    model: Any  # a loaded VideoModel (or its test seam)
    memory: Any  # its MemoryModel (CUDA only)
    resident_bytes: int  # what loading it added to the GPU (0 on the CPU)
    last_used: float


class ModelHolder:
    def __init__(
        self, model: str, device: str = "auto", dtype: str = "auto", *, vram_budget_gib: float | None = None,
        memory_margin: float = 0.10, history: Callable[[], Iterable[dict[str, Any]]] | None = None,
        models: Mapping[str, str] | None = None, max_loaded: int = 1,
    ) -> None:
        self.model_id = model
        self.choices: dict[str, str] = {**(models or {}), DEFAULT: model}  # name -> repo id or folder
        self.device = device
        self.dtype = dtype
        self.vram_budget_gib = vram_budget_gib
        self.memory_margin = memory_margin
        self.max_loaded = max(1, max_loaded)
        self._history = history  # recorded attempts, to refit the memory model after a (re)load
        self._warm: OrderedDict[str, _Warm] = OrderedDict()  # least recently used first
        self.last_used = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: Any, *, history: Callable[[], Iterable[dict[str, Any]]] | None = None,
    ) -> ModelHolder:
        """The holder the daemon uses, built from its settings (the one place that reads them for models/)."""
        return cls(
            settings.model, settings.device, settings.dtype, vram_budget_gib=settings.vram_budget_gib,
            memory_margin=settings.memory_margin, history=history, models=settings.models,
            max_loaded=settings.max_loaded_models,
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
        """Names of the loaded models, least recently used first."""
        return list(self._warm)

    def get(self, name: str = DEFAULT) -> Any:
        """The model called `name`, warm, loading it (and making room) the first time.

        The default model failing to load is a ConfigError (the daemon cannot serve); another one
        is this job's failure, and the daemon goes on serving the rest.
        """
        if name not in self.choices:
            raise InputError(
                f"model {name!r} is not (or no longer) in the config's models; "
                f"use one of {', '.join(sorted(self.choices))}"
            )
        with self._lock:
            self.last_used = now = time.monotonic()
            warm = self._warm.get(name)
            if warm is None:
                warm = self._load(name)
                self._warm[name] = warm
            warm.last_used = now
            self._warm.move_to_end(name)
            if warm.memory is not None:  # the others' weights are resident too, or were evicted since
                from i2v_daemon.generate import allocated_bytes

                warm.memory.resident_bytes = allocated_bytes(warm.model.device)
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
            return {"name": name, "id": self.choices.get(name), "family": None, "revision": None}
        info = warm.model.info
        return {"name": name, "id": info.model_id, "family": info.family, "revision": info.revision}

    def unload_if_idle(self, idle_seconds: float, busy: bool) -> bool:
        """Free every model unused for `idle_seconds`; the next job that names one loads it again."""
        if idle_seconds <= 0 or busy:
            return False
        with self._lock:  # checked and unloaded under the lock that get() holds: no job starts in between
            now = time.monotonic()
            everything = now - self.last_used >= idle_seconds  # no job at all for that long
            idle = [n for n, w in self._warm.items() if everything or now - w.last_used >= idle_seconds]
            for name in idle:
                self._evict(name)
        return bool(idle)

    def unload(self) -> None:
        with self._lock:
            for name in list(self._warm):
                self._evict(name)

    # ---- loading and making room ----------------------------------------------------------------

    def _load(self, name: str) -> _Warm:
        from i2v_daemon.generate import allocated_bytes, free_memory, is_oom, memory_model_for
        from i2v_daemon.models.loader import load_model, resolve_device, weights_bytes

        model_id = self.choices[name]
        try:
            device = resolve_device(self.device)
        except I2VError as err:
            raise ConfigError(f"model: {err}") from err
        self._make_room(device, weights_bytes(model_id, "float32" if "32" in self.dtype or device == "cpu" else "half"))
        before = allocated_bytes(device)
        try:
            model = None
            try:
                model = load_model(model_id, self.device, self.dtype)
            except Exception as err:
                if not (is_oom(err) and self._warm):
                    raise
            if model is None:  # out of memory beside the warm ones (the estimate was short): all out, once more
                for other in list(self._warm):
                    self._evict(other)
                free_memory(device)
                model = load_model(model_id, self.device, self.dtype)
        except I2VError as err:
            if name == DEFAULT:
                raise ConfigError(f"model: {err}") from err
            raise GenerationError(
                f"model {name!r} ({model_id}) cannot be loaded: {err} Fix `models.{name}` in the config."
            ) from err
        memory = memory_model_for(model, self.vram_budget_gib, self.memory_margin)
        if memory is not None and self._history is not None:
            family = model.info.family
            memory.learn(
                t for t in self._history()
                if t.get("gpu") == _gpu(model) and t.get("family", "i2vgen-xl") == family
            )
        return _Warm(_test_seam(model), memory, max(0, allocated_bytes(device) - before), time.monotonic())

    def _make_room(self, device: str, need: int | None) -> None:
        """Evict least recently used models until the next one fits beside the rest."""
        if not device.startswith("cuda"):
            while len(self._warm) >= self.max_loaded:
                self._evict(next(iter(self._warm)))
            return
        from i2v_daemon.generate import gpu_budget_bytes

        budget = gpu_budget_bytes(device, self.vram_budget_gib)
        if need is None:  # unknown size: assume it is as large as the largest we know of
            need = max((w.resident_bytes for w in self._warm.values()), default=0)
        while self._warm and sum(w.resident_bytes for w in self._warm.values()) + need > budget * WARM_SHARE:
            self._evict(next(iter(self._warm)))

    def _evict(self, name: str) -> None:
        warm = self._warm.pop(name)
        warm.model.close()
        from i2v_daemon.generate import free_memory

        free_memory(warm.model.device)


def _gpu(model: Any) -> str | None:
    from i2v_daemon.generate import gpu_name

    return gpu_name(model.device)


def _test_seam(model: Any) -> Any:
    limit = os.environ.get("I2V_TEST_OOM_ABOVE_PIXEL_FRAMES")
    if not limit:
        return model
    from i2v_daemon.models.seams import OOMAbove

    return OOMAbove(model, int(limit))
