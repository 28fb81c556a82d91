"""Which pipeline family a model is, and loading it behind the `VideoModel` protocol.

Importing this module is cheap: torch, diffusers and huggingface_hub are imported only when a
model is actually detected or loaded.
"""

from __future__ import annotations

import importlib
import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon.errors import ConfigError, I2VError, ModelUnavailable, first_line
from i2v_daemon.weights import Weights, problem

if TYPE_CHECKING:
    from i2v_daemon.models.base import VideoModel

#: `_class_name` in a pipeline's model_index.json -> our family name.
FAMILIES: dict[str, str] = {
    "I2VGenXLPipeline": "i2vgen-xl",
    "StableVideoDiffusionPipeline": "svd",
    "WanImageToVideoPipeline": "wan",
    "LTXImageToVideoPipeline": "ltx-video",
    # Lightricks/LTX-Video is published as the text-to-video pipeline; its image-to-video pipeline
    # loads the very same components, as diffusers' own LTX documentation does.
    "LTXPipeline": "ltx-video",
    # LTX-Video 0.9.5 and later: the same components, the image as a keyframe condition (ltx.py).
    "LTXConditionPipeline": "ltx-video",
    "CogVideoXImageToVideoPipeline": "cogvideox",
    "SkyReelsV2ImageToVideoPipeline": "skyreels-v2",
    "HunyuanVideoImageToVideoPipeline": "hunyuanvideo-i2v",
    # LTX-2's diffusers folders are published as its text-to-video pipeline; its image-to-video pipeline
    # loads the very same components (as LTX-Video's do).
    "LTX2Pipeline": "ltx-2",
    "LTX2ImageToVideoPipeline": "ltx-2",
    "HunyuanVideo15ImageToVideoPipeline": "hunyuanvideo-1.5-i2v",
}

#: family name -> "module:Class" of its adapter; imported only when that family is loaded.
ADAPTERS: dict[str, str] = {
    "i2vgen-xl": "i2v_daemon.models.i2vgen_xl:I2VGenXLModel",
    "svd": "i2v_daemon.models.svd:SVDModel",
    "wan": "i2v_daemon.models.wan:WanModel",
    "ltx-video": "i2v_daemon.models.ltx:LTXModel",
    "cogvideox": "i2v_daemon.models.cogvideox:CogVideoXModel",
    "skyreels-v2": "i2v_daemon.models.skyreels:SkyReelsV2Model",
    "hunyuanvideo-i2v": "i2v_daemon.models.hunyuan_video:HunyuanVideoI2VModel",
    "ltx-2": "i2v_daemon.models.ltx2:LTX2Model",
    "hunyuanvideo-1.5-i2v": "i2v_daemon.models.hunyuan_video15:HunyuanVideo15I2VModel",
}

#: `_class_name` -> "module:Class" of the adapter that runs it, where not its family's own (same limits, another call).
PIPELINE_ADAPTERS: dict[str, str] = {"LTXConditionPipeline": "i2v_daemon.models.ltx:LTXConditionModel"}

#: dtype "auto" on a GPU, by family: the T5/umT5 text encoders of the newer families overflow in
#: float16, so their model cards run them in bfloat16; the UNet families were released in fp16.
HALF_DTYPES: dict[str, str] = {
    "wan": "bfloat16", "ltx-video": "bfloat16", "cogvideox": "bfloat16", "skyreels-v2": "bfloat16",
    "hunyuanvideo-i2v": "bfloat16",  # its Llama-3 encoder too; the model card's example loads them in fp16
    "ltx-2": "bfloat16",  # its Gemma-3 encoder too, as diffusers' LTX-2 examples load it
    # Tencent's own generate.py runs the transformer in bf16 (its Qwen2.5-VL encoder too); the diffusers
    # example loads the pipeline in fp16.
    "hunyuanvideo-1.5-i2v": "bfloat16",
}

DTYPES = ("float16", "bfloat16", "float32")

#: Families whose transformer diffusers reads from one file (`weights = "gguf"`) -> the names their GGUF
#: files give as `general.architecture` (city96's converter writes these; a file without one is left to the load).
GGUF_FAMILIES: dict[str, tuple[str, ...]] = {"wan": ("wan",), "ltx-video": ("ltxv", "ltx")}


def detect_family(model: str) -> str:
    """The family of `model` (a local diffusers folder or a Hub repo id), from its model_index.json."""
    class_name = read_model_index(model).get("_class_name")
    family = FAMILIES.get(str(class_name))
    if family is None:
        supported = ", ".join(f"{cls} ({fam})" for cls, fam in FAMILIES.items())
        raise ConfigError(
            f"model {model!r} is a {class_name or 'pipeline without a _class_name'}, which i2v-daemon "
            f"does not support yet; supported pipelines: {supported}. Set `model` to one of those."
        )
    return family


