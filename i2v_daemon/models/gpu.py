"""What torch sees of the GPU: memory held and free, peaks, the card's name and budget, OOM errors.

The one place besides the adapters that asks torch about devices: `doctor` (describe), the
holder (budgets, resident bytes, freeing) and generate.py (peaks, OOM errors) all come here, so
no module above `models/` needs to import generate.py for a GPU fact. torch is imported inside
the functions: importing this module stays cheap.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from i2v_daemon.errors import first_line
from i2v_daemon.models.memory import ANCHOR_SLOPE, GIB, MemoryModel

if TYPE_CHECKING:
    from i2v_daemon.models.base import VideoModel

__all__ = [
    "GpuState", "allocated_bytes", "card", "describe", "free_memory", "gpu_budget_bytes", "gpu_name", "gpu_state",
    "is_cuda", "is_oom", "memory_model_for", "peak_bytes", "reset_peak",
]


def is_cuda(device: str) -> bool:
    """Whether `device` names a CUDA GPU that torch can use now."""
    if not device.startswith("cuda"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def is_oom(err: BaseException) -> bool:
    """Whether `err` is torch's out-of-memory error (CUDA's, or the device-neutral one of newer torch)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom | torch.cuda.OutOfMemoryError)


def free_memory(device: str) -> None:
    """Let go of what nothing references any more: Python's cycles, then the CUDA cache on a GPU.

    Call it outside any `except` block: while an exception is being handled its traceback keeps
    the failed call's frames, and their tensors, alive.
    """
    gc.collect()
    if is_cuda(device):
        import torch

        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    """Start a new peak-memory measurement on `device` (nothing on the CPU)."""
    if is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_bytes(device: str) -> int | None:
    """The highest memory PyTorch held on `device` since `reset_peak`; None on the CPU."""
    if is_cuda(device):
        import torch

        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    return None


def allocated_bytes(device: str) -> int:
    """What PyTorch holds on `device` now (0 on the CPU): between jobs, the warm models' weights."""
    if is_cuda(device):
        import torch

        return int(torch.cuda.memory_allocated(torch.device(device)))
    return 0


def gpu_budget_bytes(device: str, vram_budget_gib: float | None) -> int:
    """The card's memory, or `vram_budget_gib` of it where that is smaller."""
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return min(total, int(vram_budget_gib * GIB)) if vram_budget_gib else total


def gpu_name(device: str) -> str | None:
    """The card's name (`NVIDIA H200`), None on the CPU."""
    if is_cuda(device):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    return None


def card(device: str) -> str:
    """The card and its memory, for error messages (`NVIDIA H200 with 139.8 GiB`); the device name on the CPU."""
    if is_cuda(device):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} with {props.total_memory / GIB:.1f} GiB"
    return device


def memory_model_for(model: VideoModel, vram_budget_gib: float | None, margin: float) -> MemoryModel | None:
    """The memory model for a loaded model on a CUDA card (None on the CPU: no prediction there).

    `vram_budget_gib` also caps PyTorch's allocator, so the daemon never takes more of a shared
    card than it was given; going over raises OutOfMemoryError and the ladder steps down.
    """
    if not is_cuda(model.device):
        return None
    import torch

    dev = torch.device(model.device)
    total = torch.cuda.get_device_properties(dev).total_memory
    budget = total
    if vram_budget_gib:
        budget = min(total, int(vram_budget_gib * GIB))
        torch.cuda.set_per_process_memory_fraction(budget / total, dev)
    return MemoryModel(
        budget_bytes=budget,
        resident_bytes=torch.cuda.memory_allocated(dev),
        dtype_scale=2.0 if model.dtype == "float32" else 1.0,
        margin=margin,
        # The anchors were measured on I2VGen-XL; other families learn theirs from their own tries.
        anchor_slope=ANCHOR_SLOPE if model.info.family == "i2vgen-xl" else None,
    )


def describe() -> dict[str, Any]:
    """torch's version and CUDA build, and each visible GPU's name, capability and free/total memory."""
    import torch

    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,  # None: a CPU-only build of torch
        "cuda_available": False,
        "devices": [],
        "error": None,
    }
    try:
        out["cuda_available"] = bool(torch.cuda.is_available())
        for i in range(torch.cuda.device_count() if out["cuda_available"] else 0):
            free, total = torch.cuda.mem_get_info(i)
            major, minor = torch.cuda.get_device_capability(i)
            out["devices"].append({
                "index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}",
                "free_bytes": int(free), "total_bytes": int(total),
            })
    except Exception as err:  # a driver/library mismatch surfaces here; doctor reports it
        out["error"] = first_line(err, with_type=True)
    return out


