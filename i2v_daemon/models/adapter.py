"""The half every family adapter shares: loading, planning, savers, LoRA, seeding, progress and cleanup.

A family (svd.py, wan.py, …) says what it is (`_limits`), how our options become its pipeline's
arguments (`_conditioning`), and, where it must, how it calls the pipeline (`_call`). Everything
else a `VideoModel` does lives here once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from i2v_daemon.errors import GenerationError, InputError, first_line
from i2v_daemon.models import planning, schedulers
from i2v_daemon.models.base import (
    ConditioningPlan,
    FramePlan,
    GenerationRequest,
    LoraChoice,
    ModelInfo,
    PhaseCallback,
    SizePlan,
    StepCallback,
)
from i2v_daemon.models.caches import CACHES, step_cache
from i2v_daemon.models.gpu import free_memory
from i2v_daemon.models.placement import PLACEMENTS
from i2v_daemon.models.precision import DENOISERS, denoisers_of, store_in_fp8
from i2v_daemon.models.runtime import (
    cpu_generator,
    disable_forward_chunking,
    fit_image,
    frames_to_uint8,
    grad_mode,
    hub_revision,
    load_pipeline,
    seeded,
    watch_vae,
)
from i2v_daemon.models.sizing import DECODERS, ENCODERS
from i2v_daemon.weights import Weights

#: The name our one LoRA adapter has inside a pipeline.
LORA_ADAPTER = "i2v_daemon_lora"


class DiffusersVideoModel:
    """A diffusers image-to-video pipeline, loaded once and kept warm between jobs."""

    family: ClassVar[str]
    pipeline_class: ClassVar[str]  # the diffusers class that runs this family
    #: Components kept in float32 when the rest is half precision (Wan's model card loads its VAE so).
    float32_components: ClassVar[tuple[str, ...]] = ()
    #: None: progress through `callback_on_step_end`; else the module whose forward marks one step.
    progress_module: ClassVar[str | None] = None
    #: Why a fixed-size family makes only one size, for its notes and refusals.
    fixed_size_reason: ClassVar[str] = ""
    #: Denoiser arguments whose dims stay symbolic on the fast path (one graph for every frame count).
    dynamic_dims: ClassVar[dict[str, tuple[int, ...]]] = {}
    #: The multiple of 8 or 32 the pipeline's own check_inputs demands of height and width, whatever
    #: its config says; the planned multiple is the least common multiple of the two.
    pipeline_size_multiple: ClassVar[int] = 8

    def __init__(
        self, model: str, device: str = "cpu", dtype: str = "float32", pipeline: Any = None,
        weights: Weights | None = None, placement: str = "gpu",
    ) -> None:
        """Load `model` (a folder or Hub id) onto the host with `weights`, or wrap an already built `pipeline`;
        then place it on `device` (models/placement.py)."""
        self.device = device
        self.dtype = dtype
        weights = weights or Weights()
        pipe = pipeline if pipeline is not None else load_pipeline(
            self.pipeline_class, model, dtype, self.float32_components, weights
        )
        self.placement = "gpu"
        self._placement_hooks: list[Any] = []  # torch hook handles a placement added
        self.placement_plan: dict[str, Any] = {}  # set by the holder when it planned the placement
        self.pipeline: Any = pipe  # None once closed
        self.place(placement)
        self.pipeline.set_progress_bar_config(disable=True)
        self._lora_loaded: tuple[str, int] | None = None  # (path, mtime) of the LoRA in the pipeline
        self._default_scheduler = pipe.scheduler  # as released; a job's `scheduler` swaps others in
        self._schedulers: dict[str, Any] = {}
        self.accelerator: Any = None  # an accelerate.Accelerator once enable_acceleration() ran
        self.last_run: dict[str, Any] = {}
        limits = self._limits()
        limits["size_multiple"] = math.lcm(int(limits["size_multiple"]), self.pipeline_size_multiple)
        loaded = schedulers.name_of(pipe.scheduler)
        self.info = ModelInfo(
            family=self.family,
            model_id=model,
            revision=hub_revision(model),
            savers=self._supported_savers(),
            lora=hasattr(pipe, "load_lora_weights"),
            scheduler=loaded,
            schedulers=schedulers.offered(self.family, loaded),
            weights=weights,
            caches=CACHES if all(hasattr(m, "enable_cache") for m in self._denoisers()) else (),
            **limits,
        )

    # ---- what each family says about itself -------------------------------------------------------

    def _limits(self) -> dict[str, Any]:
        """ModelInfo fields read from the loaded pipeline: size_multiple, max_prompt_tokens, frame rules, …"""
        raise NotImplementedError

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        """This family's pipeline arguments for guidance, fps, motion (beyond size, frames, steps), and notes."""
        return {"guidance_scale": request.guidance_scale}, []

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        """One denoiser forward at this size as the pipeline calls it, on meta tensors (models/sizing.py)."""
        raise NotImplementedError

    @staticmethod
    def meta_decode(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        """The VAE decode at this size as the pipeline runs it by default, on meta tensors."""
        raise NotImplementedError

    def _call(self, image: Image.Image, request: GenerationRequest, conditioning: dict[str, Any],
              callback: Callable[..., Any] | None) -> Any:
        """One pipeline call; float frames in [0, 1] on the device, shaped (frames, 3, height, width)."""
        # "pt" keeps the frames on the device: generate() turns them into bytes there, and only a
        # quarter of the data (uint8, not float32) crosses to the host.
        kwargs: dict[str, Any] = {
            "image": image, "height": request.height, "width": request.width, "num_frames": request.num_frames,
            "num_inference_steps": request.steps, "generator": cpu_generator(request.seed), "output_type": "pt",
            **conditioning,
        }
        if self.info.takes_prompt:
            kwargs.update(prompt=request.prompt, negative_prompt=request.negative_prompt)
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        return self.pipeline(**kwargs).frames[0]

    def _tokenize(self, prompt: str) -> list[int]:
        return list(self.pipeline.tokenizer(prompt, truncation=False).input_ids)

    # ---- planning -------------------------------------------------------------------------------

    def plan_size(
        self, image_size: tuple[int, int], resolution: int, width: int | None, height: int | None
    ) -> SizePlan:
        """The size this model will generate for an image of `image_size` (w, h); InputError if it cannot."""
        if self.info.fixed_size is not None:
            return planning.plan_fixed_size(
                image_size, resolution, width, height, self.info.fixed_size, self.family, self.fixed_size_reason
            )
        return planning.plan_size(image_size, resolution, width, height, self.info.size_multiple)

    def plan_frames(self, num_frames: int) -> FramePlan:
        """The frame count this model will generate when asked for `num_frames`; InputError if it cannot."""
        info = self.info
        return planning.plan_frames(num_frames, self.family, info.frame_step, info.min_frames, info.max_frames)

    def plan_steps(self, steps: int) -> tuple[int, tuple[str, ...]]:
        """The step count this model will run when asked for `steps`, with a note when it had to raise it."""
        minimum = self.info.min_steps
        if steps >= minimum:
            return steps, ()
        return minimum, (f"steps {steps} raised to {minimum} ({self.family}'s scheduler needs at least {minimum})",)

    def plan_conditioning(self, request: GenerationRequest) -> ConditioningPlan:
        """The family's own arguments for the request's options, with notes; InputError for what it cannot do."""
        info, name = self.info, self.family
        schedulers.check(name, info.scheduler, request.scheduler)
        if request.lora is not None and not info.lora:
            raise InputError(
                f"{name} cannot apply a LoRA (its diffusers pipeline has no LoRA loader); remove 'lora', or choose "
                "a model of a family that can (wan, skyreels-v2, ltx-video, ltx-2, hunyuanvideo-i2v, cogvideox)"
            )
        if request.lora is not None and info.weights.kind != "auto":
            # PEFT makes the LoRA's layers in the dtype of the layer they wrap: float8 or quantized ones,
            # which nothing casts up for their forward.
            raise InputError(
                f"lora cannot be applied to {name} with {info.weights.label()} weights; remove 'lora', or use a "
                "preset with weights = 'auto'"
            )
        if request.cache not in (None, "off") and request.cache not in info.caches:
            raise InputError(
                f"{name} cannot use cache = {request.cache!r}: "
                + (f"it offers {', '.join(info.caches)}" if info.caches else
                   "its denoiser has none of diffusers' step caches (they hook transformer blocks)")
                + '; set cache = "off" in the preset or the config, or choose a model of a transformer family '
                "(wan, skyreels-v2, ltx-video, ltx-2, hunyuanvideo-i2v, hunyuanvideo-1.5-i2v, cogvideox)"
            )
        values, notes = self._conditioning(request)
        if not info.takes_prompt and (request.prompt or request.negative_prompt):
            notes.append(f"{name} takes no prompt: the video follows the image alone, and the prompt was not used")
        if request.motion is not None and not info.motion:
            notes.append(f"{name} has no motion control; motion {request.motion:g} was not used")
        if not info.fps_conditioning and info.native_fps and request.fps != info.native_fps:
            pace = info.native_fps / request.fps
            speed = f"{pace:.2g}× slower" if pace > 1 else f"{1 / pace:.2g}× faster"
            notes.append(
                f"{name} makes motion for about {info.native_fps} fps and is not told the frame rate; "
                f"at {request.fps} fps the video plays {speed} than real time"
            )
        return ConditioningPlan(values, tuple(notes))

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens the text encoder would see for `prompt` before truncation, special tokens included."""
        return len(self._tokenize(prompt)) if self.info.takes_prompt else 0

    # ---- generating -----------------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, on_step: StepCallback, on_phase: PhaseCallback | None = None
    ) -> np.ndarray:
        """Frames as a uint8 array (num_frames, height, width, 3); on_step may raise to stop early.

        `request.accelerated` runs the try on the fast path where this model has one (see
        enable_acceleration); `last_run` then says whether it stayed there and what it compiled.
        Frames decoded with NaN or Inf are made once more with the VAE in float32 (`last_run` says so),
        then are a GenerationError: never black or white bytes.
        """
        if self.pipeline is None:
            raise GenerationError("the model was closed; load it again with load_model() before generating")
        self._check_request(request)
        phase = on_phase or _no_phase
        image = fit_image(request.image, request.width, request.height)
        conditioning = dict(self.plan_conditioning(request).values)
        fast = bool(request.accelerated and self.accelerator is not None and self.fast_path_for(request))
        self.last_run = {"accelerated": False, "compiled": [], "compile_seconds": 0.0, "fell_back": None}

        def step(i: int, n: int) -> None:
            on_step(i, n)
            if i == n:
                phase("decoding")

        reports: list[Any] = []  # the fast path's report of each call (two when the VAE ran again)
        try:
            video = self._run(image, request, conditioning, step, phase, fast, reports, vae_float32=False)
            if video is None:
                video = self._again_with_vae_float32(image, request, conditioning, step, phase, fast, reports)
        finally:
            if reports:
                self.last_run.update(
                    accelerated=all(r.accelerated for r in reports), compiled=[c for r in reports for c in r.compiled],
                    compile_seconds=round(sum(r.compile_seconds for r in reports), 3),
                    fell_back=next((r.fell_back for r in reports if r.fell_back), None),
                )
        if video.shape[0] != request.num_frames:
            raise GenerationError(
                f"{self.family} made {video.shape[0]} frames where {request.num_frames} were planned; "
                "this is a bug in i2v-daemon's frame planning for this family, please report it"
            )
        return video

    def _run(self, image: Image.Image, request: GenerationRequest, conditioning: dict[str, Any],
             on_step: StepCallback, phase: PhaseCallback, fast: bool, reports: list[Any], *,
             vae_float32: bool) -> np.ndarray | None:
        """One pipeline call with the request's LoRA, savers, scheduler and cache; None when the VAE decoded
        NaN or Inf (before the pipeline's clamp would turn Inf into white, and NaN into black bytes)."""
        callback, hook = self._progress(request.steps, on_step)
        try:
            return self._call_once(image, request, conditioning, callback, phase, fast, reports, vae_float32)
        finally:
            if hook is not None:
                hook.remove()

    def _call_once(self, image: Image.Image, request: GenerationRequest, conditioning: dict[str, Any],
                   callback: Callable[..., Any] | None, phase: PhaseCallback, fast: bool, reports: list[Any],
                   vae_float32: bool) -> np.ndarray | None:
        """The pipeline call itself, inside the request's settings (see _run)."""
        with self._lora(request.lora), self._savers(request.savers), self._scheduler(request.scheduler), \
                step_cache(self._denoisers(), request.cache, self.pipeline, self.family), \
                watch_vae(getattr(self.pipeline, "vae", None), vae_float32) as non_finite, \
                seeded(request.seed, self.device), grad_mode(request.savers):
            report: Any = None
            if fast:
                from i2v_daemon.models.accelerate import TryReport

                report = TryReport()
                reports.append(report)
            variant = None if request.lora is None else (self._lora_loaded, request.lora.scale)
            runner = self.accelerator.run(report, phase, variant) if fast else nullcontext()
            with runner:
                phase("denoising")
                frames = self._call(image, request, conditioning, callback)
                if non_finite:
                    return None
                return frames_to_uint8(frames)

    def _again_with_vae_float32(self, image: Image.Image, request: GenerationRequest, conditioning: dict[str, Any],
                                on_step: StepCallback, phase: PhaseCallback, fast: bool,
                                reports: list[Any]) -> np.ndarray:
        """The call once more with the VAE in float32, after it decoded NaN or Inf in half precision; a
        GenerationError if it cannot be upcast or the frames are still not finite."""
        dtype = str(self.pipeline.vae.dtype).removeprefix("torch.")
        advice = ("try another seed, a lower guidance_scale or more steps, or dtype = \"float32\" (slower, "
                  "twice the memory)")
        if dtype == "float32":
            raise GenerationError(
                f"the {self.family} model decoded frames holding NaN or Inf (its numbers overflowed) with its VAE "
                f"already in float32, so the video would be black or white; {advice}"
            )
        self.last_run["vae_float32"] = (
            f"the VAE decoded NaN or Inf in {dtype}; the try was made again with the VAE in float32"
        )
        video = self._run(image, request, conditioning, on_step, phase, fast, reports, vae_float32=True)
        if video is None:
            raise GenerationError(
                f"the {self.family} model decoded frames holding NaN or Inf with its VAE in {dtype} and again in "
                f"float32 (the denoiser's numbers overflowed), so the video would be black or white; {advice}"
            )
        return video

    # ---- the fast path --------------------------------------------------------------------------

    def enable_acceleration(self, **options: Any) -> None:
        """Prepare the fast path once (fused projections, GPU layout and flags); tries opt in per request.

        Only for the dtype's own weights: fp8, GGUF and torchao layers convert their weights in every
        forward, which the compiled graph is not made for; those models run eagerly.
        """
        from i2v_daemon.models.accelerate import Accelerator

        if self.accelerator is not None or self.pipeline is None or self.info.weights.kind != "auto":
            return
        # Fused projections replace the attention processors LoRA adapters hook into: families that
        # take a LoRA keep theirs. (Only a UNet is fused, and no UNet family here has a LoRA loader.)
        self.accelerator = Accelerator(
            self.pipeline, self.device, denoisers=DENOISERS, fuse_qkv=not self.info.lora,
            dynamic_dims=self.dynamic_dims, **options,
        )
        self.info = replace(self.info, accelerated=True)

    def place(self, placement: str) -> None:
        """Put the weights where `placement` says (models/placement.py), from wherever they are now.

        `gpu`: every component on the device. `encoders_offloaded`: the encoders visit the device to
        encode and go back to the host when a denoiser starts; two experts swap, only the running one
        on the device. `model_offload`: one component at a time (diffusers' model CPU offload).
        `group_offload` / `group_offload_leaf`: the denoisers' and encoders' blocks (or single layers)
        stream through the device (diffusers' group offloading, with CUDA streams on a GPU); the VAE
        (with LTX-2's audio VAE and vocoder) stays on the device.
        """
        pipe = self.pipeline
        if placement == self.placement and placement == "gpu":
            pipe.to(self.device)
            return
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; one of {', '.join(PLACEMENTS)}")
        self._unplace()
        device = torch.device(self.device)
        if placement == "gpu":
            pipe.to(device)
        elif placement == "encoders_offloaded":
            self._offload_encoders(device)
        elif placement == "model_offload":
            pipe.enable_model_cpu_offload(device=device)
        else:
            kind = "block_level" if placement == "group_offload" else "leaf_level"
            pipe.to("cpu")
            pipe.enable_group_offload(
                onload_device=device, offload_device=torch.device("cpu"), offload_type=kind,
                num_blocks_per_group=1 if kind == "block_level" else None, use_stream=device.type == "cuda",
                exclude_modules=[n for n in DECODERS if isinstance(getattr(pipe, n, None), torch.nn.Module)],
            )
        self.placement = placement

    def _offload_encoders(self, device: torch.device) -> None:
        from accelerate import cpu_offload_with_hook

        pipe = self.pipeline
        hooks: list[Any] = []
        previous = None
        for name in ENCODERS:
            encoder = getattr(pipe, name, None)
            if isinstance(encoder, torch.nn.Module):
                encoder.to("cpu")
                _, previous = cpu_offload_with_hook(encoder, device, prev_module_hook=previous)
                hooks.append(previous)
        denoisers = self._denoisers()
        if len(denoisers) == 1:
            denoisers[0].to(device)
        experts: list[Any] = []
        for denoiser in denoisers if len(denoisers) > 1 else []:
            denoiser.to("cpu")
            _, hook = cpu_offload_with_hook(denoiser, device)
            experts.append(hook)
        for i, denoiser in enumerate(denoisers):
            others = hooks + [h for j, h in enumerate(experts) if j != i]  # what must leave before it runs
            self._placement_hooks.append(denoiser.register_forward_pre_hook(_offloader(others)))
        for name in DECODERS:  # the VAE (and LTX-2's audio VAE and vocoder) stay, as the denoiser does
            decoder = getattr(pipe, name, None)
            if isinstance(decoder, torch.nn.Module):
                decoder.to(device)
        pipe._all_hooks = [*hooks, *experts]  # remove_all_hooks() finds them there

    def _unplace(self) -> None:
        """Take off whatever hooks the last placement installed: accelerate's, diffusers' group offloading, ours."""
        for handle in self._placement_hooks:
            handle.remove()
        self._placement_hooks.clear()
        pipe = self.pipeline
        pipe.remove_all_hooks()
        from diffusers.hooks import group_offloading

        names = [getattr(group_offloading, n, None) for n in (
            "_GROUP_OFFLOADING", "_LAYER_EXECUTION_TRACKER", "_LAZY_PREFETCH_GROUP_OFFLOADING")]
        for component in pipe.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            for module in component.modules():
                registry = getattr(module, "_diffusers_hook", None)
                for name in names:
                    if registry is not None and name is not None and registry.get_hook(name) is not None:
                        registry.remove_hook(name, recurse=False)

    def use_fp8(self) -> bool:
        """Store the denoisers' weights in fp8 from now on (for a placement that needs the room); True if that
        changed anything.

        Only `auto` weights change (fp8 ones are already, GGUF and torchao ones are smaller still). It is
        not undone in place: the model's own weights come back by loading it again. The try runs eagerly
        from then on; a job stepped down this way says so with `weights.FP8_FALLBACK_NOTE`.
        """
        if self.pipeline is None or self.info.weights.kind != "auto":
            return False
        store_in_fp8(self._denoisers(), self.dtype)
        self.info = replace(self.info, weights=replace(self.info.weights, kind="fp8", file=None), accelerated=False)
        return True

    def park(self) -> None:
        """Move the weights to host memory, keeping the pipeline, its LoRA and its compiled graphs (idle on a GPU)."""
        if self.placement == "gpu":  # offloaded placements keep their weights on the host already
            self.pipeline.to("cpu")
        free_memory(self.device)

    def unpark(self) -> None:
        """Back onto the device after `park`; the compiled graphs still hold (same modules, same device)."""
        if self.placement == "gpu":
            self.pipeline.to(self.device)

    def fast_path_for(self, request: GenerationRequest) -> bool:
        """Whether this try can run compiled: no saver that rewires the denoiser (chunking, offload hooks), the
        dtype's own weights, and the weights resident (no offloading placement).

        A LoRA runs compiled: peft's layers are modules inside the blocks, traced with them in one graph
        (same frames as eager). Its guards (the adapter's modules, its scale, enabled or not) make
        each LoRA file and scale one more graph of a shape, compiled at the first step of its first
        job, never inside the step loop; the disk cache brings it back after a restart.

        A step cache runs eagerly: whether a step skips blocks is decided on the host from the tensors
        (First Block Cache reads a mean with `.item()`, under torch.compiler.disable) and its hooks
        count steps in Python, a graph break that the fullgraph compile refuses.
        """
        return (self.placement == "gpu" and self.info.weights.kind == "auto" and request.cache in (None, "off")
                and not ({"forward_chunking", "cpu_offload"} & set(request.savers)))

    def versions(self) -> dict[str, Any]:
        """Library versions that produced the video, for the manifest."""
        import diffusers
        import transformers

        return {
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        }

    def close(self) -> None:
        """Release the pipeline and any GPU memory it holds; the object is unusable afterwards."""
        if getattr(self, "pipeline", None) is None:
            return
        self.pipeline = None
        self.accelerator = None
        self._schedulers.clear()
        self._default_scheduler = None
        free_memory(self.device)

    def _check_request(self, request: GenerationRequest) -> None:
        """Refuse what the planner should have prevented, rather than let the pipeline quietly change it."""
        unknown = [s for s in request.savers if s not in self.info.savers]
        if unknown:
            raise ValueError(f"savers {unknown} are not supported here; supported: {self.info.savers}")
        multiple = self.info.size_multiple
        if request.width % multiple or request.height % multiple:
            raise ValueError(f"{request.width}×{request.height} is not a multiple of {multiple}; use plan_size()")
        if self.plan_frames(request.num_frames).num_frames != request.num_frames:
            raise ValueError(f"{request.num_frames} frames is not a count {self.family} makes; use plan_frames()")
        if request.steps < self.info.min_steps:
            raise ValueError(f"{request.steps} steps is fewer than {self.family} can take; use plan_steps()")

    def _progress(self, steps: int, on_step: StepCallback) -> tuple[Callable[..., Any] | None, Any]:
        """A `callback_on_step_end` reporting each step, or a forward hook where the pipeline has no callback."""
        if self.progress_module is None:
            def after_step(pipe: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                on_step(i + 1, int(getattr(pipe, "_num_timesteps", 0) or steps))
                return tensors

            return after_step, None
        calls = 0

        def after_forward(_module: Any, _args: Any, _output: Any) -> None:
            nonlocal calls  # one forward per denoising step: guidance runs both halves in one batch
            calls += 1
            on_step(calls, steps)

        return None, getattr(self.pipeline, self.progress_module).register_forward_hook(after_forward)

    # ---- schedulers -----------------------------------------------------------------------------

    def scheduler_for(self, requested: str | None) -> str:
        """The name of the scheduler a job asking for `requested` runs with (InputError if not offered)."""
        return schedulers.check(self.family, self.info.scheduler, requested)

    @contextmanager
    def _scheduler(self, requested: str | None) -> Iterator[None]:
        """The job's scheduler in the pipeline for one call; the released one is back afterwards."""
        name = self.scheduler_for(requested)
        if name == self.info.scheduler:
            yield
            return
        if name not in self._schedulers:
            self._schedulers[name] = schedulers.build(self.family, self._default_scheduler, name)
        self.pipeline.scheduler = self._schedulers[name]
        try:
            yield
        finally:
            self.pipeline.scheduler = self._default_scheduler

    # ---- memory savers --------------------------------------------------------------------------

    def _denoisers(self) -> list[Any]:
        return denoisers_of(self.pipeline)

    def _supported_savers(self) -> tuple[str, ...]:
        """The memory savers this pipeline offers, in the OOM ladder's order."""
        vae = getattr(self.pipeline, "vae", None)
        savers = []
        if hasattr(vae, "use_slicing"):
            savers.append("vae_slicing")
        if hasattr(vae, "use_tiling"):
            savers.append("vae_tiling")
        if any(hasattr(m, "enable_forward_chunking") for m in self._denoisers()):
            savers.append("forward_chunking")
        if self.device.startswith("cuda"):  # offloading to the CPU only helps when the weights are elsewhere
            savers.append("cpu_offload")
        return tuple(savers)

    @contextmanager
    def _savers(self, savers: tuple[str, ...]) -> Iterator[None]:
        """Apply memory savers for one call, then restore the fast default for the next job."""
        pipe = self.pipeline
        vae: Any = getattr(pipe, "vae", None)
        try:
            if "vae_slicing" in savers and hasattr(vae, "use_slicing"):
                vae.enable_slicing()
            if "vae_tiling" in savers and hasattr(vae, "use_tiling"):
                vae.enable_tiling()
            if "forward_chunking" in savers:
                for m in self._denoisers():
                    if hasattr(m, "enable_forward_chunking"):
                        m.enable_forward_chunking()
            if "cpu_offload" in savers and self.placement == "gpu":  # offloaded placements are offloaded already
                pipe.enable_model_cpu_offload(device=self.device)
            yield
        finally:
            self._reset_savers(savers)

    def _reset_savers(self, savers: tuple[str, ...]) -> None:
        """Undo `_savers`: plain VAE and denoiser, every component resident on the device again."""
        pipe = self.pipeline
        vae: Any = getattr(pipe, "vae", None)
        if "vae_slicing" in savers and hasattr(vae, "use_slicing"):
            vae.disable_slicing()
        if "vae_tiling" in savers and hasattr(vae, "use_tiling"):
            vae.disable_tiling()
        if "forward_chunking" in savers:
            for m in self._denoisers():
                disable_forward_chunking(m)
        if "cpu_offload" in savers and self.placement == "gpu":
            pipe.remove_all_hooks()
            pipe.to(self.device)

    # ---- LoRA -----------------------------------------------------------------------------------

    @contextmanager
    def _lora(self, lora: LoraChoice | None) -> Iterator[None]:
        """The request's LoRA active at its scale for one call; the last one stays loaded, disabled, for reuse."""
        pipe = self.pipeline
        if lora is None:
            if self._lora_loaded is not None:
                pipe.disable_lora()
            yield
            return
        try:
            key = (lora.path, os.stat(lora.path).st_mtime_ns)  # a file replaced in place is loaded again
        except OSError as err:
            raise InputError(f"lora {lora.name!r} cannot be read ({err.strerror}); put it back into lora_dir") from err
        if key != self._lora_loaded:
            self._unload_lora()
            try:
                self._load_lora(lora.path)
            except torch.cuda.OutOfMemoryError:
                self._unload_lora()
                raise
            except Exception as err:  # wrong family, wrong rank, not a safetensors file: the user's to fix
                self._unload_lora()
                first = first_line(err, limit=200)
                raise InputError(f"lora {lora.name!r} does not fit this {self.family} model ({first})") from err
            self._lora_loaded = key
        pipe.enable_lora()
        pipe.set_adapters([LORA_ADAPTER], [lora.scale])
        yield

    def _load_lora(self, path: str) -> None:
        """The file into every denoiser, under the one adapter name (so set_adapters, enable, disable and
        unload reach them all)."""
        pipe = self.pipeline
        pipe.load_lora_weights(path, adapter_name=LORA_ADAPTER)
        if getattr(pipe, "transformer_2", None) is not None:
            # Wan 2.2 A14B: the low-noise expert runs the last steps, which settle the detail; a LoRA
            # in the high-noise expert alone would shape only the first few.
            pipe.load_lora_weights(path, adapter_name=LORA_ADAPTER, load_into_transformer_2=True)

    def _unload_lora(self) -> None:
        if self._lora_loaded is not None or getattr(self.pipeline, "get_list_adapters", lambda: {})():
            self.pipeline.unload_lora_weights()
        self._lora_loaded = None


def _no_phase(_phase: str) -> None:
    """A phase callback that does nothing."""


def _offloader(hooks: list[Any]) -> Callable[..., None]:
    """A forward pre-hook that sends `hooks`' modules back to the host (it returns None: the inputs stay)."""

    def offload(*_args: Any) -> None:
        for hook in hooks:
            hook.offload()

    return offload
