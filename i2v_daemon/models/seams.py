"""The GPU test seam: a real model that raises the real `torch.cuda.OutOfMemoryError` above a budget.

It lets every branch of the OOM ladder run on a CPU. Savers raise the budget by a factor each, so
a test can tell "fits with savers" from "fits only smaller". Enabled in the daemon only by the
test variable `I2V_TEST_OOM_ABOVE_PIXEL_FRAMES` (see holder.py); never in normal operation.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from i2v_daemon.models.base import GenerationRequest, PhaseCallback, StepCallback


class OOMAbove:
    """Wraps a VideoModel; `generate` raises OutOfMemoryError when w×h×frames exceeds the budget.

    `fast_factor` scales the budget of accelerated tries (below 1: the fast path needs more memory),
    so a test can make only the fast path run out.
    """

    def __init__(self, inner: Any, pixel_frames: int, saver_factor: float = 1.0, fast_factor: float = 1.0,
                 placement_factor: float = 1.0) -> None:
        self.inner = inner
        self.pixel_frames = pixel_frames
        self.saver_factor = saver_factor
        self.fast_factor = fast_factor
        #: each placement after `gpu` (models/placement.py's order) multiplies the budget by this once more
        self.placement_factor = placement_factor
        self.placements: list[str] = []  # per call: where the weights were
        self.calls: list[tuple[int, int, int, tuple[str, ...]]] = []
        self.accelerated_calls: list[bool] = []
        #: A weak reference to the tensor each failing call allocated before it ran out: a test can
        #: check it is gone before the next try starts (nothing of a failed try may be kept alive).
        self.failed_allocations: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_start: list[int] = []  # per call: failed allocations still alive when it began

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def allowed(self, savers: tuple[str, ...], accelerated: bool = False) -> float:
        from i2v_daemon.models.placement import PLACEMENTS

        heavier = PLACEMENTS.index(getattr(self.inner, "placement", "gpu"))
        return (self.pixel_frames * self.saver_factor ** len(savers) * (self.fast_factor if accelerated else 1.0)
                * self.placement_factor**heavier)

    def generate(
        self, request: GenerationRequest, on_step: StepCallback, on_phase: PhaseCallback | None = None
    ) -> np.ndarray:
        self.alive_at_start.append(sum(ref() is not None for ref in self.failed_allocations))
        self.calls.append((request.width, request.height, request.num_frames, request.savers))
        self.accelerated_calls.append(request.accelerated)
        self.placements.append(getattr(self.inner, "placement", "gpu"))
        if request.width * request.height * request.num_frames > self.allowed(request.savers, request.accelerated):
            # Fail part-way, as a real OOM does: after allocating activations and a step of progress.
            activations = torch.empty(request.num_frames, 4, request.height // 8 or 1, request.width // 8 or 1)
            self.failed_allocations.append(weakref.ref(activations))
            on_step(1, request.steps)
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {activations.numel() * 4} bytes (test seam: OOMAbove)"
            )
        return self.inner.generate(request, on_step, on_phase)
