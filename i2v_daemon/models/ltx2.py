"""LTX-2 image-to-video behind the `VideoModel` protocol: sizes of 32, 8k+1 frames, frame-rate aware, video only.

`LTX2ImageToVideoPipeline` denoises an audio track together with the video (the two attend to each
other in every block) and always decodes both. The daemon writes silent videos: it takes the frames
and leaves the audio, and every job's notes say so. The audio VAE and vocoder still run once per
job, after the video's decode; their bytes count as the VAE's in a plan (models/sizing.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest
from i2v_daemon.models.sizing import meta_tensor, module_dtype

#: The pipeline's default Gemma length (its prompts are left-padded to it).
MAX_SEQUENCE_LENGTH = 1024
#: The frame rate the planner sizes the audio track for (the pipeline's default `frame_rate`): the audio's
#: length follows the video's duration, num_frames / fps.
PLANNED_FPS = 24
#: LTX-2.0's own recipe, the pipeline's defaults when LTX-2.0 was added to diffusers (0.37): classifier-free
#: guidance alone, the same scale for the audio, no spatio-temporal or modality guidance, no rescale.
#: Today's defaults are LTX-2.5's (three transformer passes a step); the daemon keeps one, batched.
LTX2_GUIDANCE = {"stg_scale": 0.0, "modality_scale": 1.0, "guidance_rescale": 0.0, "audio_stg_scale": 0.0,
                 "audio_modality_scale": 1.0, "audio_guidance_rescale": 0.0, "spatio_temporal_guidance_blocks": None}
#: The note every job carries: the track the model made is not in the video.
AUDIO_NOTE = "ltx-2 also generates an audio track with the video; it was not kept (the video is silent)"
#: Without PyAV the pipeline cannot re-compress the image as LTX-2 was trained (H.264 at CRF 33): it is
#: passed as it is, with a note.
NO_AV_NOTE = ("the image was not re-compressed with H.264 as LTX-2 was trained on (its pipeline needs PyAV: "
              "pip install av); the video may follow the image's fine detail a little differently")


def have_pyav() -> bool:
    """Whether PyAV is importable, which LTX-2's pipeline needs to re-compress the image it starts from."""
    return importlib.util.find_spec("av") is not None


def _latent_dims(pipe: Any, width: int, height: int, num_frames: int) -> tuple[int, int, int]:
    frames = (num_frames - 1) // int(pipe.vae_temporal_compression_ratio) + 1
    return frames, height // int(pipe.vae_spatial_compression_ratio), width // int(pipe.vae_spatial_compression_ratio)


def _audio_frames(pipe: Any, num_frames: int) -> int:
    """Latent audio frames for a video of `num_frames` at PLANNED_FPS, as the pipeline computes them."""
    per_second = pipe.audio_sampling_rate / pipe.audio_hop_length / float(pipe.audio_vae_temporal_compression_ratio)
    return round(num_frames / PLANNED_FPS * per_second)


