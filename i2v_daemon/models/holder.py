"""Keeps one model warm across jobs (and its memory model); loading happens on first use."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from i2v_daemon.errors import ConfigError, I2VError


class ModelHolder:
    def __init__(
        self, model: str, device: str = "auto", dtype: str = "auto", *, vram_budget_gib: float | None = None,
        memory_margin: float = 0.10, history: Callable[[], Iterable[dict[str, Any]]] | None = None,
    ) -> None:
        self.model_id = model
        self.device = device
        self.dtype = dtype
        self.vram_budget_gib = vram_budget_gib
        self.memory_margin = memory_margin
        self._history = history  # recorded attempts, to refit the memory model after a (re)load
        self.current: Any = None  # the loaded VideoModel, or None
        self.memory: Any = None  # its MemoryModel (CUDA only)
        self.last_used = time.monotonic()
        self._lock = threading.Lock()

    def get(self) -> Any:
        """The warm model, loading it the first time; a model that cannot load is a ConfigError."""
        with self._lock:
            self.last_used = time.monotonic()
            if self.current is None:
                from i2v_daemon.generate import memory_model_for  # torch and diffusers load here
                from i2v_daemon.models.loader import load_model

                try:
                    model = load_model(self.model_id, self.device, self.dtype)
                except I2VError as err:
                    raise ConfigError(f"model: {err}") from err
                self.memory = memory_model_for(model, self.vram_budget_gib, self.memory_margin)
                if self.memory is not None and self._history is not None:
                    self.memory.learn(t for t in self._history() if t.get("gpu") == _gpu(model))
                self.current = _test_seam(model)
            return self.current

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def info(self) -> dict[str, Any]:
        """What the manifest says about the model (without loading it)."""
        if self.current is None:
            return {"id": self.model_id, "family": None, "revision": None}
        info = self.current.info
        return {"id": info.model_id, "family": info.family, "revision": info.revision}

    def unload_if_idle(self, idle_seconds: float, busy: bool) -> bool:
        """Free the GPU after `idle_seconds` without a job; the next job loads it again."""
        if idle_seconds <= 0 or busy:
            return False
        with self._lock:  # checked and unloaded under the lock that get() holds: no job starts in between
            if self.current is None or time.monotonic() - self.last_used < idle_seconds:
                return False
            self._unload()
        return True

    def unload(self) -> None:
        with self._lock:
            self._unload()

    def _unload(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
            self.memory = None


def _gpu(model: Any) -> str | None:
    from i2v_daemon.generate import gpu_name

    return gpu_name(model.device)


def _test_seam(model: Any) -> Any:
    limit = os.environ.get("I2V_TEST_OOM_ABOVE_PIXEL_FRAMES")
    if not limit:
        return model
    from i2v_daemon.models.seams import OOMAbove

    return OOMAbove(model, int(limit))
