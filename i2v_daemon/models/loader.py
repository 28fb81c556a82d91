"""Which pipeline family a model is, and loading it behind the `VideoModel` protocol.

Importing this module is cheap: torch, diffusers and huggingface_hub are imported only when a
model is actually detected or loaded.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon.errors import ConfigError, GenerationError

if TYPE_CHECKING:
    from i2v_daemon.models.base import VideoModel

#: `_class_name` in a pipeline's model_index.json -> our family name.
FAMILIES: dict[str, str] = {
    "I2VGenXLPipeline": "i2vgen-xl",
}

#: family name -> "module:Class" of its adapter; imported only when that family is loaded.
ADAPTERS: dict[str, str] = {
    "i2vgen-xl": "i2v_daemon.models.i2vgen_xl:I2VGenXLModel",
}

DTYPES = ("float16", "bfloat16", "float32")


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


def load_model(model: str, device: str = "auto", dtype: str = "auto") -> VideoModel:
    """Detect the family of `model` and load it once, ready to generate on `device` in `dtype`."""
    family = detect_family(model)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    module_name, class_name = ADAPTERS[family].split(":")
    adapter = getattr(importlib.import_module(module_name), class_name)
    return adapter(model, device=resolved_device, dtype=resolved_dtype)


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


def local_folder(model: str) -> Path | None:
    """`model` as a local folder, or None when it names a Hub repo; a missing path is an error."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"model {model!r} is a file; set `model` to a diffusers folder or a Hub repo id.")
    # A Hub id is "owner/name"; anything else that looks like a path was meant to be a folder.
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ConfigError(
            f"model folder {model!r} does not exist; set `model` to an existing diffusers folder "
            "or to a Hugging Face repo id such as 'ali-vilab/i2vgen-xl'."
        )
    return None


def model_unavailable(model: str, err: BaseException) -> GenerationError:
    """The error to raise when a Hub model cannot be found or downloaded (offline, typo, gated)."""
    return GenerationError(
        f"model {model!r} could not be found or downloaded from the Hugging Face Hub "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}). "
        f"Check the repo id, or download it once on a machine with network access "
        f"(`huggingface-cli download {model}`, which fills the Hugging Face cache under $HF_HOME), "
        "or set `model` to a local diffusers folder."
    )


def _download_model_index(model: str) -> Path:
    """model_index.json of a Hub repo, from the local cache or the network."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model, "model_index.json"))
    except LocalEntryNotFoundError as err:  # offline and not cached; a subclass of the next one
        raise model_unavailable(model, err) from err
    except EntryNotFoundError as err:
        raise ConfigError(
            f"Hub repo {model!r} has no model_index.json, so it is not a diffusers pipeline; "
            "set `model` to a diffusers repo such as 'ali-vilab/i2vgen-xl'."
        ) from err
    except (OSError, ValueError) as err:  # network errors, unknown or gated repos, invalid ids
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


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> float16 on a GPU (half the memory, same quality for this model), float32 on CPU."""
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}.")
    return dtype
