"""Activation peaks already replayed, kept on disk between processes.

A meta-device replay of a full-size model's step and decode (sizing.py) costs seconds to minutes of
CPU: HunyuanVideo's tiled decode at 1280x720x129 takes over a minute on two cores, and `doctor`
plans every preset of every model. The answer depends only on the model's configs, the job's size
and dtype, and the code that replays it, so it is kept under a key made of all of those: the configs'
bytes (model_index.json and each component's config.json, never the weights), the source of every
module in models/, and the torch, diffusers and transformers versions. Any change makes a new key;
nothing is ever read back for a different question.

The folder is `$I2V_REPLAY_CACHE`, else `$XDG_CACHE_HOME/i2v-daemon/replays` (`~/.cache/…`);
`I2V_REPLAY_CACHE=off` turns it off. A folder that cannot be written (a service user without a home)
costs only the speed: the replay runs as before, and the log says so at debug level.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from i2v_daemon.logs import get_logger

CACHE_VAR = "I2V_REPLAY_CACHE"
#: The files whose bytes decide a replay: the pipeline's index, each component's config.
CONFIG_NAMES = ("config.json", "scheduler_config.json")


def folder() -> Path | None:
    """Where replays are kept; None when turned off."""
    chosen = os.environ.get(CACHE_VAR, "")
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:  # a user without a home (HOME unset, no passwd entry): keep nothing rather than fail
            home = Path.home()
        except (RuntimeError, KeyError):
            return None
        if not home.is_absolute():
            return None
        base = str(home / ".cache")
    return Path(base) / "i2v-daemon" / "replays"


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """The models layer's source and the libraries' versions: a change to either is a new question."""
    import diffusers
    import torch
    import transformers

    digest = hashlib.sha256(f"{torch.__version__}|{diffusers.__version__}|{transformers.__version__}".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def key(model_folder: Path, **question: Any) -> str:
    """The key of one replay: the configs' bytes, the code, and the question (dtype, size, …)."""
    digest = hashlib.sha256(_code_digest().encode())
    files = [model_folder / "model_index.json"]
    files += sorted(p for name in CONFIG_NAMES for p in model_folder.glob(f"*/{name}"))
    for path in files:
        digest.update(str(path.relative_to(model_folder)).encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"(unreadable)")
    digest.update(json.dumps(question, sort_keys=True).encode())
    return digest.hexdigest()


def get(cache_key: str) -> dict[str, int] | None:
    """The replay's peaks as kept, or None (not kept, turned off, unreadable or damaged: replay again)."""
    where = folder()
    if where is None:
        return None
    try:
        data = json.loads((where / f"{cache_key}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(v, int) and v >= 0 for v in data.values()):
        return None
    return data


def put(cache_key: str, peaks: dict[str, int]) -> None:
    """Keep a replay's peaks; a folder that cannot be written is said at debug level and forgotten."""
    where = folder()
    if where is None:
        return
    # A temp name of this writer's own: two processes (or threads) keeping the same answer never share one.
    # No fsync: a file torn by a crash reads as damaged and is replayed.
    tmp = where / f".{cache_key}.{os.getpid()}.{threading.get_ident()}.part"
    try:
        where.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(peaks))
        os.replace(tmp, where / f"{cache_key}.json")
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        get_logger().debug("replay_not_kept", folder=str(where), error=str(err))
