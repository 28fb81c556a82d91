"""HunyuanVideo-I2V behind the `VideoModel` protocol: a LLaVA prompt that sees the image, 4k+1 frames, 16-pixel grid."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest
from i2v_daemon.models.sizing import meta_tensor, module_dtype

#: The pipeline's default length of the user's text inside its Llama-3 chat template.
MAX_SEQUENCE_LENGTH = 256
#: LLaVA tokens of the image in the prompt (CLIP-L/336: 24×24 patches), and the template tokens cut with the
#: assistant's header: the prompt the transformer sees is these image tokens, every `interleave`-th one,
#: and MAX_SEQUENCE_LENGTH - 4 text tokens.
IMAGE_TOKENS = 576
HEADER_TOKENS = 4
#: HunyuanVideo makes 24 fps motion (129 frames are its 5-second clips); it is not told the frame rate.
NATIVE_FPS = 24


def _extra_frames(pipe: Any) -> int:
    """Frames the pipeline makes and then drops: the -33ch model ("latent_concat") decodes 4 leading frames
    it cuts off, so it is asked for 4 more to give the planned count."""
    return int(pipe.vae_scale_factor_temporal) if pipe.transformer.config.image_condition_type == "latent_concat" else 0


def _interleave(transformer: Any) -> int:
    """Every how-manieth image token the pipeline keeps (its default for the transformer's conditioning)."""
    kind = transformer.config.image_condition_type
    return 2 if kind == "latent_concat" else 4 if kind == "token_replace" else 1


class HunyuanVideoI2VModel(DiffusersVideoModel):
    """`HunyuanVideoImageToVideoPipeline` (hunyuanvideo-community/HunyuanVideo-I2V and -I2V-33ch).

    The 16-channel release ("token_replace": the first latent frame is the image's own) embeds the guidance
    scale and calls the transformer once a step; the negative prompt is not used. The 33-channel one
    ("latent_concat", no guidance embedding) runs true classifier-free guidance with the negative prompt.
    """

    family = "hunyuanvideo-i2v"
    pipeline_class = "HunyuanVideoImageToVideoPipeline"
    pipeline_size_multiple = 16  # its check_inputs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tile_vae()

    def _tile_vae(self) -> None:
        """Decode in spatial tiles, as the model card's example does: untiled, a 720p, 129-frame decode alone
        is predicted at 35 GiB (frame-wise decoding, the VAE's default, only bounds time)."""
        self.pipeline.vae.enable_tiling()

    def _reset_savers(self, savers: tuple[str, ...]) -> None:
        super()._reset_savers(savers)
        self._tile_vae()  # the family's own decode, whatever the OOM ladder's rung turned off

    def _limits(self) -> dict[str, Any]:
        pipe = self.pipeline
        step = int(pipe.vae_scale_factor_temporal)
        config = pipe.transformer.config
        return {
            "size_multiple": int(pipe.vae_scale_factor_spatial) * int(config.patch_size),
            "max_prompt_tokens": MAX_SEQUENCE_LENGTH,
            "frame_step": step * int(config.patch_size_t),
            "min_frames": step * int(config.patch_size_t) + 1,
            "native_fps": NATIVE_FPS,
        }

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        values: dict[str, Any] = {"max_sequence_length": MAX_SEQUENCE_LENGTH}
        notes = []
        if self.pipeline.transformer.config.guidance_embeds:
            values.update(guidance_scale=request.guidance_scale, true_cfg_scale=1.0)
            if request.negative_prompt:
                notes.append(
                    f"{self.family} has the guidance scale built in (one pass a step, no unconditional one): "
                    "the negative prompt was not used"
                )
        else:  # true guidance: a negative pass whenever true_cfg_scale > 1 and a negative prompt ("" too) is given
            values.update(guidance_scale=1.0, true_cfg_scale=request.guidance_scale)
        return values, notes

    def _call(
        self, image: Any, request: GenerationRequest, conditioning: dict[str, Any], callback: Callable[..., Any] | None
    ) -> Any:
        extra = _extra_frames(self.pipeline)
        return super()._call(image, replace(request, num_frames=request.num_frames + extra), conditioning, callback)

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        transformer = pipe.transformer
        config = transformer.config
        dtype = module_dtype(transformer)
        frames = (num_frames + _extra_frames(pipe) - 1) // int(pipe.vae_scale_factor_temporal) + 1
        h, w = height // int(pipe.vae_scale_factor_spatial), width // int(pipe.vae_scale_factor_spatial)
        # token_replace: the image's latent frame replaces the first; latent_concat: image latents and a mask
        # are concatenated along the channels (in_channels says how many). Guidance embedded: batch 1; true
        # guidance runs the two passes one after the other, batch 1 too.
        hidden = meta_tensor(1, config.in_channels, frames, h, w, dtype=dtype)
        text_tokens = IMAGE_TOKENS // _interleave(transformer) + MAX_SEQUENCE_LENGTH - HEADER_TOKENS
        text = meta_tensor(1, text_tokens, config.text_embed_dim, dtype=dtype)
        mask = meta_tensor(1, text_tokens, dtype=dtype)
        pooled = meta_tensor(1, config.pooled_projection_dim, dtype=dtype)
        guidance = meta_tensor(1, dtype=dtype) if config.guidance_embeds else None
        timestep = meta_tensor(1, dtype=torch.float32)
        return lambda: transformer(hidden, timestep, text, mask, pooled, guidance=guidance, return_dict=False)

    @staticmethod
    def meta_decode(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        vae = pipe.vae
        frames = (num_frames + _extra_frames(pipe) - 1) // int(pipe.vae_scale_factor_temporal) + 1
        h, w = height // int(pipe.vae_scale_factor_spatial), width // int(pipe.vae_scale_factor_spatial)
        latents = meta_tensor(1, vae.config.latent_channels, frames, h, w, dtype=module_dtype(vae))

        def decode() -> Any:
            tiled = vae.use_tiling
            vae.use_tiling = True  # as HunyuanVideoI2VModel decodes (_tile_vae), frame-wise too (the default)
            try:
                return vae.decode(latents, return_dict=False)
            finally:
                vae.use_tiling = tiled

        return decode

    def _tokenize(self, prompt: str) -> list[int]:
        # The user's text alone: the template around it is cut off before the transformer sees it.
        return list(self.pipeline.tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids)
