"""Tiny random HunyuanVideo-I2V and HunyuanVideo 1.5 I2V pipelines, built in code for tests (see tiny.py).

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


#: Qwen2's pre-tokenizer pattern: words with their leading space, single digits, punctuation runs, line breaks,
#: space runs. Over whole words it cuts HunyuanVideo 1.5's system message into the 108 tokens its pipeline
#: crops (prompt_template_encode_start_idx), as Qwen2.5-VL's tokenizer does.
_QWEN_PIECES = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
#: Qwen's chat template for text messages (what Qwen2.5-VL's template makes of string contents).
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Words of the tests' prompts besides the template's (anything else is <unk>, one token a word).
_PROMPT_WORDS = "a cat turns its head blurry the sea an owl blinks bee lands dog wags hello"


def _system_message() -> str:
    """HunyuanVideo 1.5's system message: the pipeline sets it in __init__, and states it as the default of
    its prompt encoder's `system_message` too."""
    import inspect

    from diffusers import HunyuanVideo15ImageToVideoPipeline

    return str(inspect.signature(HunyuanVideo15ImageToVideoPipeline._get_mllm_prompt_embeds)
               .parameters["system_message"].default)


def qwen_template_tokenizer(system_message: str) -> Any:
    """A word-level tokenizer cutting text as Qwen2's does, knowing the template's words and the tests' ones."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    split = pre_tokenizers.Split(Regex(_QWEN_PIECES), behavior="isolated")
    text = f"system\nuser\nassistant\n{system_message} {_PROMPT_WORDS} " + " ".join(_PROMPT_WORDS.split()).title()
    pieces = sorted({p for p, _ in split.pre_tokenize_str(text)} | set(_PROMPT_WORDS.split()))
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*special, *pieces])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = split
    tokenizer.add_special_tokens(special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        chat_template=_QWEN_TEMPLATE, padding_side="right",  # as the conversion script loads Qwen's
    )


def tiny_hunyuan_video15_i2v() -> Any:
    """HunyuanVideo 1.5 I2V in miniature: the released VAE's compression (16× in space, 4× in time), a
    Qwen2.5-VL text model, a byT5 encoder with byte-level ByT5 tokens, a SigLIP image encoder, and buckets of
    about 80×80 pixels (`target_size` 80, so 96×64 is the bucket of a 3:2 image), classifier-free guidance at 6 in
    its guider (the 480p I2V release's)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    tokenizer = qwen_template_tokenizer(_system_message())
    # Qwen2.5-VL's multimodal rotary sections (a head of 8: 1, 1 and 2 pairs), under transformers 4.x's name,
    # which 5.x reads too.
    mrope: dict[str, Any] = {"rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}}
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **mrope,
    ))
    tokenizer_2 = ByT5Tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    ))
    # 28-pixel images in 14-pixel patches: 4 image tokens (the released SigLIP makes 729 of 384 pixels).
    image_encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
    ))
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
        rope_axes_dim=(2, 2, 4), target_size=80, task_type="i2v",
    )
    return HunyuanVideo15ImageToVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),  # the 480p I2V release's shift
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=6.0),
        image_encoder=image_encoder, feature_extractor=SiglipImageProcessor(size={"height": 28, "width": 28}),
    )
