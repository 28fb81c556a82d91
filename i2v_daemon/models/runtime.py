"""Small pieces every adapter uses around a diffusers pipeline: loading it quietly, fitting the image,
seeding, converting frames, and the grad mode and forward-chunking switches the savers need."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from i2v_daemon.errors import ConfigError, GenerationError
from i2v_daemon.models.loader import local_folder, model_unavailable
from i2v_daemon.models.precision import denoisers_of, pipeline_arguments, store_in_fp8, torchao_failed
from i2v_daemon.weights import Weights

__all__ = [
    "cpu_generator", "disable_forward_chunking", "fit_image", "frames_to_uint8", "grad_mode", "hub_revision",
    "load_pipeline", "seeded", "to_uint8", "watch_vae",
]


def load_pipeline(
    class_name: str, model: str, dtype: str, float32_components: tuple[str, ...] = (), weights: Weights | None = None,
) -> Any:
    """`<class_name>.from_pretrained` with `weights` (on the CPU: fp8 is stored before the move to a GPU),
    failures turned into errors that say what to do."""
    import warnings

    from transformers.utils import logging as transformers_logging

    # The libraries' log records go through our one pipeline (logs.py decides their level); their
    # loading bars would land in the journal as noise, and job progress comes from on_step.
    transformers_logging.disable_progress_bar()
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is None:
        raise ConfigError(
            f"model {model!r} needs diffusers' {class_name}, which diffusers {diffusers.__version__} does not "
            "have; upgrade diffusers (pip install -U diffusers)"
        )
    weights = weights or Weights()
    torch_dtype: Any = getattr(torch, dtype)
    if float32_components and dtype != "float32":
        torch_dtype = {"default": torch_dtype, **dict.fromkeys(float32_components, torch.float32)}
    try:
        with warnings.catch_warnings():
            # torch_dtype, not dtype: older diffusers in our supported range know only that name.
            warnings.simplefilter("ignore", FutureWarning)
            pipe = pipeline_class.from_pretrained(
                model, torch_dtype=torch_dtype, **pipeline_arguments(model, dtype, weights)
            )
    except OSError as err:  # a Hub download that failed half-way, or a folder missing weights
        if local_folder(model) is not None:
            raise GenerationError(
                f"model folder {model!r} could not be loaded ({err}); re-download or rebuild it."
            ) from err
        raise model_unavailable(model, err) from err
    except Exception as err:
        failed = torchao_failed(err, weights.torchao_type) if weights.kind == "torchao" else None
        if failed is None:
            raise
        raise failed from err
    if weights.kind == "fp8":  # here, before the pipeline moves to the GPU: only fp8 weights go there
        store_in_fp8(denoisers_of(pipe), dtype)
    return pipe


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to cover (width, height) and center-cropped to exactly that size."""
    # The pipelines' own resizing squashes or uses a box filter; doing it here with Lanczos looks
    # better and leaves the pipeline a no-op resize.
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.LANCZOS)


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator draws the same noise on any device, so a seed means one video."""
    return torch.Generator("cpu").manual_seed(seed)


def hub_revision(model: str) -> str | None:
    """The commit hash of the cached Hub snapshot `model` was loaded from; None for a folder."""
    if Path(model).expanduser().exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "model_index.json")
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts  # …/models--owner--name/snapshots/<commit>/model_index.json
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else None


@contextmanager
def seeded(seed: int, device: str) -> Iterator[None]:
    """Seed the global RNGs for one call, restoring them afterwards."""
    # Some pipelines (I2VGen-XL's image latents) draw from the global RNG rather than the generator
    # they are given, so the seed must cover it too for the same seed to give the same video.
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounded as diffusers' own PIL conversion does."""
    return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8))


def frames_to_uint8(frames: Any) -> np.ndarray:
    """A pipeline's frames -> uint8 (frames, height, width, 3) on the host.

    A tensor (frames, 3, height, width) is converted where it lies, on the GPU, with the same
    float32 arithmetic as `to_uint8` (clip, ×255, round half to even), so both give the same bytes;
    only the uint8 result is copied to the host.
    """
    if isinstance(frames, np.ndarray):
        return to_uint8(frames)
    video = (frames.float().clamp(0.0, 1.0) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(video.permute(0, 2, 3, 1).cpu().numpy())


@contextmanager
def watch_vae(vae: Any, float32: bool = False) -> Iterator[list[bool]]:
    """A list that gets an entry when the VAE's decoder gives NaN or Inf; with `float32`, the VAE runs in
    float32 for this call (what it is given cast to match) and goes back to its own dtype afterwards.

    The decoder's own output is watched: Wan's VAE clamps it inside `decode`, and every pipeline
    clamps the frames after, which would hide an Inf."""
    non_finite: list[bool] = []
    if vae is None:
        yield non_finite
        return
    dtype, decode, encode = vae.dtype, vae.decode, vae.encode

    def cast(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not float32:
            return args, kwargs
        up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return tuple(up), {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                           for k, v in kwargs.items()}

    def float32_decode(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = cast(args, kwargs)
        return decode(*args, **kwargs)

    def float32_encode(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = cast(args, kwargs)
        return encode(*args, **kwargs)

    def check(_module: Any, _args: Any, output: Any) -> None:
        sample = output[0] if isinstance(output, tuple) else output
        if isinstance(sample, torch.Tensor) and not bool(torch.isfinite(sample).all()):
            non_finite.append(True)

    watched = getattr(vae, "decoder", vae)
    hook = watched.register_forward_hook(check)
    if float32:  # instance attributes over the class's methods, for this call only
        vae.decode, vae.encode = float32_decode, float32_encode
        vae.to(torch.float32)
    try:
        yield non_finite
    finally:
        hook.remove()
        vae.__dict__.pop("decode", None)
        vae.__dict__.pop("encode", None)
        if float32:
            vae.to(dtype)


def grad_mode(savers: tuple[str, ...]) -> AbstractContextManager[Any]:
    # Offload hooks move weights inside the call; under inference_mode those would become
    # inference tensors that the later move back to the GPU may not modify, so use no_grad.
    return torch.no_grad() if "cpu_offload" in savers else torch.inference_mode()


def disable_forward_chunking(module: Any) -> None:
    """Undo enable_forward_chunking; not every model has its own disable (SVD's UNet has none)."""
    if hasattr(module, "disable_forward_chunking"):
        module.disable_forward_chunking()
        return
    for sub in module.modules():
        if hasattr(sub, "set_chunk_feed_forward"):
            sub.set_chunk_feed_forward(chunk_size=None, dim=0)
