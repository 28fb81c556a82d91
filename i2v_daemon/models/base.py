"""The seam between the daemon and diffusers: one `VideoModel` protocol every family implements.

Only `i2v_daemon.models` and `i2v_daemon.work.generate` import torch or diffusers; the values here
are plain Python so the rest of the daemon (and `status`) never pays for that import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from i2v_daemon.weights import Weights

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: Called after each denoising step with (step, total). It may raise `JobCanceled` to stop the
#: pipeline at that step boundary.
StepCallback = Callable[[int, int], None]
#: Called when a try enters a phase: "compiling" (its shape has no compiled graph yet), "denoising",
#: "decoding" (after the last step).
PhaseCallback = Callable[[str], None]

#: Memory savers a model may support, in the order the OOM ladder tries them.
SAVERS = ("vae_slicing", "vae_tiling", "forward_chunking", "cpu_offload")


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is and what it can honour; generate.py plans every job from this."""

    family: str  # e.g. "i2vgen-xl"
    model_id: str  # repo id or local folder as configured
    revision: str | None  # commit hash for hub snapshots, None for a local folder
    size_multiple: int  # width and height must be multiples of this
    max_prompt_tokens: int | None  # the text encoder's limit; None when the model takes no prompt
    takes_prompt: bool = True
    savers: tuple[str, ...] = ()  # which of SAVERS this family supports
    frame_step: int = 1  # valid frame counts are 1 + frame_step·k (1: any count)
    min_frames: int = 1
    max_frames: int | None = None  # beyond this a request is refused, not trimmed
    fixed_size: tuple[int, int] | None = None  # (width, height) for a model that makes only one size
    motion: bool = False  # whether the `motion` key reaches the model
    fps_conditioning: bool = False  # whether the model is told the frame rate (else fps only sets playback)
    native_fps: int | None = None  # the frame rate its motion is made for, where it is not told
    lora: bool = False  # whether LoRA files can be applied
    min_steps: int = 1  # fewer denoising steps than this break the family's scheduler
    scheduler: str = "default"  # the name of the scheduler it was loaded with ("ddim", "euler", …)
    schedulers: tuple[str, ...] = ()  # the names a job's `scheduler` may ask for, besides "default"
    accelerated: bool = False  # whether the fast path (compiled denoiser) is on for this model
    decode_chunks: bool = False  # whether its VAE decodes frames in chunks (GenerationRequest.decode_chunk)
    weights: Weights = field(default_factory=Weights)  # the weights it runs with now (fp8 after use_fp8())
    caches: tuple[str, ...] = ()  # the step caches a job's `cache` may ask for (transformer families), besides "off"


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA file already checked to lie inside `lora_dir`."""

    name: str  # as the sidecar named it
    path: str  # absolute path of the .safetensors file
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    """One try: everything is already decided (size and frame count planned, seed chosen)."""

    image: Image.Image  # RGB, EXIF orientation applied
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    steps: int
    guidance_scale: float
    fps: int
    seed: int
    savers: tuple[str, ...] = ()
    motion: float | None = None  # 0..1, for families with a motion knob
    lora: LoraChoice | None = None
    scheduler: str | None = None  # None / "default": the family's own; else a name from ModelInfo.schedulers
    accelerated: bool = False  # run this try on the fast path (compiled denoiser), where the model has one
    decode_chunk: int | None = None  # frames the VAE decodes at once; None: the family's own default
    cache: str | None = None  # None / "off": none; else one of ModelInfo.caches, on for this try only


@dataclass(frozen=True)
class SizePlan:
    width: int
    height: int
    notes: tuple[str, ...] = field(default=())  # adjustments a person should know about


@dataclass(frozen=True)
class FramePlan:
    num_frames: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConditioningPlan:
    """How a request's options reach the pipeline: its own argument names and values, and notes."""

    values: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"motion_bucket_id": 64, "fps": 8}
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))


class VideoModel(Protocol):
    info: ModelInfo
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # "float32", "float16", "bfloat16"
    #: How the last `generate` call ran: {"accelerated": bool, "compiled": bool, "compile_seconds": float,
    #: "fell_back": str | None}; {} before the first call.
    last_run: dict[str, Any]
    #: Where the weights are (models/placement.py: "gpu", "group_offload", …), and the plan that chose
    #: it ({"placement", "predicted_peak_bytes", "fits", …}; {} when none was made, as on the CPU).
    placement: str
    placement_plan: dict[str, Any]

    def place(self, placement: str) -> None:
        """Put the weights where `placement` says, from wherever they are now."""
        ...

    def plan_size(
        self, image_size: tuple[int, int], resolution: int, width: int | None, height: int | None
    ) -> SizePlan:
        """The size this model will generate for an image of `image_size` (w, h); InputError if it cannot."""
        ...

    def plan_frames(self, num_frames: int) -> FramePlan:
        """The frame count this model will generate when asked for `num_frames`; InputError if it cannot."""
        ...

    def plan_steps(self, steps: int) -> tuple[int, tuple[str, ...]]:
        """The step count this model will run when asked for `steps`, and notes on any change."""
        ...

    def plan_conditioning(self, request: GenerationRequest) -> ConditioningPlan:
        """The family's own arguments for fps, guidance, motion, LoRA, scheduler; InputError for what it cannot do."""
        ...

    def scheduler_for(self, requested: str | None) -> str:
        """The name of the scheduler a job asking for `requested` runs with; InputError if not offered."""
        ...

    def fast_path_for(self, request: GenerationRequest) -> bool:
        """Whether a try like `request` can run on the fast path (when the model has one)."""
        ...

    def prompt_tokens(self, prompt: str) -> int:
        """How many tokens the text encoder sees for `prompt` (0 if the model takes no prompt)."""
        ...

    def generate(
        self, request: GenerationRequest, on_step: StepCallback, on_phase: PhaseCallback | None = None
    ) -> np.ndarray:
        """Frames as uint8 array (num_frames, height, width, 3); `last_run` then says how the try ran."""
        ...

    def use_fp8(self) -> bool:
        """Store the denoisers' weights in fp8 from now on; True if that changed anything (only `auto` weights
        change). For a placement that needs the room, where `allow_fp8_fallback` allows it; the job then
        carries `weights.FP8_FALLBACK_NOTE`."""
        ...

    def versions(self) -> dict[str, Any]:
        """Library versions that produced the video, for the manifest."""
        ...

    def close(self) -> None:
        """Release the pipeline and any GPU memory it holds."""
        ...
