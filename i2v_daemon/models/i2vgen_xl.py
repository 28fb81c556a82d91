"""I2VGen-XL behind the `VideoModel` protocol: load once, plan sizes, generate frames with progress."""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from i2v_daemon.errors import GenerationError
from i2v_daemon.models.base import GenerationRequest, ModelInfo, SizePlan, StepCallback
from i2v_daemon.models.loader import local_folder, model_unavailable

FAMILY = "i2vgen-xl"
#: Widest video shape planned from `resolution`: the pipeline's own default is 1280×704 (1.8:1),
#: and much wider shapes are far from what the model has seen, so wider images are center-cropped.
MAX_ASPECT = 2.0
#: Frames the VAE decodes at once; 1 is the pipeline's default and its smallest peak memory.
DECODE_CHUNK_SIZE = 1


class I2VGenXLModel:
    """The deprecated diffusers `I2VGenXLPipeline`, loaded once and kept warm between jobs."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32", pipeline: Any = None) -> None:
        """Load `model` (a folder or Hub id) onto `device`, or wrap an already built `pipeline`."""
        self.device = device
        self.dtype = dtype
        pipe = pipeline if pipeline is not None else _load_pipeline(model, dtype)
        self.pipeline: Any = pipe.to(device)  # None once closed
        self.pipeline.set_progress_bar_config(disable=True)
        self.info = ModelInfo(
            family=FAMILY,
            model_id=model,
            revision=_hub_revision(model),
            size_multiple=_size_multiple(pipe),
            max_prompt_tokens=int(pipe.tokenizer.model_max_length),
            savers=_supported_savers(pipe, device),
        )

    def plan_size(
        self, image_size: tuple[int, int], resolution: int, width: int | None, height: int | None
    ) -> SizePlan:
        """The size this model will generate for an image of `image_size` (w, h)."""
        return plan_size(image_size, resolution, width, height, self.info.size_multiple)

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens the text encoder would see for `prompt` before truncation, BOS and EOS included."""
        return len(self.pipeline.tokenizer(prompt, truncation=False, verbose=False).input_ids)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text embeddings with the pipeline's default clip_skip=1: the penultimate layer, normalised."""
        tokenizer, encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        tokens = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):  # as the pipeline does; CLIP has none
            mask = tokens.attention_mask.to(encoder.device)
        out = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask, output_hidden_states=True)
        # transformers 5 dropped CLIPTextModel.text_model, where the pipeline looks for the norm.
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return final_norm(out.hidden_states[-2]).to(dtype=encoder.dtype)

    def generate(self, request: GenerationRequest, on_step: StepCallback) -> np.ndarray:
        """Frames as a uint8 array (num_frames, height, width, 3); on_step may raise to stop early."""
        if self.pipeline is None:
            raise GenerationError("the model was closed; load it again with load_model() before generating")
        self._check_savers(request.savers)
        multiple = self.info.size_multiple
        if request.width % multiple or request.height % multiple:
            raise ValueError(f"{request.width}×{request.height} is not a multiple of {multiple}; use plan_size()")
        image = fit_image(request.image, request.width, request.height)
        unet_calls = 0

        def after_unet(_module: Any, _args: Any, _output: Any) -> None:
            # One UNet call per denoising step: guidance runs both halves in one batch.
            nonlocal unet_calls
            unet_calls += 1
            on_step(unet_calls, request.steps)

        hook = self.pipeline.unet.register_forward_hook(after_unet)
        try:
            with self._savers(request.savers), _seeded(request.seed, self.device):
                frames = self._run(image, request)
        finally:
            hook.remove()
        return _to_uint8(frames)

    def versions(self) -> dict[str, Any]:
        """Library versions that produced the video, for the manifest."""
        import diffusers
        import transformers

        return {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        }

    def close(self) -> None:
        """Release the pipeline and any GPU memory it holds; the object is unusable afterwards."""
        if getattr(self, "pipeline", None) is None:
            return
        self.pipeline = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _run(self, image: Image.Image, request: GenerationRequest) -> np.ndarray:
        """One pipeline call with our own prompt embeddings; returns float frames in [0, 1]."""
        # Offload hooks move weights inside the call; under inference_mode those would become
        # inference tensors that the later move back to the GPU may not modify, so use no_grad.
        grad_off = torch.no_grad() if "cpu_offload" in request.savers else torch.inference_mode()
        with grad_off:
            prompt_embeds = self.encode_prompt(request.prompt)
            negative_embeds = self.encode_prompt(request.negative_prompt)
            out = self.pipeline(
                image=image,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                clip_skip=None,  # the embeddings above already apply clip_skip=1
                height=request.height,
                width=request.width,
                num_frames=request.num_frames,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                target_fps=request.fps,
                decode_chunk_size=DECODE_CHUNK_SIZE,
                # A CPU generator draws the same noise on any device, so a seed means one video.
                generator=torch.Generator("cpu").manual_seed(request.seed),
                output_type="np",
            )
        return out.frames[0]

    def _check_savers(self, savers: tuple[str, ...]) -> None:
        """Refuse a saver this model cannot apply, rather than silently running without it."""
        unknown = [s for s in savers if s not in self.info.savers]
        if unknown:
            raise ValueError(f"savers {unknown} are not supported here; supported: {self.info.savers}")

    @contextmanager
    def _savers(self, savers: tuple[str, ...]) -> Iterator[None]:
        """Apply memory savers for one call, then restore the fast default for the next job."""
        pipe = self.pipeline
        try:
            if "vae_slicing" in savers:
                pipe.vae.enable_slicing()
            if "vae_tiling" in savers:
                pipe.vae.enable_tiling()
            if "forward_chunking" in savers:
                pipe.unet.enable_forward_chunking()
            if "cpu_offload" in savers:
                pipe.enable_model_cpu_offload(device=self.device)
            yield
        finally:
            self._reset_savers(savers)

    def _reset_savers(self, savers: tuple[str, ...]) -> None:
        """Undo `_savers`: plain VAE and UNet, every component resident on the device again."""
        pipe = self.pipeline
        if "vae_slicing" in savers:
            pipe.vae.disable_slicing()
        if "vae_tiling" in savers:
            pipe.vae.disable_tiling()
        if "forward_chunking" in savers:
            pipe.unet.disable_forward_chunking()
        if "cpu_offload" in savers:
            pipe.remove_all_hooks()
            pipe.to(self.device)


