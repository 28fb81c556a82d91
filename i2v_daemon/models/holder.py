"""Keeps one model warm across jobs; loading happens on first use, not at import."""

from __future__ import annotations

import threading
import time
from typing import Any

from i2v_daemon.errors import ConfigError, I2VError


class ModelHolder:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto") -> None:
        self.model_id = model
        self.device = device
        self.dtype = dtype
        self.current: Any = None  # the loaded VideoModel, or None
        self.loaded_at: float | None = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        """The warm model, loading it the first time; a model that cannot load is a ConfigError."""
        with self._lock:
            if self.current is None:
                from i2v_daemon.models.loader import load_model  # torch and diffusers load here

                try:
                    self.current = load_model(self.model_id, self.device, self.dtype)
                except I2VError as err:
                    raise ConfigError(f"model: {err}") from err
                self.loaded_at = time.monotonic()
            return self.current

    def info(self) -> dict[str, Any]:
        """What the manifest says about the model (without loading it)."""
        if self.current is None:
            return {"id": self.model_id, "family": None, "revision": None}
        info = self.current.info
        return {"id": info.model_id, "family": info.family, "revision": info.revision}

    def unload(self) -> None:
        with self._lock:
            if self.current is not None:
                self.current.close()
                self.current = None
