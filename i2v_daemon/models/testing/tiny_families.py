"""Tiny random pipelines of every family but I2VGen-XL, built in code for tests (see tiny.py).

Each keeps its released model's down-sampling (so sizes and frame counts round as they do on the
real weights) with a handful of channels, so a 96×64, 9-frame, 2-step job takes well under a
second on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Characters the tiny T5 vocabulary knows; anything else becomes <unk>, one token each.
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-"


def t5_tokenizer(model_max_length: int) -> Any:
    """A character-level T5 tokenizer (unigram over single characters), built without any download."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in _T5_CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _t5_config(vocab_size: int, umt5: bool = False) -> Any:
    from transformers import T5Config, UMT5Config

    config = UMT5Config if umt5 else T5Config
    return config(
        vocab_size=vocab_size, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def _tiny_svd(vae_levels: int = 4) -> Any:
    """`vae_levels` below 4 makes a VAE that down-samples less than the released one (2^(levels-1))."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=8, num_attention_heads=2, addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,  # fps, motion bucket, noise strength × 8
        num_frames=8,
    )
    # GroupNorm in the temporal VAE is fixed at 32 groups: 32 channels is its smallest width.
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32,) * vae_levels, down_block_types=("DownEncoderBlock2D",) * vae_levels,
        latent_channels=4, layers_per_block=1,
    )
    # The pipeline resizes the image to 224×224 for CLIP itself; 32-pixel patches keep it to 49 tokens.
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=8, projection_dim=8, num_hidden_layers=1, num_attention_heads=2, image_size=224,
        intermediate_size=16, patch_size=32,
    ))
    scheduler = EulerDiscreteScheduler(  # the released img2vid-xt scheduler
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )


def _tiny_wan(head_dim: int = 4, ffn_dim: int = 16, experts: int = 1, layers: int = 1) -> Any:
    """`head_dim` 16 and `ffn_dim` 32 make layers 32 wide, GGUF's block (tests of `weights = "gguf"`);
    `experts=2` is Wan 2.2 A14B's shape: a high-noise `transformer` and a low-noise `transformer_2`
    switched at `boundary_ratio`, no image encoder (the image enters as latents only); `layers=2` gives
    the transformer the first and last block that step caches tell apart."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5EncoderModel

    tokenizer = t5_tokenizer(512)
    # Three down-samplings (8×) in space, two (4×) in time, as in the released VAE.
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])

    def transformer(image_dim: int | None) -> Any:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=36,
            out_channels=16, text_dim=8, freq_dim=16, ffn_dim=ffn_dim, num_layers=layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        )

    # The released 480P model's scheduler (the 720P one shifts by 5.0).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    if experts == 2:  # Wan 2.2 A14B: the image enters as latents only
        experts_made = (transformer(None), transformer(None))
        return WanImageToVideoPipeline(
            tokenizer=tokenizer, text_encoder=UMT5EncoderModel(_t5_config(len(tokenizer), umt5=True)), vae=vae,
            scheduler=scheduler, transformer=experts_made[0], transformer_2=experts_made[1], boundary_ratio=0.9,
        )
    # Built in this order (the seed's draws) since the first tiny Wan, so its weights stay the same.
    first = transformer(8)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, image_size=32, intermediate_size=16, patch_size=16,
    ))
    return WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=UMT5EncoderModel(_t5_config(len(tokenizer), umt5=True)), vae=vae,
        scheduler=scheduler, image_processor=CLIPImageProcessor(crop_size=32, size=32), image_encoder=image_encoder,
        transformer=first,
    )


