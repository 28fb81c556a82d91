"""Wan 2.1 / 2.2 image-to-video behind the `VideoModel` protocol: 4k+1 frames, umT5 prompts."""

from __future__ import annotations

from typing import Any

from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest

#: The pipeline's default and the length the released models were trained with.
MAX_SEQUENCE_LENGTH = 512


class WanModel(DiffusersVideoModel):
    """`WanImageToVideoPipeline` (Wan2.1-I2V-14B-480P/720P, Wan2.2-I2V-A14B)."""

    family = "wan"
    pipeline_class = "WanImageToVideoPipeline"
    pipeline_size_multiple = 16  # its check_inputs
    # As the model card loads it: the VAE and CLIP image encoder in float32, the rest in bf16.
    float32_components = ("vae", "image_encoder")

    def _limits(self) -> dict[str, Any]:
        pipe = self.pipeline
        transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        _, patch_h, patch_w = transformer.config.patch_size
        step = int(pipe.vae_scale_factor_temporal)
        return {
            "size_multiple": int(pipe.vae_scale_factor_spatial) * max(patch_h, patch_w),
            "max_prompt_tokens": MAX_SEQUENCE_LENGTH,
            "frame_step": step,
            "min_frames": step + 1,
            # Wan 2.2's 5B model (expand_timesteps) is made for 24 fps, Wan 2.1 and 2.2 A14B for 16.
            "native_fps": 24 if pipe.config.get("expand_timesteps") else 16,
        }

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        values: dict[str, Any] = {"guidance_scale": request.guidance_scale, "max_sequence_length": MAX_SEQUENCE_LENGTH}
        if self.pipeline.config.get("boundary_ratio") is not None:  # Wan 2.2's low-noise expert
            values["guidance_scale_2"] = request.guidance_scale
        return values, []

    def _tokenize(self, prompt: str) -> list[int]:
        from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean  # what the pipeline encodes

        return list(self.pipeline.tokenizer(prompt_clean(prompt), truncation=False).input_ids)