def check_never_loads(model: str) -> None:
    """ConfigError when `model` can never load, as far as is known without the network or a load.

    A folder that does not exist (or a file), or a pipeline i2v-daemon does not support; a Hub id
    is left to the load, which may have to fetch it.
    """
    if local_folder(model) is not None:
        detect_family(model)


def check_weights(model: str, weights: Weights, prefix: str = "") -> None:
    """ConfigError when `model` can never run with `weights`, as far as is told without torch or a load.

    GGUF only, and only for a local folder (a Hub id's family is known once it is fetched): a family
    whose denoiser diffusers cannot read from one file, Wan 2.2's two experts (one file names one),
    a file that is not GGUF or holds another architecture. `prefix` names the setting ("models.wan.").
    """
    file = Path(weights.file) if weights.file is not None else None
    said = problem(weights.kind, file, f"{prefix}weights")  # the package, the file, on this host
    if said:
        raise ConfigError(said)
    if weights.kind != "gguf" or local_folder(model) is None:
        return
    family = detect_family(model)
    if family not in GGUF_FAMILIES:
        part = "a UNet" if family in ("i2vgen-xl", "svd") else "a transformer without a single-file loader"
        raise ConfigError(
            f"{prefix}weights: 'gguf' replaces a transformer, and {family} ({model}) has {part}; diffusers reads "
            f"one from a GGUF file only for {' and '.join(GGUF_FAMILIES)}; use weights = 'fp8' (or 'torchao') for it"
        )
    second = read_model_index(model).get("transformer_2")
    if isinstance(second, list) and len(second) == 2 and second[1] is not None:
        raise ConfigError(
            f"{prefix}weights: {model} has two experts (transformer and transformer_2, as Wan 2.2 A14B) and "
            f"{prefix}weights_file names one file; use weights = 'fp8' for it"
        )
    architecture = gguf_architecture(str(weights.file), f"{prefix}weights_file")
    if architecture is not None and architecture not in GGUF_FAMILIES[family]:
        raise ConfigError(
            f"{prefix}weights_file: {str(weights.file)!r} holds a {architecture!r} model, and {model} is {family}; "
            "use a GGUF of this model's transformer"
        )


def gguf_architecture(file: str, key: str = "weights_file") -> str | None:
    """The `general.architecture` a GGUF file states, None if it states none; ConfigError if it is not GGUF."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(file).fields.get("general.architecture")
    except (OSError, ValueError, IndexError, KeyError) as err:
        raise ConfigError(
            f"{key}: {file!r} is not a GGUF file ({first_line(err, limit=120)}); give a .gguf file of the "
            "model's transformer"
        ) from err
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def load_model(
    model: str, device: str = "auto", dtype: str = "auto", weights: Weights | None = None, placement: str = "gpu",
) -> VideoModel:
    """Detect the family of `model` and load it once onto the host with `weights`, then place it on `device`."""
    family = detect_family(model)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device, family)
    weights = weights or Weights()
    check_weights(model, weights)
    return adapter_class(model)(model, device=resolved_device, dtype=resolved_dtype, weights=weights,
                                placement=placement)


def adapter_class(model: str) -> Any:
    """The adapter class that runs `model`: its pipeline's own where PIPELINE_ADAPTERS names one, else its family's."""
    path = PIPELINE_ADAPTERS.get(str(read_model_index(model).get("_class_name"))) or ADAPTERS[detect_family(model)]
    module_name, class_name = path.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def config_folder(model: str) -> Path | None:
    """The folder holding `model`'s configs: itself when local, its Hub snapshot when cached; else None."""
    folder = local_folder(model)
    if folder is not None:
        return folder
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model, "model_index.json", local_files_only=True)).parent
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def missing_pipeline_class(cls: str) -> str | None:
    """The installed diffusers' version when it has no pipeline class `cls`, else None (nothing is imported)."""
    import diffusers

    # the lazy module lists every pipeline without importing it
    return None if cls in dir(diffusers) else str(diffusers.__version__)


