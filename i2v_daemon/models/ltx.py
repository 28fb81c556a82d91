"""LTX-Video image-to-video behind the `VideoModel` protocol: sizes of 32, 8k+1 frames, frame-rate aware."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest
from i2v_daemon.models.sizing import meta_tensor, module_dtype

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

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        transformer = pipe.transformer
        dtype = module_dtype(transformer)
        frames = (num_frames - 1) // int(pipe.vae_temporal_compression_ratio) + 1
        h, w = height // int(pipe.vae_spatial_compression_ratio), width // int(pipe.vae_spatial_compression_ratio)
        tokens = frames * h * w
        config = transformer.config
        # guidance batches the unconditional half; the first frame's tokens carry their own timestep
        hidden = meta_tensor(2, tokens, config.in_channels, dtype=dtype)
        text = meta_tensor(2, MAX_SEQUENCE_LENGTH, config.caption_channels, dtype=dtype)
        mask = meta_tensor(2, MAX_SEQUENCE_LENGTH, dtype=dtype)
        return lambda: transformer(hidden, text, meta_tensor(2, tokens, dtype=torch.float32), mask, num_frames=frames,
                                   height=h, width=w, rope_interpolation_scale=(1.0, 1.0, 1.0), return_dict=False)

    @staticmethod
    def meta_decode(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        vae = pipe.vae
        frames = (num_frames - 1) // int(pipe.vae_temporal_compression_ratio) + 1
        h, w = height // int(pipe.vae_spatial_compression_ratio), width // int(pipe.vae_spatial_compression_ratio)
        dtype = module_dtype(vae)
        latents = meta_tensor(1, vae.config.latent_channels, frames, h, w, dtype=dtype)
        temb = meta_tensor(1, dtype=dtype) if vae.config.timestep_conditioning else None
        return lambda: vae.decode(latents, temb, return_dict=False)

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
