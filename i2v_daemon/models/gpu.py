"""What torch sees of the GPU: memory held and free, peaks, the card's name and budget, OOM errors.

The one place besides the adapters that asks torch about devices: `doctor` (describe), the
holder (budgets, resident bytes, freeing) and generate.py (peaks, OOM errors) all come here, so
no module above `models/` needs to import generate.py for a GPU fact. torch is imported inside
the functions: importing this module stays cheap.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

from i2v_daemon.models.memory import ANCHOR_SLOPE, GIB, MemoryModel

if TYPE_CHECKING:
    from i2v_daemon.models.base import VideoModel

__all__ = [
    "allocated_bytes", "card", "describe", "free_memory", "gpu_budget_bytes", "gpu_name", "is_cuda", "is_oom",
    "memory_model_for", "peak_bytes", "reset_peak",
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
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return out
