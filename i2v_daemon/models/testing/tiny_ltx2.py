"""A tiny random LTX-2 image-to-video pipeline, built in code for tests (see tiny.py and tiny_families.py).

The released model's down-sampling (the video VAE: 32× in space, 8× in time; the audio VAE: 4× in time
and mel bins) with a handful of channels; a two-layer Gemma-3 whose three hidden states the connectors
read, as the released connectors read Gemma-3-12B's 49; a word-level tokenizer built without a download.
"""

from __future__ import annotations

from typing import Any

#: What the tokenizer knows besides its special tokens: every letter, digit and punctuation mark alone and
#: the words of the tests' prompts; anything else is <unk>, one token a word.
_WORDS = (*"abcdefghijklmnopqrstuvwxyz0123456789.,!?'-", "a", "cat", "turns", "its", "head", "blurry", "dog",
          "the", "sea", "bee", "lands", "an", "owl", "blinks")


def gemma_like_tokenizer(model_max_length: int) -> Any:
    """A word-level tokenizer with Gemma's special tokens (<bos> first, <pad> for the pipeline's left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ("<pad>", "<eos>", "<bos>", "<unk>")
    vocab = {t: i for i, t in enumerate([*special, *dict.fromkeys(_WORDS)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(special))
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_ltx2() -> Any:
    """LTX-2.0 in miniature: Gemma-3 → connectors → the audio-video transformer (one block), the video VAE,
    the audio VAE and vocoder; the released scheduler's shifting."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2ImageToVideoPipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from i2v_daemon.models.ltx2 import MAX_SEQUENCE_LENGTH

    tokenizer = gemma_like_tokenizer(MAX_SEQUENCE_LENGTH)
    layers, width = 2, 16
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=Gemma3TextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=32, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=16, pad_token_id=0,
        ),
        vision_config=SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    ))
    # The released connectors: the text encoder's hidden states of every layer (and the embeddings), stacked.
    connectors = LTX2TextConnectors(
        caption_channels=width, text_proj_in_factor=layers + 1, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_type="split",
    )
    # The released VAE's 4-pixel patches and its four down-samplings (space, time, space-time, space-time);
    # its config states the compression, which the pipeline reads, as the released one does.
    vae = AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 16, 32),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), timestep_conditioning=False,
        spatial_compression_ratio=32, temporal_compression_ratio=8,
    )
    stereo, mel_bins = 2, 8
    audio_vae = AutoencoderKLLTX2Audio(base_channels=4, output_channels=stereo, ch_mult=(1, 2), num_res_blocks=1,
                                       latent_channels=2, mel_bins=mel_bins, resolution=32)
    vocoder = LTX2Vocoder(
        in_channels=stereo * mel_bins, hidden_channels=8, out_channels=stereo,
        upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3]],
        output_sampling_rate=16000,
    )
    # Audio tokens: the audio VAE's 2 latent channels × 8 mel bins / 4.
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=1, caption_channels=width, rope_type="split",
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # the released non-distilled scheduler's shifting
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return LTX2ImageToVideoPipeline(
        scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder, tokenizer=tokenizer,
        connectors=connectors, transformer=transformer, vocoder=vocoder,
    )