def read_model_index(model: str) -> dict[str, Any]:
    """The parsed model_index.json of a local folder or Hub repo id."""
    folder = local_folder(model)
    index = folder / "model_index.json" if folder is not None else _download_model_index(model)
    if not index.is_file():
        raise ConfigError(
            f"model folder {str(folder)!r} has no model_index.json: set `model` to a diffusers "
            "pipeline folder (the one holding model_index.json and the unet/, vae/, … subfolders)."
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {model!r}: cannot read {index} ({err}); re-download the model.") from err
    if not isinstance(data, dict):
        raise ConfigError(f"model {model!r}: {index} is not a JSON object; re-download the model.")
    return data


def local_folder(model: str, key: str = "model") -> Path | None:
    """`model` as a local folder, or None when it names a Hub repo; a missing path is an error naming `key`."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"model {model!r} is a file; set `{key}` to a diffusers folder or a Hub repo id.")
    # A Hub id is "owner/name"; anything else that looks like a path was meant to be a folder.
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ConfigError(
            f"model folder {model!r} does not exist; set `{key}` to an existing diffusers folder "
            "or to a Hugging Face repo id such as 'ali-vilab/i2vgen-xl'."
        )
    return None


def model_unavailable(model: str, why: BaseException | str) -> ModelUnavailable:
    """A Hub model that cannot be fetched right now (not cached, and offline or the Hub unreachable)."""
    from huggingface_hub import constants

    from i2v_daemon.models.hub import hub_cli

    detail = why if isinstance(why, str) else first_line(why, with_type=True)
    return ModelUnavailable(
        f"model {model!r} is not (completely) in the Hugging Face cache and cannot be downloaded now ({detail}). "
        f"Download it once where the Hub can be reached (`HF_HOME={constants.HF_HOME} {hub_cli()} download "
        f"{model}`), then set HF_HUB_OFFLINE=1 to run offline; or set `model` to a local diffusers folder. "
        "The daemon keeps the jobs queued and tries again."
    )


def _download_model_index(model: str) -> Path:
    """model_index.json of a Hub repo: from the cache, else after one bounded question to the Hub.

    ConfigError when the repo can never serve (unknown, gated, not a diffusers pipeline, a bad id);
    ModelUnavailable when it cannot be fetched right now (offline, the Hub unreachable or overloaded).
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    from i2v_daemon.models.hub import HUB_PROBE_SECONDS, HubProbe

    try:
        return Path(hf_hub_download(model, "model_index.json", local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached
    except (HFValidationError, ValueError) as err:
        raise ConfigError(f"model {model!r} is not a valid Hugging Face repo id ({err}); set `model`.") from err
    if constants.HF_HUB_OFFLINE:
        raise model_unavailable(model, "HF_HUB_OFFLINE is set and it is not cached")
    verdict, detail = HubProbe(seconds=2 * HUB_PROBE_SECONDS).ask(model)
    if verdict == "down":
        raise model_unavailable(model, f"the Hub did not answer: {detail}")
    if verdict == "not_pipeline":
        raise ConfigError(
            f"Hub repo {model!r} has no model_index.json, so it is not a diffusers pipeline; "
            "set `model` to a diffusers repo such as 'ali-vilab/i2vgen-xl'."
        )
    if verdict != "ok":  # missing, gated, refused: no retry makes it work
        raise ConfigError(f"model {model!r} cannot be had from the Hugging Face Hub ({detail}); check `model` "
                          "(and, for a gated repo, the daemon's token).")
    try:
        return Path(hf_hub_download(model, "model_index.json"))
    except (OSError, ValueError) as err:  # the network went away in between
        raise model_unavailable(model, err) from err
    except Exception as err:  # the HTTP client's own errors are not OSError
        raise model_unavailable(model, err) from err


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; a named GPU must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N.")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device is {device!r} but torch sees no CUDA GPU (torch {torch.__version__}); "
            "install a CUDA build of torch, check the driver with nvidia-smi, or set device = 'cpu'."
        )
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(
            f"device is {device!r} but torch sees only {torch.cuda.device_count()} GPU(s); "
            "set device to cuda:0 … or to 'auto'."
        )
    return device


def resolve_dtype(dtype: str, device: str, family: str | None = None) -> str:
    """'auto' -> the family's half precision on a GPU (half the memory, same quality), float32 on CPU."""
    if dtype == "auto":
        return HALF_DTYPES.get(family or "", "float16") if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}.")
    return dtype


#: Bytes per element of safetensors dtypes that are not floating point (floats follow the load dtype).
_FIXED_BYTES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def weights_bytes(model: str, dtype: str) -> int | None:
    """About how much memory `model`'s weights take once loaded in `dtype`, read from its safetensors
    headers (a local folder, or a Hub snapshot already in the cache); None when that cannot be told."""
    try:
        folder = local_folder(model)
    except I2VError:
        return None
    if folder is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json")
        folder = Path(cached).parent if isinstance(cached, str) else None
    if folder is None:
        return None
    per_float = 4 if dtype == "float32" else 2
    total = 0
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(component.glob("*.safetensors"))
        plain = [f for f in files if not any(v in f.name for v in (".fp16.", ".bf16.", ".fp32."))]
        for f in plain or files[:1]:  # a variant alone (…fp16.safetensors) stands for the component
            try:
                header = _safetensors_header(f)
            except (OSError, ValueError):
                return None
            for name, meta in header.items():
                if name != "__metadata__":
                    size = per_float if meta["dtype"] in _FLOATS else _FIXED_BYTES.get(meta["dtype"], 4)
                    total += math.prod(meta["shape"]) * size
    return total or None


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: tensor names, dtypes and shapes (8 little-endian length bytes first)."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        return json.loads(fh.read(length))