#: PyTorch's CUDA allocator setting the daemon runs with, unless the environment names one: memory
#: segments that grow in place, so what a try freed (the out-of-memory ladder) can hold a larger
#: tensor next instead of staying fragmented.
ALLOC_CONF = "expandable_segments:True"
#: Where PyTorch reads its allocator setting from: the current name, then the older CUDA and ROCm ones.
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


def configure_allocator() -> tuple[str, str] | None:
    """Set PYTORCH_CUDA_ALLOC_CONF for this process before torch first touches CUDA (the allocator reads it
    once, at its first use); None, or (variable, value) of the user's own setting, which is kept."""
    for var in ALLOC_CONF_VARS:
        if os.environ.get(var):
            return var, os.environ[var]
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    return None


#: cuDNN's autotuning (the fast path's `cudnn.benchmark`) tries each convolution's algorithms with
#: workspaces as large as the free memory allows; PyTorch caps each at CUDNN_CONV_WSCAP_DBG MiB. The
#: daemon sets this cap unless the environment names one, and the memory model counts it on top of the
#: decode and the denoising step when autotuning is on.
CUDNN_WORKSPACE_VAR = "CUDNN_CONV_WSCAP_DBG"
CUDNN_WORKSPACE_MIB = 1024


def configure_cudnn_workspace() -> str | None:
    """Cap cuDNN's autotuning workspace for this process; None, or the user's own value, which is kept."""
    if os.environ.get(CUDNN_WORKSPACE_VAR):
        return os.environ[CUDNN_WORKSPACE_VAR]
    os.environ[CUDNN_WORKSPACE_VAR] = str(CUDNN_WORKSPACE_MIB)
    return None


def cudnn_workspace_bytes() -> int:
    """The cap on one cuDNN workspace in effect here: the environment's, else the daemon's."""
    value = os.environ.get(CUDNN_WORKSPACE_VAR, "").strip()
    # A value that is not a whole number of MiB (`run` warns of it): the daemon's own figure is the best guess.
    return (int(value) if value.isdigit() else CUDNN_WORKSPACE_MIB) * 2**20


@dataclass(frozen=True)
class GpuState:
    """What this machine's torch and NVIDIA driver offer now, asked without touching CUDA in this process."""

    torch: str  #: torch's version
    cuda_build: str | None  #: the CUDA version torch was built for; None: a CPU-only (or ROCm) build
    count: int | None  #: GPUs the driver shows now; None: not asked (a ROCm build)
    error: str | None = None  #: why the driver shows none, in one line


#: Asks the driver (libcuda, no torch) how many GPUs it shows, in a process of its own: prints one JSON object.
_DRIVER_PROBE = r"""
import ctypes, json
out = {"count": 0, "error": None}
def name(cuda, rc):
    text = ctypes.c_char_p()
    cuda.cuGetErrorName(rc, ctypes.byref(text))
    return (text.value or b"error %d" % rc).decode()
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as err:
    out["error"] = "the NVIDIA driver's library libcuda.so.1 cannot be loaded (%s)" % err
else:
    rc = cuda.cuInit(0)
    count = ctypes.c_int(0)
    if rc != 0:
        out["error"] = "the NVIDIA driver cannot be initialised (cuInit: %s)" % name(cuda, rc)
    elif cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        out["error"] = "the NVIDIA driver shows no GPU"
    out["count"] = count.value
print(json.dumps(out))
"""


def gpu_state(timeout: float = 30.0) -> GpuState:
    """torch's build, and how many GPUs the driver shows now (asked in a fresh process, see below).

    CUDA's answer is fixed for the life of a process once asked: torch caches the device count and
    a failed cuInit stays failed. So a daemon that asked in its own process while the driver was
    being reloaded would stay blind to the GPU; asking a short-lived child leaves this process free
    to ask for real once the child sees one. `I2V_TEST_GPU_STATE=FILE` (tests: the device seam)
    answers with FILE's JSON object (`cuda_build`, `count`, `error`) instead, read at each call.
    """
    import torch

    seam = os.environ.get("I2V_TEST_GPU_STATE")
    if seam:
        with open(seam, encoding="utf-8") as fh:
            told = json.load(fh)
        return GpuState(torch.__version__, told.get("cuda_build"), told.get("count"), told.get("error"))
    build = torch.version.cuda
    if build is None:
        return GpuState(torch.__version__, None, None if torch.version.hip else 0, None)
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _DRIVER_PROBE], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return GpuState(torch.__version__, build, 0, f"the NVIDIA driver did not answer within {timeout:.0f} s")
    except OSError as err:
        return GpuState(torch.__version__, build, 0, f"the driver probe could not run: {err}")
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):  # the child died inside the driver (a crash while it reloads)
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return GpuState(torch.__version__, build, 0, f"asking the NVIDIA driver failed: {tail}")
    return GpuState(torch.__version__, build, int(answer.get("count") or 0), answer.get("error"))
