"""The seam between the daemon and diffusers: one `VideoModel` protocol every family implements.

Only `i2v_daemon.models` and `i2v_daemon.generate` import torch or diffusers; the values here
are plain Python so the rest of the daemon (and `status`) never pays for that import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: Called after each denoising step with (step, total). It may raise `JobCanceled` to stop the
#: pipeline at that step boundary.
StepCallback = Callable[[int, int], None]

#: Memory savers a model may support, in the order the OOM ladder tries them.
SAVERS = ("vae_slicing", "vae_tiling", "forward_chunking", "cpu_offload")


@dataclass(frozen=True)
class ModelInfo:
    family: str  # e.g. "i2vgen-xl"
    model_id: str  # repo id or local folder as configured
    revision: str | None  # commit hash for hub snapshots, None for a local folder
    size_multiple: int  # width and height must be multiples of this
    max_prompt_tokens: int | None  # the text encoder's limit; None when the model takes no prompt
    takes_prompt: bool = True
    savers: tuple[str, ...] = ()  # which of SAVERS this family supports


@dataclass(frozen=True)
class GenerationRequest:
    """One try: everything is already decided (size rounded, seed chosen)."""

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


@dataclass(frozen=True)
class SizePlan:
    width: int
    height: int
    notes: tuple[str, ...] = field(default=())  # adjustments a person should know about


class VideoModel(Protocol):
    info: ModelInfo
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # "float32", "float16", "bfloat16"

    def plan_size(
        self, image_size: tuple[int, int], resolution: int, width: int | None, height: int | None
    ) -> SizePlan:
        """The size this model will generate for an image of `image_size` (w, h)."""
        ...

    def prompt_tokens(self, prompt: str) -> int:
        """How many tokens the text encoder sees for `prompt` (0 if the model takes no prompt)."""
        ...

    def generate(self, request: GenerationRequest, on_step: StepCallback) -> np.ndarray:
        """Frames as uint8 array (num_frames, height, width, 3)."""
        ...

    def versions(self) -> dict[str, Any]:
        """Library versions that produced the video, for the manifest."""
        ...

    def close(self) -> None:
        """Release the pipeline and any GPU memory it holds."""
        ...