def _tiny_ltx(vae_patch_size: int = 4, condition: bool = False) -> Any:
    """`vae_patch_size` below 4 makes a VAE that compresses space less than the released one (8·patch);
    `condition=True` is LTX-Video 0.9.5's shape: `LTXConditionPipeline`, a timestep-aware VAE decoder and
    0.9.5's scheduler (no dynamic shifting: the pipeline passes its own linear-quadratic schedule)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXConditionPipeline,
        LTXImageToVideoPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5EncoderModel

    tokenizer = t5_tokenizer(128)
    # 4-pixel patches and three space-time down-samplings: 32× in space, 8× in time, as released.
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=condition, patch_size=vae_patch_size, patch_size_t=1,
    )
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=4,
        cross_attention_dim=8, num_layers=1, caption_channels=8,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # the released scheduler's shifting
        base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05, shift_terminal=0.1,
        use_dynamic_shifting=True,
    )
    if condition:
        return LTXConditionPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False), vae=vae,
            text_encoder=T5EncoderModel(_t5_config(len(tokenizer))), tokenizer=t5_tokenizer(256),
            transformer=transformer,
        )
    return LTXImageToVideoPipeline(
        scheduler=scheduler, vae=vae, text_encoder=T5EncoderModel(_t5_config(len(tokenizer))), tokenizer=tokenizer,
        transformer=transformer,
    )


def _tiny_cogvideox() -> Any:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5EncoderModel

    tokenizer = t5_tokenizer(16)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    # Learned positions fix the size, as in CogVideoX-5b-I2V (720×480, 49 frames): here 96×64, 9 frames.
    # Head width 16: the rotary embedding splits it 4/6/6 over time, height and width, all even.
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=1, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
    )
    scheduler = CogVideoXDDIMScheduler(  # the released I2V model's settings
        beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing", clip_sample=False, snr_shift_scale=1.0,
    )
    return CogVideoXImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=T5EncoderModel(_t5_config(len(tokenizer))), vae=vae,
        transformer=transformer, scheduler=scheduler,
    )


def _tiny_skyreels_v2() -> Any:
    """Wan 2.1's shape with SkyReels' transformer: CLIP image tokens enter through their own K/V projections
    (`added_kv_proj_dim`, as in the released I2V models), and the image processor is a CLIPProcessor."""
    from diffusers import (
        AutoencoderKLWan,
        SkyReelsV2ImageToVideoPipeline,
        SkyReelsV2Transformer3DModel,
        UniPCMultistepScheduler,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        UMT5EncoderModel,
    )

    from i2v_daemon.models.testing.tiny import byte_level_tokenizer

    tokenizer = t5_tokenizer(512)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4, in_channels=36, out_channels=16,
        text_dim=8, freq_dim=16, ffn_dim=16, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=8, added_kv_proj_dim=8,
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=8, projection_dim=8, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=16,
    ))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(crop_size=32, size=32),
                              tokenizer=byte_level_tokenizer()[0])
    # The I2V models' flow shift (the pipeline's example: 5.0 for I2V).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    return SkyReelsV2ImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=UMT5EncoderModel(_t5_config(len(tokenizer), umt5=True)), vae=vae,
        image_encoder=image_encoder, image_processor=processor, transformer=transformer, scheduler=scheduler,
    )


def _tiny_hunyuan_video_i2v(latent_concat: bool = False) -> Any:
    from i2v_daemon.models.testing.tiny_hunyuan import tiny_hunyuan_video_i2v

    return tiny_hunyuan_video_i2v(latent_concat)


def _tiny_ltx2() -> Any:
    from i2v_daemon.models.testing.tiny_ltx2 import tiny_ltx2

    return tiny_ltx2()


def _tiny_hunyuan_video15_i2v() -> Any:
    from i2v_daemon.models.testing.tiny_hunyuan import tiny_hunyuan_video15_i2v

    return tiny_hunyuan_video15_i2v()


#: family -> its tiny pipeline's builder (keyword options change its down-sampling, for planning tests).
TINY_BUILDERS: dict[str, Callable[..., Any]] = {
    "svd": _tiny_svd,
    "wan": _tiny_wan,
    "ltx-video": _tiny_ltx,
    "cogvideox": _tiny_cogvideox,
    "skyreels-v2": _tiny_skyreels_v2,
    "hunyuanvideo-i2v": _tiny_hunyuan_video_i2v,
    "ltx-2": _tiny_ltx2,
    "hunyuanvideo-1.5-i2v": _tiny_hunyuan_video15_i2v,
}
