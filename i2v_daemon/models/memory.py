"""A model of a job's peak VRAM, so the OOM ladder starts at the first rung that will fit.

Measured on an H200 (shared/anchors): plain I2VGen-XL in fp16 peaks at the resident weights plus
a cost that is linear in pixels × frames, 0.616 GiB per million pixel-frames, to within 1% from
512²×8 to 1024²×32 (attention runs through SDPA, so nothing is quadratic in the frame size):

    512²×8 → 5.98 GiB   512²×16 → 7.28   768²×24 → 13.42   1024²×32 → 25.37   (resident 4.7)

The fast path changes two things: the compiled denoiser has its own peak (learned apart: slopes
are keyed by savers *and* whether the try was accelerated; until one is measured it is assumed
to be the eager one's), and the VAE decodes several frames at once, which costs
DECODE_BYTES_PER_PIXEL per decoded pixel on top of the resident weights. A try's peak is the
larger of its denoising and its decoding.

The daemon refits both from the peaks it records in every attempt; an out-of-memory try is
remembered as "this much did not fit". Pure Python: no torch here, so it is cheap to test.
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
#: Activation peak of the I2VGen-XL / Stable Diffusion VAE decoder per decoded pixel in fp16 (1.5 KiB:
#: 0.375 GiB per 512² frame). Found by replaying the full-size decoder on PyTorch's meta device and
#: tracking live tensors (bench/gpu_meta_peaks.py); the same replay of the UNet gives 0.617 GiB per
#: million pixel-frames against the 0.616 measured on the H200, so it is trusted until refitted.
DECODE_BYTES_PER_PIXEL = 1536.0
#: Frames decoded at once on the fast path without a memory model (the CPU): more buys nothing there.
DEFAULT_FAST_DECODE_CHUNK = 8

#: A slope's key: (sorted savers, accelerated).
Key = tuple[tuple[str, ...], bool]


def pixel_frames(width: int, height: int, num_frames: int) -> int:
    return width * height * num_frames


def _key(savers: Iterable[str], accelerated: bool = False) -> Key:
    return tuple(sorted(savers)), bool(accelerated)


@dataclass
class MemoryModel:
    """peak ≈ max(resident + slope(savers, accelerated)·w·h·f, resident + decode_bpp·w·h·chunk), refitted."""

    budget_bytes: int  # what this process may use: the card, or `vram_budget_gib`
    resident_bytes: float = ANCHOR_RESIDENT  # measured after loading, when known
    dtype_scale: float = 1.0  # float32 activations cost twice fp16/bf16
    margin: float = DEFAULT_MARGIN
    #: The prior before anything is learned: measured for I2VGen-XL only. None (another family):
    #: no prior, so every rung is tried until this family's own tries have been recorded.
    anchor_slope: float | None = ANCHOR_SLOPE
    slopes: dict[Key, float] = field(default_factory=dict)  # fitted per (savers, accelerated)
    too_big: dict[Key, int] = field(default_factory=dict)  # smallest pixel-frames that OOMed
    decode_bpp: float | None = None  # fitted decode bytes per pixel; None: DECODE_BYTES_PER_PIXEL

    def resident(self, savers: Iterable[str]) -> float:
        if "cpu_offload" in tuple(savers):
            return min(self.resident_bytes, OFFLOAD_RESIDENT * self.dtype_scale)
        return self.resident_bytes

    def slope(self, savers: Iterable[str], accelerated: bool = False) -> float:
        key = _key(savers, accelerated)
        if key in self.slopes:
            return self.slopes[key]
        if accelerated and (key[0], False) in self.slopes:
            return self.slopes[(key[0], False)]  # the eager peak stands in until the fast one is measured
        # Unmeasured savers are assumed to save nothing: a prediction may be pessimistic, never rosy.
        if self.anchor_slope is None:
            return max(self.slopes.values(), default=0.0)
        return self.anchor_slope * self.dtype_scale

    def decode_bytes_per_pixel(self) -> float:
        return self.decode_bpp if self.decode_bpp is not None else DECODE_BYTES_PER_PIXEL * self.dtype_scale

    def predict_denoise(self, width: int, height: int, num_frames: int, savers: Iterable[str] = (),
                        accelerated: bool = False) -> int:
        savers = tuple(savers)
        return int(self.resident(savers) + self.slope(savers, accelerated) * pixel_frames(width, height, num_frames))

    def predict_decode(self, width: int, height: int, chunk: int, savers: Iterable[str] = ()) -> int:
        return int(self.resident(tuple(savers)) + self.decode_bytes_per_pixel() * width * height * max(1, chunk))

    def predict(self, width: int, height: int, num_frames: int, savers: Iterable[str] = (),
                accelerated: bool = False, decode_chunk: int | None = None) -> int:
        """Predicted peak bytes of one try: its denoising or its decoding, whichever is higher."""
        denoise = self.predict_denoise(width, height, num_frames, savers, accelerated)
        if not decode_chunk or decode_chunk <= 1:
            return denoise  # one frame at a time: inside the fitted slope already
        return max(denoise, self.predict_decode(width, height, decode_chunk, savers))

    def limit(self) -> float:
        return self.budget_bytes * (1 - self.margin)

    def fits(self, width: int, height: int, num_frames: int, savers: Iterable[str] = (),
             accelerated: bool = False, decode_chunk: int | None = None) -> bool:
        savers = tuple(savers)
        pf = pixel_frames(width, height, num_frames)
        failed = self.too_big.get(_key(savers, accelerated))
        if failed is not None and pf >= failed:
            return False
        return self.predict(width, height, num_frames, savers, accelerated, decode_chunk) <= self.limit()

    def decode_chunk(self, width: int, height: int, num_frames: int, savers: Iterable[str] = ()) -> int:
        """The most frames the VAE can decode at once within the budget (at least 1, at most all)."""
        room = self.limit() - self.resident(tuple(savers))
        per_frame = self.decode_bytes_per_pixel() * width * height
        if per_frame <= 0:
            return num_frames
        return max(1, min(num_frames, int(room // per_frame)))

    def learn(self, tries: Iterable[dict[str, Any]]) -> None:
        """Refit from recorded attempts (the manifest's `attempts` entries) on this budget."""
        ratios: dict[Key, list[float]] = {}
        decode: list[float] = []
        for t in tries:
            key = _key(t.get("savers") or (), bool(t.get("accelerated")))
            w, h = int(t["width"]), int(t["height"])
            pf = pixel_frames(w, h, int(t["num_frames"]))
            if t.get("outcome") == "out_of_memory":
                if int(t.get("budget_bytes") or 0) <= self.budget_bytes:
                    self.too_big[key] = min(self.too_big.get(key, pf), pf)
                continue
            peak = t.get("peak_vram_bytes")
            if t.get("outcome") != "succeeded" or not peak or not pf:
                continue
            above = peak - self.resident(key[0])
            if above <= 0:
                continue
            chunk = int(t.get("decode_chunk") or 1)
            if chunk > 1 and self.predict_decode(w, h, chunk, key[0]) > self.predict_denoise(
                    w, h, int(t["num_frames"]), key[0], key[1]):
                decode.append(above / (w * h * chunk))  # the decode was the peak: it says nothing of the slope
            else:
                ratios.setdefault(key, []).append(above / pf)
        for key, values in ratios.items():
            # The largest recent ratio: a fit that errs towards "does not fit" costs a rung, not a try.
            self.slopes[key] = max(values[-20:])
        if decode:
            self.decode_bpp = max(decode[-20:])


def choose_start(
    memory: MemoryModel | None, rungs: list[Any], num_frames: int
) -> tuple[int, list[str]]:
    """Index of the first rung predicted to fit, and notes on the ones skipped.

    A rung with a heavier placement than the planned one is past what this model predicts (it learns the
    weights resident where they were placed): it is tried, not skipped.
    """
    if memory is None:
        return 0, []
    notes: list[str] = []
    for i, rung in enumerate(rungs):
        if getattr(rung, "placement", None) is not None:
            return i, notes
        accelerated = bool(getattr(rung, "accelerated", False))
        if memory.fits(rung.width, rung.height, num_frames, rung.savers, accelerated):
            return i, notes
        predicted = memory.predict(rung.width, rung.height, num_frames, rung.savers, accelerated) / GIB
        path = "on the fast path " if accelerated else ""
        notes.append(
            f"skipped {rung.width}x{rung.height} {path}with savers {list(rung.savers) or 'none'}: predicted "
            f"{predicted:.1f} GiB, over the {memory.budget_bytes / GIB:.1f} GiB budget less {memory.margin:.0%}"
        )
    # Nothing is predicted to fit: try the smallest anyway (a prediction is not a measurement).
    return len(rungs) - 1, notes
