"""The fast path (`accelerate`): each denoiser compiled once per input shape, outside its hooks, plus the
layout and flags that pay on a GPU. Same math as the eager path: frames agree within fp16 tolerance.

How it stays safe inside a job:
- The compiled function is the denoiser's own `forward`, installed on the module only for an
  accelerated try, so forward hooks (I2VGen-XL's progress) run eagerly around it and never enter
  the graph; `fullgraph=True`, so a graph break is an error here, not a silent slowdown.
- Every size is a static graph (the UNet's adaptive pooling pins height and width anyway); only
  the dims a family names are left symbolic (I2VGen-XL's frames, so the fast and standard
  presets can share a graph). Graphs are compiled only at a try's first step: a bucket new to
  this process, or a frame count past the guards of the graph its bucket has, is compiled then,
  once, and recorded. Every later step runs under `set_stance("fail_on_recompile")`, so a guard
  that stops holding mid-job (a module changed under it) cannot recompile in the step loop:
  that try goes on eagerly and says why.
- At most `max_graphs` graphs are kept per denoiser class; past that its graphs are dropped
  together (dynamo cannot drop one), and the on-disk cache brings any of them back in seconds.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from i2v_daemon.errors import first_line
from i2v_daemon.models.gpu import is_oom

__all__ = [
    "MAX_GRAPHS", "Accelerator", "CompiledDenoiser", "CountingInductor", "TryReport", "host_timesteps", "shape_key",
    "to_channels_last",
]

#: Shapes kept compiled per denoiser class: the three presets and a rung or two below them.
MAX_GRAPHS = 6
#: What torch says when the fail_on_recompile stance refuses a recompile.
RECOMPILE_REFUSED = "fail_on_recompile"
#: Schedulers whose `step` gives the same result for a Python int timestep as for the device tensor,
#: so the host-side value can be passed and the step never reads the GPU (checked in tests).
HOST_STEP_SCHEDULERS = frozenset({"DDIMScheduler"})


@dataclass
class TryReport:
    """How one accelerated try went: whether it stayed on the fast path, and what it compiled."""

    accelerated: bool = True  # False once any step ran eagerly
    compiled: list[str] = field(default_factory=list)  # shapes compiled during this try
    compile_seconds: float = 0.0
    fell_back: str | None = None  # why part of the try ran eagerly

    def fall_back(self, why: str) -> None:
        self.accelerated = False
        self.fell_back = self.fell_back or why


class CountingInductor:
    """The Inductor backend, counting the graphs it compiles: the recompile counter tests and the bench read."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self.graphs = 0

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        from torch._inductor import compile as inductor_compile

        self.graphs += 1
        return inductor_compile(gm, example_inputs, options=self.options)


