"""Where a pipeline's weights live while a job runs, chosen before the first try: pure arithmetic.

The placements, cheapest first (each one moves more bytes between host and GPU per job, so each
is slower than the one before it; none changes a pixel of the video):

- `gpu`: every component on the GPU for as long as the model is warm.
- `encoders_offloaded`: the text and image encoders live on the host and visit the GPU once per
  job, to encode; the denoiser(s) and the VAE stay. With two experts (Wan 2.2 A14B) only the active
  one is on the GPU: the high-noise expert hands over to the low-noise one once per job.
- `model_offload`: one component on the GPU at a time (diffusers' model CPU offload).
- `group_offload`: the denoiser's blocks stream through the GPU one at a time, the next one copied
  while the current one runs (diffusers' block-level group offloading, CUDA streams, pinned memory);
  every other component as in `model_offload`.
- `group_offload_leaf`: the same at the level of single layers, the encoders' too: the smallest footprint,
  the slowest.

Then, where the user allows it (`weights = "fp8"`, or `allow_fp8_fallback`), the same list again with
the denoiser stored in fp8 (diffusers' layerwise casting; computed in bf16/fp16): the output
changes slightly, so it comes after every placement that keeps it exact.

A placement's predicted peak is the bytes on the GPU at the worst moment of a job: the weights
resident then, plus the activation peak of what runs then (sizing.py replays the family's own
denoiser step and VAE decode on meta tensors at the job's size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 2**30

#: Cheapest first.
PLACEMENTS = ("gpu", "encoders_offloaded", "model_offload", "group_offload", "group_offload_leaf")
#: Blocks on the GPU at once under block-level group offloading with streams: the one running and
#: the one being copied in.
GROUP_BLOCKS_RESIDENT = 2
#: The encoders' own activation peak is small next to the denoiser's (a few hundred tokens): this
#: much is held for it while they run (measured: umT5-xxl at 512 tokens, bf16, ≈ 0.1 GiB).
ENCODE_ACTIVATION_BYTES = int(0.25 * GIB)


@dataclass(frozen=True)
class Weights:
    """What a pipeline weighs, by role, at the dtypes it runs in (from sizing.ComponentSize)."""

    encoders: list[int]  # each encoder's bytes
    denoisers: list[int]  # each denoiser's bytes (two for Wan 2.2 A14B)
    vae: int
    denoiser_rest: int  # the largest denoiser without its repeated blocks (embeddings, heads)
    largest_block: int  # the largest repeated block of any denoiser
    largest_leaf: int  # the largest single layer of any denoiser
    castable: list[int] = field(default_factory=list)  # per denoiser: bytes layerwise casting stores in fp8
    #: The largest single layer of any encoder: leaf-level group offloading streams the encoders layer by layer
    #: too (block-level moves a transformers encoder whole: it has no block list at its top). 0: unknown.
    encoder_leaf: int = 0

    @property
    def total(self) -> int:
        return sum(self.encoders) + sum(self.denoisers) + self.vae


@dataclass(frozen=True)
class Costs:
    """Activation peaks at one size: one denoising step (batch as the pipeline runs it) and the decode."""

    denoise: int
    decode: int
    #: cuDNN's autotuning workspace on top of each phase, up to the cap the daemon sets (models/gpu.py);
    #: 0 where autotuning is off (accelerate off: plain diffusers' runs, the anchors' setting)
    workspace: int = 0


@dataclass(frozen=True)
class Prediction:
    placement: str
    fp8: bool
    peak_bytes: int  # predicted, on the GPU
    resident_bytes: int  # weights on the GPU while denoising
    host_bytes: int  # weights kept on the host (pinned where streamed)
    fits: bool

    @property
    def name(self) -> str:
        return f"{self.placement}+fp8" if self.fp8 else self.placement

    def as_dict(self) -> dict[str, Any]:
        return {"placement": self.placement, "fp8": self.fp8, "predicted_peak_bytes": self.peak_bytes,
                "resident_bytes": self.resident_bytes, "host_bytes": self.host_bytes, "fits": self.fits}


def _fp8(weights: Weights) -> Weights:
    """The denoisers stored in fp8: their castable layers at 1 byte a parameter instead of 2.

    Blocks and the rest shrink by the denoiser's own ratio (their layers are the same kind).
    """
    castable = weights.castable or [0] * len(weights.denoisers)
    halved = [d - c // 2 for d, c in zip(weights.denoisers, castable, strict=True)]
    ratio = max(halved, default=0) / max(max(weights.denoisers, default=0), 1)
    return Weights(
        encoders=weights.encoders, denoisers=halved, vae=weights.vae,
        denoiser_rest=int(weights.denoiser_rest * ratio), largest_block=int(weights.largest_block * ratio),
        largest_leaf=weights.largest_leaf // 2, castable=[0] * len(halved), encoder_leaf=weights.encoder_leaf,
    )


def predict(placement: str, weights: Weights, costs: Costs, *, fp8: bool = False) -> tuple[int, int, int]:
    """(peak on the GPU, weights resident while denoising, weights on the host) of one job."""
    cast_overhead = 0
    if fp8:
        cast_overhead = weights.largest_leaf  # one layer upcast to the compute dtype at a time
        weights = _fp8(weights)
    enc, vae = sum(weights.encoders), weights.vae
    biggest_enc = max(weights.encoders, default=0)
    active = max(weights.denoisers, default=0)  # two experts: only one is needed at a time
    denoise, decode = costs.denoise + cast_overhead + costs.workspace, costs.decode + costs.workspace
    if placement == "gpu":
        resident = enc + sum(weights.denoisers) + vae
        peak = resident + max(denoise, decode, ENCODE_ACTIVATION_BYTES)
        return peak, resident, 0
    if placement == "encoders_offloaded":
        resident = active + vae
        peak = resident + max(biggest_enc + ENCODE_ACTIVATION_BYTES, denoise, decode)
        return peak, resident, enc + sum(weights.denoisers) - active
    if placement == "model_offload":
        peak = max(biggest_enc + ENCODE_ACTIVATION_BYTES, active + denoise, vae + decode)
        return peak, active, weights.total
    if placement in ("group_offload", "group_offload_leaf"):
        unit = weights.largest_block if placement == "group_offload" else weights.largest_leaf
        streamed = weights.denoiser_rest + GROUP_BLOCKS_RESIDENT * unit
        encoding = biggest_enc
        if placement == "group_offload_leaf" and weights.encoder_leaf:  # the encoders stream layer by layer too
            encoding = min(biggest_enc, GROUP_BLOCKS_RESIDENT * weights.encoder_leaf)
        # The decoders are left out of the streaming (adapter.DECODERS): diffusers keeps what it leaves
        # out on the GPU for the whole job, so the VAE's weights are under every phase.
        peak = vae + max(encoding + ENCODE_ACTIVATION_BYTES, streamed + denoise, decode)
        return peak, streamed + vae, weights.total
    raise ValueError(f"unknown placement {placement!r}")


def predictions(weights: Weights, costs: Costs, limit_bytes: float, *, fp8: str = "no") -> list[Prediction]:
    """Every placement in order of cost, each with its predicted peak and whether it fits `limit_bytes`.

    `fp8`: "no" (full precision only), "only" (the user chose fp8 weights), "fallback" (full precision
    first, fp8 after).
    """
    variants = {"no": (False,), "only": (True,), "fallback": (False, True)}[fp8]
    out = []
    for cast in variants:
        for name in PLACEMENTS:
            peak, resident, host = predict(name, weights, costs, fp8=cast)
            out.append(Prediction(name, cast, peak, resident, host, peak <= limit_bytes))
    return out


def choose(preds: list[Prediction]) -> Prediction | None:
    """The cheapest placement predicted to fit, or None."""
    return next((p for p in preds if p.fits), None)
