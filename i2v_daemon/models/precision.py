"""Lower-precision weights on a pipeline: fp8 storage of the denoisers, a GGUF transformer, torchao quantization.

What each does to the model, and the errors (with their fix) when the user's choice cannot work:
a file for another model, a family whose transformer diffusers cannot read from one file, a
torchao type this device cannot run. Which weights to use is the config's (i2v_daemon/weights.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from i2v_daemon.errors import ConfigError, first_line
from i2v_daemon.models.gpu import is_oom
from i2v_daemon.models.loader import read_model_index
from i2v_daemon.weights import TORCHAO_TYPES, Weights

#: Attributes that may hold a denoising network (Wan 2.2 has two experts).
DENOISERS = ("unet", "transformer", "transformer_2")
#: fp8 storage: 4 bits of exponent and 3 of mantissa keep weights' range; each layer is cast up for its forward.
FP8_STORAGE = torch.float8_e4m3fn


def denoisers_of(pipeline: Any) -> list[Any]:
    """The denoising networks a pipeline holds (one, or Wan 2.2's two experts)."""
    return [m for m in (getattr(pipeline, name, None) for name in DENOISERS) if m is not None]


def store_in_fp8(modules: Iterable[Any], dtype: str) -> None:
    """Keep `modules`' weights in float8, each layer cast to `dtype` for its own forward and back after it.

    diffusers' layerwise casting: it leaves the layers it knows to be precision-critical (norms,
    patch and position embeddings, the first and last projections) as they are. It cannot be undone
    in place; the model's own weights come back only by loading it again.
    """
    for module in modules:
        module.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=getattr(torch, dtype))


def pipeline_arguments(model: str, dtype: str, weights: Weights) -> dict[str, Any]:
    """What `from_pretrained` needs besides the model for `weights`: a GGUF transformer, or a torchao config."""
    if weights.kind == "gguf":
        return {"transformer": gguf_transformer(model, str(weights.file), dtype)}
    if weights.kind == "torchao":
        return {"quantization_config": torchao_config(model, weights.torchao_type)}
    return {}


def gguf_transformer(model: str, file: str, dtype: str) -> Any:
    """The transformer of `model` read from GGUF `file`, its quantized layers dequantized to `dtype` per forward."""
    import diffusers
    from diffusers import GGUFQuantizationConfig
    from diffusers.loaders.single_file_model import _get_single_file_loadable_mapping_class

    entry = read_model_index(model).get("transformer")
    class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or _get_single_file_loadable_mapping_class(cls) is None:
        raise ConfigError(
            f"weights_file: model {model!r} has no transformer diffusers can read from one file ({class_name}); "
            "weights = 'gguf' works for wan and ltx-video: use weights = 'fp8' or 'torchao' for this model"
        )
    torch_dtype = getattr(torch, dtype)
    try:
        return cls.from_single_file(
            file, config=model, subfolder="transformer", torch_dtype=torch_dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch_dtype),
        )
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as err:
        if is_oom(err):
            raise
        raise ConfigError(
            f"weights_file {file!r} does not fit model {model!r}'s transformer ({class_name}: "
            f"{first_line(err, limit=200)}); use a GGUF made from this model's own transformer, or set weights = 'auto'"
        ) from err


def torchao_config(model: str, torchao_type: str) -> Any:
    """A PipelineQuantizationConfig quantizing `model`'s denoisers with torchao's `torchao_type`."""
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao import quantization

    config = getattr(quantization, TORCHAO_TYPES[torchao_type])()
    present = [name for name in DENOISERS if _component(read_model_index(model).get(name))]
    mapping: dict[str, Any] = {name: TorchAoConfig(config) for name in present}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def torchao_failed(err: BaseException, torchao_type: str) -> ConfigError | None:
    """The ConfigError for a torchao type this device or model cannot take; None for an error that is not that."""
    if is_oom(err) or not isinstance(err, ValueError | RuntimeError | NotImplementedError | TypeError | AssertionError):
        return None
    return ConfigError(
        f"torchao_type {torchao_type!r} cannot quantize this model here ({first_line(err, limit=200)}); "
        "int8wo runs on every device: set torchao_type = 'int8wo', or weights = 'fp8'"
    )


def _component(entry: Any) -> bool:
    """Whether a model_index.json entry names a component (Wan 2.1 writes [null, null] for transformer_2)."""
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
