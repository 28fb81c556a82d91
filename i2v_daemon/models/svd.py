"""Stable Video Diffusion behind the `VideoModel` protocol: image only, motion and fps conditioning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest
from i2v_daemon.models.sizing import meta_tensor, module_dtype

#: The pipeline's own defaults: guidance ramps from 1.0 on the first frame to 3.0 on the last,
#: motion bucket 127, and 0.02 of noise added to the conditioning image.
DEFAULT_MIN_GUIDANCE = 1.0
DEFAULT_MAX_GUIDANCE = 3.0
DEFAULT_MOTION_BUCKET = 127
NOISE_AUG_STRENGTH = 0.02
#: Frames the temporal VAE decodes at once: 8 is quick; the "vae_slicing" saver decodes one at a time.
DECODE_CHUNK_SIZE = 8


def motion_bucket_id(motion: float) -> int:
    """`motion` 0..1 onto SVD's micro-conditioning buckets 1..255 (0.5 → 128, near the default 127)."""
    return 1 + round(min(max(motion, 0.0), 1.0) * 254)


class SVDModel(DiffusersVideoModel):
    """`StableVideoDiffusionPipeline` (img2vid and img2vid-xt)."""

    family = "svd"
    pipeline_class = "StableVideoDiffusionPipeline"
    pipeline_size_multiple = 8  # its check_inputs

    def _limits(self) -> dict[str, Any]:
        pipe = self.pipeline
        down = 2 ** (len(pipe.unet.config.block_out_channels) - 1)  # the UNet's own down-sampling
        return {
            "size_multiple": int(pipe.vae_scale_factor) * down,
            "max_prompt_tokens": None,
            "takes_prompt": False,
            "motion": True,
            "fps_conditioning": True,
            "decode_chunks": True,  # decode_chunk_size
            # Its guidance ramp and the temporal layers concatenate along frames: one frame fails
            # inside the pipeline (plain diffusers too), so one is made two.
            "min_frames": 2,
        }

    def _supported_savers(self) -> tuple[str, ...]:
        # Its temporal VAE has no slicing of its own; decoding fewer frames at once is the same saving.
        savers = super()._supported_savers()
        return savers if "vae_slicing" in savers else ("vae_slicing", *savers)

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        g = request.guidance_scale
        values = {
            "min_guidance_scale": min(DEFAULT_MIN_GUIDANCE, g),
            "max_guidance_scale": g,
            "fps": request.fps,
            "motion_bucket_id": DEFAULT_MOTION_BUCKET if request.motion is None else motion_bucket_id(request.motion),
            "noise_aug_strength": NOISE_AUG_STRENGTH,
        }
        notes = []
        if g > DEFAULT_MAX_GUIDANCE:
            notes.append(
                f"svd ramps guidance over the frames from {values['min_guidance_scale']:g} to guidance_scale {g:g}; "
                f"its own default ends at {DEFAULT_MAX_GUIDANCE:g}, and much higher values tend to over-saturate"
            )
        return values, notes

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        unet = pipe.unet
        dtype = module_dtype(unet)
        scale = int(pipe.vae_scale_factor)
        # guidance batches the unconditional half; the image latents are concatenated along channels
        sample = meta_tensor(2, num_frames, unet.config.in_channels, height // scale, width // scale, dtype=dtype)
        cross = int(unet.config.cross_attention_dim)
        return lambda: unet(sample, meta_tensor(2, dtype=dtype), encoder_hidden_states=meta_tensor(
            2, 1, cross, dtype=dtype), added_time_ids=meta_tensor(2, 3, dtype=dtype))

    @staticmethod
    def meta_decode(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        vae = pipe.vae
        chunk = min(num_frames, DECODE_CHUNK_SIZE)
        scale = int(pipe.vae_scale_factor)
        latents = meta_tensor(chunk, vae.config.latent_channels, height // scale, width // scale,
                              dtype=module_dtype(vae))
        return lambda: vae.decode(latents, num_frames=chunk)

    def _call(self, image: Image.Image, request: GenerationRequest, conditioning: dict[str, Any],
              callback: Any) -> Any:
        chunk = 1 if "vae_slicing" in request.savers else request.decode_chunk or DECODE_CHUNK_SIZE
        return super()._call(image, request, {**conditioning, "decode_chunk_size": chunk}, callback)
