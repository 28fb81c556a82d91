"""I2VGen-XL behind the `VideoModel` protocol: its own prompt embeddings, progress from a UNet hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from PIL import Image

from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest
from i2v_daemon.models.planning import MAX_ASPECT, plan_size
from i2v_daemon.models.runtime import cpu_generator, fit_image
from i2v_daemon.models.sizing import meta_tensor

__all__ = ["DECODE_CHUNK_SIZE", "FAMILY", "MAX_ASPECT", "I2VGenXLModel", "fit_image", "plan_size"]

FAMILY = "i2vgen-xl"
#: Frames the VAE decodes at once on the eager path: the pipeline's default and its smallest peak
#: memory. The fast path decodes as many as the memory model says fit (request.decode_chunk).
DECODE_CHUNK_SIZE = 1


class I2VGenXLModel(DiffusersVideoModel):
    """The deprecated diffusers `I2VGenXLPipeline`, loaded once and kept warm between jobs."""

    family = FAMILY
    pipeline_class = "I2VGenXLPipeline"
    progress_module = "unet"  # the deprecated pipeline has no callback_on_step_end
    pipeline_size_multiple = 8  # its check_inputs
    # The UNet's inputs are (batch, channels, frames, height, width): frames stay symbolic in the
    # compiled graph, so every frame count at one size shares it.
    dynamic_dims: ClassVar[dict[str, tuple[int, ...]]] = {"sample": (2,), "image_latents": (2,)}

    def _limits(self) -> dict[str, Any]:
        pipe = self.pipeline
        return {
            "size_multiple": _size_multiple(pipe),
            # no tokenizer in a pipeline built from configs alone (models/planner.py)
            "max_prompt_tokens": int(pipe.tokenizer.model_max_length) if pipe.tokenizer is not None else None,
            "fps_conditioning": True,  # target_fps
            "decode_chunks": True,  # decode_chunk_size
        }

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        return {"guidance_scale": request.guidance_scale, "target_fps": request.fps}, []

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        unet = pipe.unet
        dtype = next(unet.parameters()).dtype
        sample = meta_tensor(2, unet.config.in_channels, num_frames, height // 8, width // 8, dtype=dtype)
        cross = int(unet.config.cross_attention_dim)
        return lambda: unet(  # guidance: the pipeline batches the unconditional half
            sample, meta_tensor(2, dtype=torch.int64), encoder_hidden_states=meta_tensor(2, 77, cross, dtype=dtype),
            fps=meta_tensor(2, dtype=torch.int64), image_latents=sample.clone(),
            image_embeddings=meta_tensor(2, 1, cross, dtype=dtype))

    @staticmethod
    def meta_decode(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        vae = pipe.vae
        latents = meta_tensor(DECODE_CHUNK_SIZE, vae.config.latent_channels, height // 8, width // 8,
                              dtype=next(vae.parameters()).dtype)
        return lambda: vae.decode(latents)

    def _tokenize(self, prompt: str) -> list[int]:
        return list(self.pipeline.tokenizer(prompt, truncation=False, verbose=False).input_ids)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text embeddings with the pipeline's default clip_skip=1: the penultimate layer, normalised."""
        tokenizer, encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        tokens = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):  # as the pipeline does; CLIP has none
            mask = tokens.attention_mask.to(encoder.device)
        out = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask, output_hidden_states=True)
        # transformers 5 dropped CLIPTextModel.text_model, where the pipeline looks for the norm.
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return final_norm(out.hidden_states[-2]).to(dtype=encoder.dtype)

    def _call(self, image: Image.Image, request: GenerationRequest, conditioning: dict[str, Any],
              callback: Any) -> Any:
        """One pipeline call with our own prompt embeddings; float frames in [0, 1] on the device, (F, 3, H, W)."""
        out = self.pipeline(
            image=image,
            prompt_embeds=self.encode_prompt(request.prompt),
            negative_prompt_embeds=self.encode_prompt(request.negative_prompt),
            clip_skip=None,  # the embeddings above already apply clip_skip=1
            height=request.height,
            width=request.width,
            num_frames=request.num_frames,
            num_inference_steps=request.steps,
            decode_chunk_size=request.decode_chunk or DECODE_CHUNK_SIZE,
            generator=cpu_generator(request.seed),
            output_type="pt",
            **conditioning,
        )
        return out.frames[0]


def _size_multiple(pipe: Any) -> int:
    """VAE down-sampling times the UNet's: 8 × 2³ = 64 for the released model."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
