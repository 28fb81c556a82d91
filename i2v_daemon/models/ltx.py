"""LTX-Video image-to-video behind the `VideoModel` protocol: sizes of 32, 8k+1 frames, frame-rate aware."""

from __future__ import annotations

from typing import Any

from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest

#: The pipeline's default T5 length.
MAX_SEQUENCE_LENGTH = 128
#: For VAEs with timestep conditioning (LTX-Video 0.9.1 and later): LTX's own inference settings.
DECODE_TIMESTEP = 0.05
DECODE_NOISE_SCALE = 0.025


class LTXModel(DiffusersVideoModel):
    """`LTXImageToVideoPipeline` (Lightricks/LTX-Video 2B, 0.9.x)."""

    family = "ltx-video"
    pipeline_class = "LTXImageToVideoPipeline"
    pipeline_size_multiple = 32  # its check_inputs

    def _limits(self) -> dict[str, Any]:
        pipe = self.pipeline
        step = int(pipe.vae_temporal_compression_ratio) * int(pipe.transformer_temporal_patch_size)
        return {
            "size_multiple": int(pipe.vae_spatial_compression_ratio) * int(pipe.transformer_spatial_patch_size),
            "max_prompt_tokens": MAX_SEQUENCE_LENGTH,
            "frame_step": step,
            "min_frames": step + 1,
            "fps_conditioning": True,  # frame_rate scales its temporal positions
            # Stretching the schedule to shift_terminal divides by the last step's distance from the
            # first: with one step that is 0/0, and the pipeline fails with an IndexError.
            "min_steps": 2 if pipe.scheduler.config.get("shift_terminal") else 1,
        }

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        values: dict[str, Any] = {
            "guidance_scale": request.guidance_scale,
            "frame_rate": request.fps,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }
        if self.pipeline.vae.config.get("timestep_conditioning"):
            values.update(decode_timestep=DECODE_TIMESTEP, decode_noise_scale=DECODE_NOISE_SCALE)
        return values, []
