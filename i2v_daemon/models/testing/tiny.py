"""Random-weight pipelines built in code: a tiny one of every family for tests, a full-size I2VGen-XL for timing.

They use the real diffusers and transformers classes, so the loading, encoding and denoising
code that runs on them is the code that runs on the released weights. Nothing is downloaded:
tokenizers are made from in-code vocabularies (byte-level CLIP; a character-level T5 unigram
model, which needs neither sentencepiece nor protobuf with transformers 5).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import I2VGenXLPipeline
    from transformers import CLIPTokenizer

#: The CLIP text encoder's context length in the released model; prompt budgets depend on it.
MAX_PROMPT_TOKENS = 77


def byte_level_tokenizer(model_max_length: int = MAX_PROMPT_TOKENS) -> tuple[CLIPTokenizer, dict[str, int]]:
    """A CLIP tokenizer over single bytes (no merges), built without any download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Every byte, alone and as a word end, so any UTF-8 text tokenizes without unknowns.
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length), vocab


def _scheduler() -> Any:
    """The released model's DDIM settings (v-prediction, zero-terminal-SNR)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="leading",
        clip_sample=False,
    )


def _tiny_components(vocab: dict[str, int]) -> dict[str, Any]:
    """The smallest modules that still wire together like the released model."""
    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    context_dim = 8  # text hidden size = image projection = UNet cross-attention width
    unet = I2VGenXLUNet(
        sample_size=8,
        block_out_channels=(4, 8),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        norm_num_groups=2,
        cross_attention_dim=context_dim,
        # The UNet reads this as the number of heads (a diffusers naming quirk): 2 heads of
        # 2 and 4 channels in the blocks, 8 heads of 2 in the temporal input transformer.
        attention_head_dim=2,
    )
    # Four VAE levels keep the released model's 8x down-sampling, so latent sizes match.
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
    )
    special = {
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=context_dim,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,  # two, so hidden_states[-2] (clip_skip=1) differs from the last
            projection_dim=context_dim,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            hidden_act="gelu",
            **special,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            image_size=32,
            patch_size=16,
            projection_dim=context_dim,
            hidden_act="gelu",
        )
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "image_encoder": image_encoder,
        "feature_extractor": CLIPImageProcessor(crop_size=32, size=32),
    }


def build_tiny_i2vgen_xl(path: Path, seed: int = 0) -> Path:
    """Save a tiny random I2VGen-XL pipeline to `path` (a diffusers folder) and return `path`."""
    from diffusers import I2VGenXLPipeline

    tokenizer, vocab = byte_level_tokenizer()
    # fork_rng keeps the caller's global RNG untouched while the weights come from `seed`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = _tiny_components(vocab)
    pipe = I2VGenXLPipeline(tokenizer=tokenizer, scheduler=_scheduler(), **components)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def build_full_size_i2vgen_xl(device: str = "cuda", dtype: torch.dtype = torch.float16) -> I2VGenXLPipeline:
    """The released I2VGen-XL architecture with random weights (same FLOPs and memory), for benchmarks."""
    from diffusers import AutoencoderKL, I2VGenXLPipeline, I2VGenXLUNet
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tokenizer, vocab = byte_level_tokenizer()
    # Building on the target device skips a slow CPU initialisation of ~2.5 B parameters.
    torch.manual_seed(0)
    with torch.device(device):
        unet = I2VGenXLUNet(sample_size=32).to(dtype)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
        ).to(dtype)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1024,
                intermediate_size=4096,
                num_attention_heads=16,
                num_hidden_layers=23,
                projection_dim=1024,
                hidden_act="gelu",
                max_position_embeddings=MAX_PROMPT_TOKENS,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        ).to(dtype)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_attention_heads=16,
                num_hidden_layers=32,
                patch_size=14,
                image_size=224,
                projection_dim=1024,
                hidden_act="gelu",
            )
        ).to(dtype)
    pipe = I2VGenXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=image_encoder,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
        unet=unet,
        scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny(family: str, path: Path, seed: int = 0, **options: Any) -> Path:
    """Save a tiny random pipeline of `family` to `path` (a diffusers folder) and return `path`.

    `options` go to the family's builder in tiny_families.py (e.g. `vae_patch_size=1` for LTX-Video).
    """
    if family == "i2vgen-xl":
        return build_tiny_i2vgen_xl(path, seed)
    from i2v_daemon.models.testing.tiny_families import TINY_BUILDERS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = TINY_BUILDERS[family](**options)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def build_tiny_lora(family_dir: Path, path: Path, seed: int = 0) -> Path:
    """A random LoRA (rank 2 on the attention projections) for the tiny pipeline in `family_dir`, saved at `path`."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(family_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.transformer.add_adapter(LoraConfig(
            r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False,
        ))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(
        path.parent, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer), weight_name=path.name,
    )
    return path


def build_tiny_gguf(family_dir: Path, path: Path, architecture: str = "wan") -> Path:
    """The transformer of the tiny pipeline in `family_dir` as a GGUF file at `path` (needs the gguf package).

    Tensors are named as diffusers names them (its GGUF loader takes those as they are); each 2-D weight
    whose rows are whole 32-value blocks is quantized to Q8_0, the rest stay float32, as the quantizers
    that publish GGUF transformers keep small and 1-D tensors unquantized.
    """
    import gguf
    from diffusers import DiffusionPipeline

    transformer = DiffusionPipeline.from_pretrained(family_dir).transformer
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    for name, tensor in transformer.state_dict().items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
