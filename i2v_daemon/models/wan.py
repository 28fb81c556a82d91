"""Wan 2.1 / 2.2 image-to-video behind the `VideoModel` protocol: 4k+1 frames, umT5 prompts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest
from i2v_daemon.models.sizing import meta_tensor, module_dtype

#: The pipeline's default and the length the released models were trained with.
MAX_SEQUENCE_LENGTH = 512


class WanModel(DiffusersVideoModel):
    """`WanImageToVideoPipeline` (Wan2.1-I2V-14B-480P/720P, Wan2.2-I2V-A14B)."""

    family = "wan"
    pipeline_class = "WanImageToVideoPipeline"
    pipeline_size_multiple = 16  # its check_inputs
    # As the model card loads it: the VAE and CLIP image encoder in float32, the rest in bf16.
    float32_components: ClassVar[tuple[str, ...]] = ("vae", "image_encoder")

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

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        # Wan runs the conditional and unconditional passes one after the other: batch 1.
        transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        config = transformer.config
        dtype = module_dtype(transformer)
        frames = (num_frames - 1) // int(pipe.vae_scale_factor_temporal) + 1
        h, w = height // int(pipe.vae_scale_factor_spatial), width // int(pipe.vae_scale_factor_spatial)
        hidden = meta_tensor(1, config.in_channels, frames, h, w, dtype=dtype)
        if pipe.config.get("expand_timesteps"):  # Wan 2.2 5B: one timestep per latent token
            _, ph, pw = config.patch_size
            timestep = meta_tensor(1, frames * (h // ph) * (w // pw), dtype=torch.float32)
        else:
            timestep = meta_tensor(1, dtype=torch.float32)
        text = meta_tensor(1, MAX_SEQUENCE_LENGTH, config.text_dim, dtype=dtype)
        image = meta_tensor(1, 257, config.image_dim, dtype=dtype) if config.image_dim else None
        return lambda: transformer(hidden, timestep, text, encoder_hidden_states_image=image, return_dict=False)

    @staticmethod
    def meta_decode(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        vae = pipe.vae
        frames = (num_frames - 1) // int(pipe.vae_scale_factor_temporal) + 1
        h, w = height // int(pipe.vae_scale_factor_spatial), width // int(pipe.vae_scale_factor_spatial)
        latents = meta_tensor(1, vae.config.z_dim, frames, h, w, dtype=module_dtype(vae))
        return lambda: vae.decode(latents, return_dict=False)

    def _tokenize(self, prompt: str) -> list[int]:
        from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean  # what the pipeline encodes

        return list(self.pipeline.tokenizer(prompt_clean(prompt), truncation=False).input_ids)