def _load_pipeline(model: str, dtype: str) -> Any:
    """`I2VGenXLPipeline.from_pretrained`, with failures turned into errors that say what to do."""
    import warnings

    from transformers.utils import logging as transformers_logging

    # Plain-text warnings (I2VGen-XL's deprecation, a missing torchvision) would break the JSON lines
    # of our log, and loading bars would land in the journal as noise: errors still come through,
    # and job progress comes from on_step. Set before diffusers imports the CLIP classes.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from diffusers import I2VGenXLPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # torch_dtype, not dtype: older diffusers in our supported range know only that name.
            warnings.simplefilter("ignore", FutureWarning)
            return I2VGenXLPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype))
    except OSError as err:  # a Hub download that failed half-way, or a folder missing weights
        if local_folder(model) is not None:
            raise GenerationError(
                f"model folder {model!r} could not be loaded ({err}); re-download or rebuild it."
            ) from err
        raise model_unavailable(model, err) from err


def plan_size(
    image_size: tuple[int, int],
    resolution: int,
    width: int | None,
    height: int | None,
    multiple: int,
) -> SizePlan:
    """Round an explicit size, or derive one from `resolution` and the image's aspect ratio."""
    image_w, image_h = image_size
    if image_w <= 0 or image_h <= 0:
        raise ValueError(f"image size {image_size} must be positive")
    notes: list[str] = []
    if width is not None and height is not None:
        out_w = _round_to(width, multiple, "width", notes)
        out_h = _round_to(height, multiple, "height", notes)
        if not math.isclose(out_w / out_h, image_w / image_h, rel_tol=0.01):
            notes.append(f"the image ({image_w}×{image_h}) will be center-cropped to fit {out_w}×{out_h}")
        return SizePlan(out_w, out_h, tuple(notes))
    short = _round_to(resolution, multiple, "resolution", notes)
    aspect = max(image_w, image_h) / min(image_w, image_h)
    if aspect > MAX_ASPECT:
        notes.append(
            f"the image's aspect ratio {aspect:.2f}:1 is wider than this model's {MAX_ASPECT:g}:1 limit; "
            f"it will be center-cropped to {MAX_ASPECT:g}:1"
        )
        aspect = MAX_ASPECT
    long = _nearest_multiple(short * aspect, multiple)
    out_w, out_h = (long, short) if image_w >= image_h else (short, long)
    return SizePlan(out_w, out_h, tuple(notes))


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to cover (width, height) and center-cropped to exactly that size."""
    # The pipeline's own crop resizes with a box filter; doing it here with Lanczos looks better
    # and leaves the pipeline a no-op crop.
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.LANCZOS)


def _round_to(value: int, multiple: int, name: str, notes: list[str]) -> int:
    """`value` rounded to the nearest multiple (at least one), noting any change."""
    rounded = _nearest_multiple(value, multiple)
    if rounded != value:
        notes.append(f"{name} {value} rounded to {rounded} (the model needs multiples of {multiple})")
    return rounded


def _nearest_multiple(value: float, multiple: int) -> int:
    """The multiple of `multiple` nearest to `value` (halves round up), never less than one multiple."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def _size_multiple(pipe: Any) -> int:
    """VAE down-sampling times the UNet's: 8 × 2³ = 64 for the released model."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def _supported_savers(pipe: Any, device: str) -> tuple[str, ...]:
    """The memory savers this pipeline offers, in the OOM ladder's order."""
    savers = []
    if hasattr(pipe.vae, "enable_slicing"):
        savers.append("vae_slicing")
    if hasattr(pipe.vae, "enable_tiling"):
        savers.append("vae_tiling")
    if hasattr(pipe.unet, "enable_forward_chunking"):
        savers.append("forward_chunking")
    if device.startswith("cuda"):  # offloading to the CPU only helps when the weights are elsewhere
        savers.append("cpu_offload")
    return tuple(savers)


def _hub_revision(model: str) -> str | None:
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
def _seeded(seed: int, device: str) -> Iterator[None]:
    """Seed the global RNGs for one call, restoring them afterwards."""
    # The pipeline samples the image latents from the global RNG (it passes no generator
    # there), so the seed must cover it too for the same seed to give the same video.
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounded as diffusers' own PIL conversion does."""
    return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8))
