"""The GPU test seam: a real model that raises the real `torch.cuda.OutOfMemoryError` above a budget.

It lets every branch of the OOM ladder run on a CPU. Savers raise the budget by a factor each, so
a test can tell "fits with savers" from "fits only smaller". Enabled in the daemon only by the
test variable `I2V_TEST_OOM_ABOVE_PIXEL_FRAMES` (see holder.py); never in normal operation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from i2v_daemon.models.base import GenerationRequest, StepCallback


class OOMAbove:
    """Wraps a VideoModel; `generate` raises OutOfMemoryError when w×h×frames exceeds the budget."""

    def __init__(self, inner: Any, pixel_frames: int, saver_factor: float = 1.0) -> None:
        self.inner = inner
        self.pixel_frames = pixel_frames
        self.saver_factor = saver_factor
        self.calls: list[tuple[int, int, int, tuple[str, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def allowed(self, savers: tuple[str, ...]) -> float:
        return self.pixel_frames * self.saver_factor ** len(savers)

    def generate(self, request: GenerationRequest, on_step: StepCallback) -> np.ndarray:
        self.calls.append((request.width, request.height, request.num_frames, request.savers))
        if request.width * request.height * request.num_frames > self.allowed(request.savers):
            # Fail part-way, as a real OOM does, after some work and a step of progress.
            on_step(1, request.steps)
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {request.width * request.height * 4} bytes "
                "(test seam: OOMAbove)"
            )
        return self.inner.generate(request, on_step)
