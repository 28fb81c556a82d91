"""What a pipeline weighs and what one denoising step and one decode cost, from its configs alone.

Every component is built from its `config.json` on PyTorch's `meta` device: parameters with
shapes and dtypes but no storage, so a 14 B transformer costs a second and no memory, and a model
folder that holds only the configs (no weights downloaded yet) is enough. The activation peaks
come from replaying the family's own denoiser forward and VAE decode on meta tensors under a
dispatch mode that adds up the storages alive at each moment, as the caching allocator would
hold them (the method bench/gpu_meta_peaks.py checked against the H200: 0.617 GiB per million
pixel-frames for the I2VGen-XL UNet, measured 0.616).

Pure arithmetic on these numbers (which placement fits) lives in `placement.py`.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from i2v_daemon.errors import ConfigError, first_line
from i2v_daemon.models.loader import read_model_index
from i2v_daemon.models.precision import DENOISERS

#: Components that run once per job, before denoising (LTX-2's `connectors` turn its Gemma-3 hidden states
#: into the transformer's prompt tokens, once per job, right after the text encoder).
ENCODERS = ("text_encoder", "text_encoder_2", "image_encoder", "connectors")
#: Components that run once per job, after denoising: the VAE, and LTX-2's audio VAE and vocoder (it
#: always decodes the audio it denoised alongside the video; the daemon keeps only the frames). They
#: stay on the device as the VAE does, and count as the VAE's bytes.
DECODERS = ("vae", "audio_vae", "vocoder")
#: Submodule lists that hold a denoiser's repeated blocks (what group offloading moves one at a time).
BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks", "down_blocks", "up_blocks", "mid_block")


class LivePeak(TorchDispatchMode):
    """Bytes of the storages created under it that are still referenced, and their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata  # the C++ storage's address: the same for every view of it
            if key in self._seen:
                continue
            self._seen.add(key)
            size = storage.nbytes()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, size, key)
        return out

    def _release(self, size: int, key: int) -> None:
        self.live -= size
        self._seen.discard(key)


def replay_peak(call: Callable[[], Any]) -> int:
    """Peak bytes of the tensors `call` creates, run on meta tensors (no memory, no compute)."""
    with torch.inference_mode(), LivePeak() as peak:
        call()
    return peak.peak


@dataclass(frozen=True)
class ComponentSize:
    """One component as it would sit in memory: its parameters' and buffers' bytes at the dtype it runs in."""

    name: str
    role: str  # "denoiser", "encoder", "vae"
    class_name: str
    params: int  # number of parameters
    bytes: int  # parameters and buffers at the dtype it runs in
    dtype: str
    largest_block_bytes: int = 0  # denoisers: the largest repeated block (group offloading moves these)
    blocks: int = 0  # denoisers: how many repeated blocks
    blocks_bytes: int = 0  # denoisers: all the repeated blocks together (blocks of two sizes: HunyuanVideo's)
    largest_leaf_bytes: int = 0  # the largest module with parameters of its own (leaf-level offloading)
    castable_bytes: int = 0  # denoisers: bytes layerwise casting would store in 1 byte (fp8)


@dataclass
class MetaPipeline:
    """A pipeline built from configs on the meta device, and what each of its components weighs."""

    folder: Path
    class_name: str
    pipeline: Any
    components: dict[str, ComponentSize] = field(default_factory=dict)

    def role_bytes(self, role: str) -> int:
        return sum(c.bytes for c in self.components.values() if c.role == role)

    def denoisers(self) -> list[ComponentSize]:
        return [c for c in self.components.values() if c.role == "denoiser"]


def _role(name: str) -> str | None:
    if name in DENOISERS:
        return "denoiser"
    if name in ENCODERS:
        return "encoder"
    if name in DECODERS:
        return "vae"
    return None


