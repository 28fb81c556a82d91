"""What a sidecar may choose among what the config allows: a model by name, a LoRA file from `lora_dir`.

Pure checks with messages a person can act on; intake runs them when a job arrives (so a typo
fails at once), `validate` runs them on request, and the worker resolves the LoRA again when the
job runs (the file may have gone since).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon.errors import InputError
from i2v_daemon.params import LORA_SUFFIX, lora_name_problem

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings



def check_choices(values: Mapping[str, Any], settings: Settings, where: str) -> None:
    """The sidecar's `model` is allowed by the config and the job's `lora` (its own or its preset's) exists in
    lora_dir; else InputError."""
    name = values.get("model")
    allowed = settings.model_choices()
    if name is not None and name not in allowed:
        raise InputError(
            f"{where}: model {name!r} is not one the config allows; use one of {', '.join(sorted(allowed))} "
            "(or add it to the config's [models] table)"
        )
    if values.get("lora") is not None:
        try:
            resolve_lora(settings.lora_dir, values["lora"])
        except InputError as err:
            raise InputError(f"{where}: {err}") from None


def resolve_lora(lora_dir: Path | None, name: str) -> Path:
    """The real path of LoRA file `name` in `lora_dir` (".safetensors" may be left off); InputError if not there."""
    if lora_dir is None:
        raise InputError(
            f"lora {name!r} was asked for, but this daemon has no lora_dir; remove 'lora', "
            "or set lora_dir in the config"
        )
    problem = lora_name_problem(name)
    if problem:
        raise InputError(f"lora {name!r} {problem}")
    file_name = name if name.endswith(LORA_SUFFIX) else name + LORA_SUFFIX
    root = Path(lora_dir).resolve()
    path = root / file_name
    try:
        st = os.lstat(path)
    except OSError:
        raise InputError(f"lora {name!r}: there is no {file_name} in {root}; {_available(root)}") from None
    if stat.S_ISLNK(st.st_mode):
        real = path.resolve()
        if not real.is_relative_to(root):
            raise InputError(f"lora {name!r}: {file_name} is a link that leads outside {root}; copy the file there")
        path = real
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"lora {name!r}: {path} is not a regular file")
    return path


def _available(root: Path) -> str:
    try:
        names = sorted(p.name for p in root.iterdir() if p.name.endswith(LORA_SUFFIX) and not p.name.startswith("."))
    except OSError as err:
        return f"lora_dir cannot be read ({err.strerror})"
    if not names:
        return "lora_dir holds no .safetensors files"
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return f"available: {shown}"