class LTX2Model(DiffusersVideoModel):
    """`LTX2ImageToVideoPipeline` (Lightricks/LTX-2, 19 B): Gemma-3 prompts, the image as the first latent frame."""

    family = "ltx-2"
    pipeline_class = "LTX2ImageToVideoPipeline"
    pipeline_size_multiple = 32  # its check_inputs

    def _limits(self) -> dict[str, Any]:
        pipe = self.pipeline
        step = int(pipe.vae_temporal_compression_ratio) * int(pipe.transformer_temporal_patch_size)
        return {
            "size_multiple": int(pipe.vae_spatial_compression_ratio) * int(pipe.transformer_spatial_patch_size),
            "max_prompt_tokens": MAX_SEQUENCE_LENGTH,
            "frame_step": step,
            "min_frames": step + 1,
            "fps_conditioning": True,  # frame_rate scales its temporal positions (and the audio's length)
            # As LTX-Video's: stretching the schedule to shift_terminal fails with a single step.
            "min_steps": 2 if pipe.scheduler.config.get("shift_terminal") else 1,
        }

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        values: dict[str, Any] = {
            "guidance_scale": request.guidance_scale,
            "audio_guidance_scale": request.guidance_scale,
            **LTX2_GUIDANCE,
            "frame_rate": request.fps,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            # LTX-2.3's transformers (prompt modulation) were trained with the other modality's sigma in
            # cross-attention; LTX-2.0's with their own (the pipeline's default is the 2.3 one).
            "use_cross_timestep": bool(self.pipeline.transformer.config.get("cross_attn_mod")),
        }
        notes = [AUDIO_NOTE]
        if not have_pyav():
            values["image_crf"] = 0
            notes.append(NO_AV_NOTE)
        return values, notes

    def _tokenize(self, prompt: str) -> list[int]:
        return list(self.pipeline.tokenizer(prompt.strip(), truncation=False).input_ids)  # the pipeline strips it

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        transformer = pipe.transformer
        config = transformer.config
        dtype = module_dtype(transformer)
        frames, h, w = _latent_dims(pipe, width, height, num_frames)
        tokens = frames * h * w
        audio = _audio_frames(pipe, num_frames)
        # Guidance batches the unconditional half with the conditional one: batch 2, video and audio together.
        hidden = meta_tensor(2, tokens, config.in_channels, dtype=dtype)
        audio_hidden = meta_tensor(2, audio, config.audio_in_channels, dtype=dtype)
        if config.use_prompt_embeddings:  # LTX-2.0: the connectors give caption_channels, projected in the blocks
            text_dims = (config.caption_channels, config.caption_channels)
        else:  # LTX-2.3: the connectors project to each modality's width
            text_dims = (config.num_attention_heads * config.attention_head_dim,
                         config.audio_num_attention_heads * config.audio_attention_head_dim)
        text = meta_tensor(2, MAX_SEQUENCE_LENGTH, text_dims[0], dtype=dtype)
        audio_text = meta_tensor(2, MAX_SEQUENCE_LENGTH, text_dims[1], dtype=dtype)
        mask = meta_tensor(2, MAX_SEQUENCE_LENGTH, dtype=dtype)
        timestep = meta_tensor(2, tokens, dtype=torch.float32)  # the image's tokens carry their own (0)
        sigma = meta_tensor(2, dtype=torch.float32)
        return lambda: transformer(
            hidden_states=hidden, audio_hidden_states=audio_hidden, encoder_hidden_states=text,
            audio_encoder_hidden_states=audio_text, timestep=timestep, audio_timestep=sigma, sigma=sigma,
            encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=frames, height=h, width=w,
            fps=float(PLANNED_FPS), audio_num_frames=audio, return_dict=False,
        )

    @staticmethod
    def meta_decode(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        vae = pipe.vae
        frames, h, w = _latent_dims(pipe, width, height, num_frames)
        dtype = module_dtype(vae)
        latents = meta_tensor(1, vae.config.latent_channels, frames, h, w, dtype=dtype)
        temb = meta_tensor(1, dtype=dtype) if vae.config.timestep_conditioning else None
        audio_vae, vocoder = pipe.audio_vae, pipe.vocoder

        def decode() -> Any:
            video = vae.decode(latents, temb, return_dict=False)[0]
            if audio_vae is None or vocoder is None:
                return video
            # Then the audio, while the frames are held: its latent spectrogram, the mel bins, the waveform.
            mel_bins = audio_vae.config.mel_bins // int(pipe.audio_vae_mel_compression_ratio)
            audio_latents = meta_tensor(1, audio_vae.config.latent_channels, _audio_frames(pipe, num_frames),
                                        mel_bins, dtype=module_dtype(audio_vae))
            mel = audio_vae.decode(audio_latents, return_dict=False)[0]
            return video, vocoder(mel.to(module_dtype(vocoder)))

        return decode
