"""LTX-Video image-to-video behind the `VideoModel` protocol: sizes of 32, 8k+1 frames, frame-rate aware.

Two diffusers pipelines run the same components: `LTXImageToVideoPipeline` (0.9.0-0.9.1, and folders
published as `LTXPipeline`) and `LTXConditionPipeline` (0.9.5 and later publish their folders so: the
image enters as a keyframe condition at frame 0, the conditioning these versions were trained with).
Both are the one `ltx-video` family, with the same limits; the folder's model_index decides which runs.
"""

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
#: The condition pipeline's T5 length (its default; the image-to-video pipeline's is 128).
CONDITION_SEQUENCE_LENGTH = 256
#: Noise added to the image's latents at each step (diffusers' LTX notes for timestep-aware VAEs, 0.9.1+;
#: the pipeline's own default, 0.15, is for the others).
IMAGE_COND_NOISE_SCALE = 0.025


def _meta_inputs(pipe: Any, width: int, height: int, num_frames: int, text_tokens: int) -> tuple[Any, ...]:
    """The transformer and its meta inputs for one guided step: the unconditional half batched with the
    conditional one, and the first frame's tokens carrying their own timestep."""
    transformer = pipe.transformer
    dtype = module_dtype(transformer)
    frames = (num_frames - 1) // int(pipe.vae_temporal_compression_ratio) + 1
    h, w = height // int(pipe.vae_spatial_compression_ratio), width // int(pipe.vae_spatial_compression_ratio)
    tokens = frames * h * w
    config = transformer.config
    hidden = meta_tensor(2, tokens, config.in_channels, dtype=dtype)
    text = meta_tensor(2, text_tokens, config.caption_channels, dtype=dtype)
    mask = meta_tensor(2, text_tokens, dtype=dtype)
    return transformer, hidden, text, mask, meta_tensor(2, tokens, dtype=torch.float32), (frames, h, w)


class LTXModel(DiffusersVideoModel):
    """`LTXImageToVideoPipeline` (Lightricks/LTX-Video 2B, 0.9.x)."""

    family = "ltx-video"
    pipeline_class = "LTXImageToVideoPipeline"
    pipeline_size_multiple = 32  # its check_inputs

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        transformer, hidden, text, mask, timestep, (frames, h, w) = _meta_inputs(
            pipe, width, height, num_frames, MAX_SEQUENCE_LENGTH
        )
        return lambda: transformer(hidden, text, timestep, mask, num_frames=frames, height=h, width=w,
                                   rope_interpolation_scale=(1.0, 1.0, 1.0), return_dict=False)

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


class LTXConditionModel(LTXModel):
    """`LTXConditionPipeline` (Lightricks/LTX-Video-0.9.5, 0.9.7-dev/distilled, 0.9.8): the image as the
    condition at frame 0 with full strength; the family, limits and LoRA are LTX-Video's."""

    pipeline_class = "LTXConditionPipeline"

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        transformer, hidden, text, mask, timestep, _ = _meta_inputs(
            pipe, width, height, num_frames, CONDITION_SEQUENCE_LENGTH
        )
        # The frame-0 condition replaces the first latent frame in place: no extra tokens.
        coords = meta_tensor(2, 3, hidden.shape[1], dtype=torch.float32)
        return lambda: transformer(hidden, text, timestep, mask, video_coords=coords, return_dict=False)

    def _limits(self) -> dict[str, Any]:
        return {**super()._limits(), "max_prompt_tokens": CONDITION_SEQUENCE_LENGTH}

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        values, notes = super()._conditioning(request)
        values["max_sequence_length"] = CONDITION_SEQUENCE_LENGTH
        if self.pipeline.vae.config.get("timestep_conditioning"):
            values["image_cond_noise_scale"] = IMAGE_COND_NOISE_SCALE
        return values, notes
