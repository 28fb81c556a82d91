"""A model of a job's peak VRAM, so the OOM ladder starts at the first rung that will fit.

Measured on an H200 (shared/anchors): plain I2VGen-XL in fp16 peaks at the resident weights plus
a cost that is linear in pixels × frames, 0.616 GiB per million pixel-frames, to within 1% from
512²×8 to 1024²×32 (attention runs through SDPA, so nothing is quadratic in the frame size):

    512²×8 → 5.98 GiB   512²×16 → 7.28   768²×24 → 13.42   1024²×32 → 25.37   (resident 4.7)

The daemon starts from those figures and refits the slope per (GPU, dtype, savers) from the
peaks it records in every attempt; an out-of-memory try is remembered as "this much did not fit".
Pure Python: no torch here, so it is cheap to test.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
#: bytes per pixel-frame above the resident weights (fp16, classifier-free guidance), from the anchors
ANCHOR_SLOPE = 0.616 * GIB / 1e6
#: resident weights of the released I2VGen-XL in fp16 (UNet 1.42 B, CLIP-H 632 M, text 340 M, VAE 84 M)
ANCHOR_RESIDENT = 4.68 * GIB
#: with model CPU offload only the UNet stays on the GPU while it denoises
OFFLOAD_RESIDENT = 2.65 * GIB
#: leave this share of the budget free: fragmentation, cuDNN workspaces, the CUDA context
DEFAULT_MARGIN = 0.10


def pixel_frames(width: int, height: int, num_frames: int) -> int:
    return width * height * num_frames


@dataclass
class MemoryModel:
    """peak(w, h, f, savers) ≈ resident(savers) + slope(savers) × w·h·f, refitted from attempts."""

    budget_bytes: int  # what this process may use: the card, or `vram_budget_gib`
    resident_bytes: int = ANCHOR_RESIDENT  # measured after loading, when known
    dtype_scale: float = 1.0  # float32 activations cost twice fp16/bf16
    margin: float = DEFAULT_MARGIN
    #: The prior before anything is learned: measured for I2VGen-XL only. None (another family):
    #: no prior, so every rung is tried until this family's own tries have been recorded.
    anchor_slope: float | None = ANCHOR_SLOPE
    slopes: dict[tuple[str, ...], float] = field(default_factory=dict)  # fitted per saver set
    too_big: dict[tuple[str, ...], int] = field(default_factory=dict)  # smallest pixel-frames that OOMed

    def resident(self, savers: tuple[str, ...]) -> float:
        if "cpu_offload" in savers:
            return min(self.resident_bytes, OFFLOAD_RESIDENT * self.dtype_scale)
        return self.resident_bytes

    def slope(self, savers: tuple[str, ...]) -> float:
        key = tuple(sorted(savers))
        if key in self.slopes:
            return self.slopes[key]
        # Unmeasured savers are assumed to save nothing: a prediction may be pessimistic, never rosy.
        if self.anchor_slope is None:
            return max(self.slopes.values(), default=0.0)
        return self.anchor_slope * self.dtype_scale

    def predict(self, width: int, height: int, num_frames: int, savers: tuple[str, ...] = ()) -> int:
        """Predicted peak bytes of one try."""
        return int(self.resident(savers) + self.slope(savers) * pixel_frames(width, height, num_frames))

    def fits(self, width: int, height: int, num_frames: int, savers: tuple[str, ...] = ()) -> bool:
        pf = pixel_frames(width, height, num_frames)
        failed = self.too_big.get(tuple(sorted(savers)))
        if failed is not None and pf >= failed:
            return False
        return self.predict(width, height, num_frames, savers) <= self.budget_bytes * (1 - self.margin)

    def learn(self, tries: Iterable[dict[str, Any]]) -> None:
        """Refit from recorded attempts (the manifest's `attempts` entries) on this budget."""
        ratios: dict[tuple[str, ...], list[float]] = {}
        for t in tries:
            savers = tuple(sorted(t.get("savers") or ()))
            pf = pixel_frames(int(t["width"]), int(t["height"]), int(t["num_frames"]))
            if t.get("outcome") == "out_of_memory":
                if int(t.get("budget_bytes") or 0) <= self.budget_bytes:
                    self.too_big[savers] = min(self.too_big.get(savers, pf), pf)
                continue
            peak = t.get("peak_vram_bytes")
            if t.get("outcome") == "succeeded" and peak and pf:
                above = peak - self.resident(savers)
                if above > 0:
                    ratios.setdefault(savers, []).append(above / pf)
        for savers, values in ratios.items():
            # The largest recent ratio: a fit that errs towards "does not fit" costs a rung, not a try.
            self.slopes[savers] = max(values[-20:])


def choose_start(
    memory: MemoryModel | None, rungs: list[Any], num_frames: int
) -> tuple[int, list[str]]:
    """Index of the first rung predicted to fit, and notes on the ones skipped."""
    if memory is None:
        return 0, []
    notes = []
    for i, rung in enumerate(rungs):
        if memory.fits(rung.width, rung.height, num_frames, rung.savers):
            return i, notes
        predicted = memory.predict(rung.width, rung.height, num_frames, rung.savers) / GIB
        notes.append(
            f"skipped {rung.width}x{rung.height} with savers {list(rung.savers) or 'none'}: predicted "
            f"{predicted:.1f} GiB, over the {memory.budget_bytes / GIB:.1f} GiB budget less {memory.margin:.0%}"
        )
    # Nothing is predicted to fit: try the smallest anyway (a prediction is not a measurement).
    return len(rungs) - 1, notes
