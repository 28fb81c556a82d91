"""What torch sees of the GPUs, as plain values, for `i2v-daemon doctor` (torch stays inside models/)."""

from __future__ import annotations

from typing import Any


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