def shape_key(value: Any, dynamic: tuple[int, ...] = ()) -> Any:
    """What decides a graph: tensor shapes (but the `dynamic` dims), dtypes and devices, and the plain
    values passed beside them. A mapping's values are keyed with its own names' dynamic dims."""
    if isinstance(value, torch.Tensor):
        shape = tuple("*" if i in dynamic else d for i, d in enumerate(value.shape))
        return ("tensor", shape, str(value.dtype), str(value.device))
    if isinstance(value, dict):
        return tuple((k, shape_key(v)) for k, v in sorted(value.items()))
    if isinstance(value, list | tuple):
        return tuple(shape_key(v) for v in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return type(value).__name__


def describe_shape(key: Any) -> str:
    """The first tensor's shape in a key, for logs: "2x4x16x64x64"."""
    stack = [key]
    while stack:
        item = stack.pop(0)
        if isinstance(item, tuple) and item[:1] == ("tensor",):
            return "x".join(str(d) for d in item[1])
        if isinstance(item, tuple):
            stack[:0] = list(item)
    return "?"


#: Every CompiledDenoiser by the code object dynamo caches on, so dropping one class's graphs
#: (`torch._dynamo.reset_code`) also clears what its siblings believe is compiled.
_SIBLINGS: dict[Any, weakref.WeakSet[CompiledDenoiser]] = {}


class CompiledDenoiser:
    """One denoiser module's `forward`, compiled per input shape and run outside the module's hooks."""

    def __init__(self, module: Any, backend: CountingInductor, max_graphs: int = MAX_GRAPHS,
                 dynamic_dims: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.module = module
        self.eager = module.forward  # the class's forward, bound: what plain diffusers runs
        self.backend = backend
        self.max_graphs = max_graphs
        #: argument name -> dims left symbolic in the graph (I2VGen-XL's frames), so one graph serves
        #: every frame count at a size; all other dims are static, one graph per value.
        self.dynamic_dims = dict(dynamic_dims or {})
        self._signature = inspect.signature(self.eager)
        # Automatic dynamic shapes would turn a second height or width into a symbolic graph (slower,
        # and the adaptive pooling cannot take it): each size is its own bucket instead.
        torch._dynamo.config.automatic_dynamic_shapes = False
        self.compiled = torch.compile(self.eager, backend=backend, fullgraph=True)
        self.shapes: OrderedDict[Any, str] = OrderedDict()  # compiled keys, least recently used first
        self.broken: dict[Any, str] = {}  # (variant, key) whose compile failed: they run eagerly
        #: What the module holds this try beyond its shapes (the LoRA and its scale): a compile that fails
        #: with a LoRA in the blocks must not send the same shape without it to the eager path.
        self.variant: Any = None
        self.compile_seconds: dict[str, float] = {}  # per shape, as measured here
        self.report: TryReport | None = None
        self.on_phase: Callable[[str], None] = _ignore
        self.graph_count = 0  # graphs compiled for this module since its class's were last dropped
        self._calls = 0  # calls in the current try
        code = getattr(type(module).forward, "__code__", None)
        _SIBLINGS.setdefault(code, weakref.WeakSet()).add(self)
        self._code = code
        # dynamo's own limit must sit above ours, or it would silently fall back to eager first.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * max_graphs + 2)

    @contextmanager
    def installed(self, report: TryReport, on_phase: Callable[[str], None], variant: Any = None) -> Iterator[None]:
        """Route the module's calls through the compiled forward for one try."""
        self.report, self.on_phase, self._calls, self.variant = report, on_phase, 0, variant
        self.module.forward = self  # an instance attribute: Module.__call__ runs hooks, then this
        try:
            yield
        finally:
            self.module.__dict__.pop("forward", None)
            self.report, self.on_phase = None, _ignore

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        report = self.report
        if report is None or not report.accelerated:
            return self.eager(*args, **kwargs)
        key = self._key(args, kwargs)
        if (self.variant, key) in self.broken:
            report.fall_back(self.broken[(self.variant, key)])
            return self.eager(*args, **kwargs)
        first = self._calls == 0  # the try's first step: the one place a graph may be compiled
        self._calls += 1
        if key in self.shapes:
            self.shapes.move_to_end(key)
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    return self.compiled(*args, **kwargs)
            except RuntimeError as err:
                if RECOMPILE_REFUSED not in str(err):
                    raise
                if not first:
                    reason = " ".join(str(err).split())[:300]
                    report.fall_back(f"a recompile was refused inside the step loop, so the try went on eagerly: "
                                     f"{reason}")
                    return self.eager(*args, **kwargs)
                # At the first step, a graph its bucket lacks (a frame count past the guards of the
                # one compiled) is compiled like a new bucket's.
        elif not first:
            report.fall_back("a new input shape appeared inside the step loop, so the try went on eagerly")
            return self.eager(*args, **kwargs)
        return self._compile(key, args, kwargs, report)

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The bucket of a call, marking the dynamic dims of its tensors for dynamo on the way."""
        if not self.dynamic_dims:
            return shape_key((args, kwargs))
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return shape_key((args, kwargs))
        parts = []
        for name, value in bound.items():
            dims = self.dynamic_dims.get(name, ())
            if dims and isinstance(value, torch.Tensor):
                for dim in dims:
                    # "maybe": a size of 1 is specialised by dynamo rather than refused.
                    torch._dynamo.maybe_mark_dynamic(value, dim)
            parts.append((name, shape_key(value, dims)))
        return tuple(parts)

    def _compile(self, key: Any, args: Any, kwargs: Any, report: TryReport) -> Any:
        """A graph new to this process, at a try's first step: compiled once, now (the disk cache makes it quick
        when any process on this host compiled it before)."""
        self._make_room()
        label = describe_shape(shape_key((args, kwargs)))
        self.on_phase("compiling")
        t0 = time.monotonic()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as err:
            if is_oom(err):
                raise
            first = first_line(err, limit=300)
            why = f"compiling {type(self.module).__name__} for {label} failed ({first}); it runs eagerly"
            self.broken[(self.variant, key)] = why
            report.fall_back(why)
            return self.eager(*args, **kwargs)
        seconds = time.monotonic() - t0
        self.shapes[key] = describe_shape(key)
        self.graph_count += 1
        self.compile_seconds[label] = round(seconds, 3)
        report.compiled.append(label)
        report.compile_seconds += seconds
        self.on_phase("denoising")
        return out

    def _make_room(self) -> None:
        if self.graph_count < self.max_graphs:
            return
        reset_code = getattr(torch._dynamo, "reset_code", None)
        if reset_code is not None and self._code is not None:
            reset_code(self._code)
            siblings = list(_SIBLINGS.get(self._code, ()))
        else:  # pragma: no cover - older torch: all compiled code goes
            torch._dynamo.reset()
            siblings = [d for group in _SIBLINGS.values() for d in group]
        for denoiser in siblings:
            denoiser.shapes.clear()
            denoiser.graph_count = 0


def to_channels_last(module: Any) -> int:
    """Every 4-D weight (a 2-D convolution's) to channels_last, in place; how many changed.

    `Module.to(memory_format=channels_last)` refuses the 5-D weights of temporal convolutions
    (I2VGen-XL's UNet has them), so the 2-D ones are converted one by one and the others stay.
    """
    changed = 0
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() == 4 and not param.is_contiguous(memory_format=torch.channels_last):
                param.data = param.data.contiguous(memory_format=torch.channels_last)
                changed += 1
    return changed


def _ignore(_phase: str) -> None:
    """A phase callback that does nothing."""


@contextmanager
def host_timesteps(scheduler: Any) -> Iterator[None]:
    """Let the scheduler's `step` take each timestep's value from the host instead of reading the GPU.

    The pipelines loop over `scheduler.timesteps` on the device; DDIM's step indexes a CPU table with
    that device scalar and compares it with 0, which makes the host wait for the GPU at every step.
    The values are copied to the host once per job, and each step's tensor (a view into that
    table) is mapped back to its index by address, which needs no device read. DDIM's arithmetic
    is the same for the int as for the tensor (the same table entries), so the frames are too.
    """
    if type(scheduler).__name__ not in HOST_STEP_SCHEDULERS:
        yield
        return
    set_timesteps, step = scheduler.set_timesteps, scheduler.step
    table: dict[str, Any] = {}

    def on_set_timesteps(*args: Any, **kwargs: Any) -> Any:
        result = set_timesteps(*args, **kwargs)
        ts = scheduler.timesteps
        table.update(values=ts.tolist(), base=ts.data_ptr(), size=ts.element_size(), n=ts.numel())
        return result

    def host_step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        if table and isinstance(timestep, torch.Tensor) and timestep.numel() == 1:
            index, rest = divmod(timestep.data_ptr() - table["base"], table["size"])
            if rest == 0 and 0 <= index < table["n"]:
                timestep = table["values"][index]
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.set_timesteps, scheduler.step = on_set_timesteps, host_step
    try:
        yield
    finally:
        scheduler.__dict__.pop("set_timesteps", None)
        scheduler.__dict__.pop("step", None)


class Accelerator:
    """The fast path of one loaded pipeline: prepared once (layout, fused projections), compiled per shape."""

    def __init__(self, pipeline: Any, device: str, *, denoisers: tuple[str, ...], fuse_qkv: bool,
                 max_graphs: int = MAX_GRAPHS, cuda_graphs: bool = False,
                 dynamic_dims: Mapping[str, tuple[int, ...]] | None = None,
                 on_compiled: Callable[[], None] | None = None) -> None:
        self.pipeline = pipeline
        self.device = device
        # CUDA graphs replay a step's kernels without the launch cost, but keep a private memory pool
        # per shape; off until measured on a card (bench/gpu_check.sh reports both).
        options = {"triton.cudagraphs": True} if cuda_graphs and device.startswith("cuda") else {}
        self.backend = CountingInductor(options)
        self.on_compiled = on_compiled  # e.g. save the compile cache's portable artefacts
        self.prepared: list[str] = []  # what preparation changed, for the log and doctor
        self._prepare(fuse_qkv)
        self.denoisers = {
            name: CompiledDenoiser(getattr(pipeline, name), self.backend, max_graphs, dynamic_dims)
            for name in denoisers if getattr(pipeline, name, None) is not None
        }

    @property
    def graphs(self) -> int:
        """Graphs Inductor compiled for this pipeline (a recompile counts too)."""
        return self.backend.graphs

    def compiled_shapes(self) -> list[str]:
        return [label for d in self.denoisers.values() for label in d.shapes.values()]

    def _prepare(self, fuse_qkv: bool) -> None:
        """Once per load: fused attention projections, and on a GPU the layout and flags that pay there."""
        pipe = self.pipeline
        if fuse_qkv:
            unet = getattr(pipe, "unet", None)
            if unet is not None and hasattr(unet, "fuse_qkv_projections"):
                # One matrix product for Q, K and V instead of three; the math is the same.
                unet.fuse_qkv_projections()
                self.prepared.append("fused_qkv")
        # cuDNN's fp16 convolutions run in NHWC: with NCHW weights every call converts both ways
        # (8% of an eager I2VGen-XL step on an H200). Inductor picks its own layout inside the graph;
        # the VAE decode runs eagerly and keeps the layout its weights have. Done on the CPU too, so
        # CI runs the fast path with the same weights' layout as a GPU.
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and to_channels_last(module):
                self.prepared.append(f"{name}_channels_last")
        if not self.device.startswith("cuda"):
            return
        torch.backends.cudnn.benchmark = True  # shapes repeat job after job: tune each convolution once
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 parts (Wan's VAE) use the tensor cores
        torch.backends.cudnn.allow_tf32 = True
        self.prepared += ["cudnn_benchmark", "tf32"]

    @contextmanager
    def run(self, report: TryReport, on_phase: Callable[[str], None], variant: Any = None) -> Iterator[TryReport]:
        """One accelerated try: compiled denoisers installed, the scheduler's step kept off the device.

        `variant` names what the denoisers hold besides their weights (a LoRA and its scale), so that a
        graph that cannot be compiled with it is not given up for the plain model too.
        """
        before = self.backend.graphs
        with ExitStack() as stack:
            for denoiser in self.denoisers.values():
                stack.enter_context(denoiser.installed(report, on_phase, variant))
            stack.enter_context(host_timesteps(self.pipeline.scheduler))
            yield report
        if self.backend.graphs != before and self.on_compiled is not None:
            self.on_compiled()
