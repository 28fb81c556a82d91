"""CogVideoX image-to-video behind the `VideoModel` protocol: 8k+1 frames, and one size for the 5B I2V model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest
from i2v_daemon.models.sizing import meta_tensor, module_dtype


class CogVideoXModel(DiffusersVideoModel):
    """`CogVideoXImageToVideoPipeline` (THUDM/CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V)."""

    family = "cogvideox"
    pipeline_class = "CogVideoXImageToVideoPipeline"
    pipeline_size_multiple = 8  # its check_inputs
    fixed_size_reason = "its learned positional embeddings fix the size it was trained at"

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        transformer = pipe.transformer
        config = transformer.config
        dtype = module_dtype(transformer)
        frames = (num_frames - 1) // int(pipe.vae_scale_factor_temporal) + 1
        h, w = height // int(pipe.vae_scale_factor_spatial), width // int(pipe.vae_scale_factor_spatial)
        # guidance batches the unconditional half; the image latents are concatenated along channels
        hidden = meta_tensor(2, frames, config.in_channels, h, w, dtype=dtype)
        text = meta_tensor(2, config.max_text_seq_length, config.text_embed_dim, dtype=dtype)
        rotary = None
        if config.use_rotary_positional_embeddings:
            rotary = pipe._prepare_rotary_positional_embeddings(height, width, frames, torch.device("meta"))
        ofs = None if config.ofs_embed_dim is None else meta_tensor(1, dtype=dtype)
        return lambda: transformer(hidden, text, meta_tensor(2, dtype=torch.int64), ofs=ofs,
                                   image_rotary_emb=rotary, return_dict=False)

    @staticmethod
    def meta_decode(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        vae = pipe.vae
        frames = (num_frames - 1) // int(pipe.vae_scale_factor_temporal) + 1
        h, w = height // int(pipe.vae_scale_factor_spatial), width // int(pipe.vae_scale_factor_spatial)
        latents = meta_tensor(1, vae.config.latent_channels, frames, h, w, dtype=module_dtype(vae))
        return lambda: vae.decode(latents, return_dict=False)

    def _limits(self) -> dict[str, Any]:
        pipe = self.pipeline
        config = pipe.transformer.config
        spatial = int(pipe.vae_scale_factor_spatial)
        # The VAE decodes latent frames in pairs after the first, so only an odd number of latent
        # frames comes back whole: 1 + 2·temporal·k frames (8k+1 for the released VAE).
        step = 2 * int(pipe.vae_scale_factor_temporal)
        learned = bool(config.use_learned_positional_embeddings)
        return {
            "size_multiple": spatial * int(config.patch_size),
            "max_prompt_tokens": int(config.max_text_seq_length),
            "frame_step": step,
            "min_frames": step + 1,
            # Learned positions exist for the trained size and length only; other lengths fall back
            # to computed ones and drift, so more than that is refused and fewer are noted.
            "max_frames": int(config.sample_frames) if learned else None,
            "fixed_size": (config.sample_width * spatial, config.sample_height * spatial) if learned else None,
            # CogVideoX 1.0 makes 8 fps motion, 1.5 (temporal patches) 16 fps.
            "native_fps": 16 if config.patch_size_t else 8,
        }

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        values: dict[str, Any] = {
            "guidance_scale": request.guidance_scale,
            # Must equal the text length the transformer was built for (its positions include it).
            "max_sequence_length": self.info.max_prompt_tokens,
        }
        notes = []
        trained = self.info.max_frames
        if trained is not None and request.num_frames < trained:
            notes.append(
                f"cogvideox learned its positions for {trained} frames; {request.num_frames} frames use computed "
                "positions instead and may look less coherent"
            )
        return values, notes
