"""Asking the Hugging Face Hub about a model, boundedly, and naming the command that downloads one.

The loader and `doctor` share this: one HEAD request that does not retry (hf_hub_download backs off
for about 25 s on a dead network), bounded by a thread because DNS lookups ignore socket timeouts,
and a verdict that tells "can never be had as configured" from "cannot be fetched right now".
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from i2v_daemon.errors import first_line

#: How long one question to the Hub may take.
HUB_PROBE_SECONDS = 5.0


def hub_cli() -> str:
    """The installed huggingface_hub's command, from its entry points: `hf` (1.0 on) or `huggingface-cli` (before)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        names = {ep.name for ep in distribution("huggingface_hub").entry_points if ep.group == "console_scripts"}
    except PackageNotFoundError:
        names = set()
    for name in ("hf", "huggingface-cli"):
        if name in names:
            beside = Path(sys.executable).parent / name  # the venv's bin/, which need not be on PATH
            if beside.is_file() and shutil.which(name) != str(beside):
                return str(beside)
            return name
    return f"{sys.executable} -m huggingface_hub.cli.hf"


class HubProbe:
    """Asks the Hub about a repo with one bounded request; once the Hub did not answer, it is not asked again."""

    def __init__(self, seconds: float = HUB_PROBE_SECONDS) -> None:
        self.seconds = seconds
        self.down: str | None = None
        self.seen: dict[str, tuple[str, str]] = {}

    def ask(self, model: str) -> tuple[str, str]:
        """("ok" | "down" | "gated" | "missing" | "not_pipeline" | "refused", detail) for `model`'s model_index.json."""
        if self.down is not None:
            return "down", self.down
        if model not in self.seen:
            verdict = bounded(lambda: head_model_index(model, self.seconds), self.seconds)
            if verdict is None:
                verdict = ("down", f"no answer within {self.seconds:g} s")
            if verdict[0] == "down":
                self.down = verdict[1]
            self.seen[model] = verdict
        return self.seen[model]


def head_model_index(model: str, seconds: float) -> tuple[str, str]:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # The telemetry part of the user agent first fetches a list of "agent harnesses" from the Hub
    # (3 s more on a dead network) and caches it under HF_HOME: doctor wants one request, no writes.
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        # One HEAD: get_hf_file_metadata does not retry, where hf_hub_download backs off for ~25 s.
        get_hf_file_metadata(hf_hub_url(model, "model_index.json"), timeout=seconds)
    except GatedRepoError as err:
        return "gated", first_line(err, with_type=True)
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        return "missing", first_line(err, with_type=True)
    except EntryNotFoundError as err:
        return "not_pipeline", first_line(err, with_type=True)
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            return "refused", f"HTTP {status}: {first_line(err, with_type=True)}"
        return "down", first_line(err, with_type=True)
    except Exception as err:  # connection refused, DNS, timeouts, TLS: the network, not the repo
        return "down", first_line(err, with_type=True)
    return "ok", ""


def bounded(fn: Callable[[], tuple[str, str]], seconds: float) -> tuple[str, str] | None:
    """fn() in a daemon thread; None when it has not returned within `seconds` (DNS lookups ignore socket timeouts)."""
    box: list[tuple[str, str]] = []
    thread = threading.Thread(target=lambda: box.append(fn()), name="doctor-hub-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    return box[0] if box else None