def _build(library: str, class_name: str, sub: Path, dtype: torch.dtype) -> Any:
    """One model component on the meta device, from the config in `sub`."""
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name, None)
        if cls is None:
            raise ConfigError(f"{sub}: diffusers {diffusers.__version__} has no {class_name}; upgrade diffusers")
        with torch.device("meta"):
            module = cls.from_config(cls.load_config(sub))
    elif library == "transformers":
        import transformers

        cls = getattr(transformers, class_name, None)
        if cls is None:
            raise ConfigError(f"{sub}: transformers {transformers.__version__} has no {class_name}; upgrade it")
        config = transformers.AutoConfig.from_pretrained(sub)
        with torch.device("meta"):
            module = cls._from_config(config)
    else:  # a module of a diffusers pipeline package ("ltx2": LTX-2's connectors and vocoder)
        try:
            package = importlib.import_module(f"diffusers.pipelines.{library}")
        except ImportError:
            package = None
        cls = getattr(package, class_name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ConfigError(f"{sub}: a component from {library!r}, which i2v-daemon cannot size")
        with torch.device("meta"):
            module = cls.from_config(cls.load_config(sub))
    # A few parameters are made with legacy constructors that ignore the default device (SVD's
    # mix_factor): moved too, so every tensor of the replay is on meta.
    return module.to(device="meta", dtype=dtype).eval()


def _bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    found: list[torch.nn.Module] = []
    for name in BLOCK_LISTS:
        child = getattr(module, name, None)
        if isinstance(child, torch.nn.ModuleList):
            found.extend(child)
        elif isinstance(child, torch.nn.Module):
            found.append(child)
    return found


def _largest_leaf(module: torch.nn.Module) -> int:
    return max((sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                for m in module.modules()), default=0)


#: What diffusers' layerwise casting keeps at full precision (its DEFAULT_SKIP_MODULES_PATTERN).
_CAST_SKIP = ("pos_embed", "patch_embed", "norm", "proj_in", "proj_out")
_CASTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _castable_bytes(module: torch.nn.Module) -> int:
    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, _CASTABLE) and not any(s in name for s in _CAST_SKIP):
            total += sum(p.numel() * p.element_size() for p in sub.parameters(recurse=False))
    return total


def _size(name: str, role: str, module: torch.nn.Module) -> ComponentSize:
    params = sum(p.numel() for p in module.parameters())
    blocks = _blocks(module) if role == "denoiser" else []
    dtype = next((str(p.dtype).removeprefix("torch.") for p in module.parameters()), "float32")
    block_bytes = [_bytes(b) for b in blocks]
    return ComponentSize(
        name=name, role=role, class_name=type(module).__name__, params=params, bytes=_bytes(module), dtype=dtype,
        largest_block_bytes=max(block_bytes, default=0), blocks=len(blocks), blocks_bytes=sum(block_bytes),
        largest_leaf_bytes=_largest_leaf(module),
        castable_bytes=_castable_bytes(module) if role == "denoiser" else 0,
    )


def _scheduler(library: str, class_name: str, sub: Path) -> Any:
    module = importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if cls is None or not (sub / "scheduler_config.json").is_file():
        return None
    return cls.from_config(cls.load_config(sub))


@lru_cache(maxsize=16)  # meta tensors hold no storage: every model a test run or a doctor plans, kept
def _meta_pipeline(folder: str, dtype: str, float32: tuple[str, ...]) -> MetaPipeline:
    import diffusers

    path = Path(folder)
    index = read_model_index(str(path))
    class_name = str(index.get("_class_name"))
    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is None:
        raise ConfigError(f"{folder}: diffusers {diffusers.__version__} has no {class_name}; upgrade diffusers")
    half = getattr(torch, dtype)
    built: dict[str, Any] = {}
    sizes: dict[str, ComponentSize] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, cls_name = str(spec[0]), str(spec[1])
        role = _role(name)
        sub = path / name
        if role is None:
            built[name] = _scheduler(library, cls_name, sub) if name == "scheduler" else None
            continue
        if not (sub / "config.json").is_file():
            raise ConfigError(f"{sub}: no config.json; the folder must hold each component's config to be planned")
        try:
            module = _build(library, cls_name, sub, torch.float32 if name in float32 else half)
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"{sub}: cannot build {cls_name} from its config ({first_line(err)})") from None
        built[name] = module
        sizes[name] = _size(name, role, module)
    config = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    try:
        pipeline = pipeline_class(**_accepted(pipeline_class, built, config))
    except Exception as err:
        raise ConfigError(f"{folder}: cannot assemble {class_name} from its configs ({first_line(err)})") from None
    return MetaPipeline(folder=path, class_name=class_name, pipeline=pipeline, components=sizes)


def _accepted(pipeline_class: Any, built: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The constructor's own arguments: components (None where not built) and pipeline config values."""
    import inspect

    names = inspect.signature(pipeline_class.__init__).parameters
    args = {k: v for k, v in {**built, **config}.items() if k in names}
    for name, param in names.items():
        if name != "self" and name not in args and param.default is inspect.Parameter.empty:
            args[name] = None  # a tokenizer or feature extractor: nothing to size
    return args


def meta_pipeline(folder: str | Path, dtype: str, float32_components: tuple[str, ...] = ()) -> MetaPipeline:
    """The pipeline in `folder` built on the meta device at `dtype` (float32 for `float32_components`)."""
    return _meta_pipeline(str(Path(folder).resolve()), dtype, tuple(float32_components))


def meta_tensor(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
