"""A tiny random HunyuanVideo-I2V pipeline, built in code for tests (see tiny.py and tiny_families.py).

The pipeline reads its prompt through a fixed Llama-3 chat template: it puts the image's 576 LLaVA
tokens at position 5 and cuts the user's text out after the template's first 103 tokens. A word-level
tokenizer over the template's own words reproduces those positions (the user's text starts at 102
instead of 103: one template token more in the prompt), and a LLaVA whose vision tower makes 576
patches of 8 channels keeps the image tokens' count; everything else is a handful of channels.
"""

from __future__ import annotations

import re
from typing import Any

#: The Llama-3 special tokens the template uses, and the two a tokenizer needs besides.
_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>", "<pad>", "<unk>")
#: How the tokenizer cuts text: paragraph and line breaks, words, single punctuation marks.
_PIECES = r"\n\n|\n|[A-Za-z0-9]+|[^\sA-Za-z0-9]"


def llama_template_tokenizer() -> Any:
    """A word-level tokenizer knowing the words of HunyuanVideo-I2V's prompt template and single letters."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    template = str(DEFAULT_PROMPT_TEMPLATE["template"]).replace("{}", "")
    words = sorted(set(re.findall(_PIECES, template)) | set("abcdefghijklmnopqrstuvwxyz.,!?'") - set(_SPECIAL))
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*_SPECIAL, *words])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n\n|\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"[^\sA-Za-z0-9]"), behavior="isolated"),
        ]
    )
    tokenizer.add_special_tokens(list(_SPECIAL))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_hunyuan_video_i2v(latent_concat: bool = False) -> Any:
    """HunyuanVideo-I2V's 16-channel "token_replace" release in miniature: the first latent frame is the image's,
    guidance is embedded (one transformer call a step), the VAE compresses 8× in space and 4× in time.
    `latent_concat=True` is the -33ch release instead: image latents and a mask concatenated to the noise
    (2·4 + 1 channels), no guidance embedding (true guidance, two calls a step)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from i2v_daemon.models.testing.tiny import byte_level_tokenizer

    tokenizer = llama_template_tokenizer()
    vocab = tokenizer.get_vocab()
    # 48-pixel images in 2-pixel patches: 24×24 = 576 image tokens, as CLIP-L/336 makes in the released one.
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=48, patch_size=2
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=vocab["<pad>"],
        ),
        image_token_index=vocab["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config.pad_token_id = vocab["<pad>"]  # the pipeline pads the image's expanded tokens with it
    text_encoder = LlavaForConditionalGeneration(config)
    clip_tokenizer, clip_vocab = byte_level_tokenizer()
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_vocab),
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=77,
            bos_token_id=clip_vocab["<|startoftext|>"],
            eos_token_id=clip_vocab["<|endoftext|>"],
            pad_token_id=clip_vocab["<|endoftext|>"],
        )
    )
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=2,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=9 if latent_concat else 4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=not latent_concat,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
        image_condition_type="latent_concat" if latent_concat else "token_replace",
    )
    return HunyuanVideoImageToVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),  # the released scheduler's shift
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        image_processor=CLIPImageProcessor(size=48, crop_size=48),
    )
