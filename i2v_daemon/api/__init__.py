"""`i2v-daemon serve`: the HTTP API and the live page, in a process of their own that never imports PyTorch."""

from __future__ import annotations

from i2v_daemon.api.app import create_app
from i2v_daemon.api.server import serve

__all__ = ["create_app", "serve"]
