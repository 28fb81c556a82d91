"""Session fixtures with a tiny random I2VGen-XL saved to disk, so tests run the real loading path.

Wired into tests/conftest.py by importing `tiny_i2vgen_dir` and `tiny_model` there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from i2v_daemon.models.base import VideoModel


@pytest.fixture(scope="session")
def tiny_i2vgen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder holding a tiny random I2VGen-XL pipeline (built once per session)."""
    from i2v_daemon.models.tiny import build_tiny_i2vgen_xl

    return build_tiny_i2vgen_xl(tmp_path_factory.mktemp("tiny-i2vgen-xl"))


@pytest.fixture(scope="session")
def tiny_model(tiny_i2vgen_dir: Path) -> Iterator[VideoModel]:
    """The tiny pipeline loaded on CPU through `load_model`, shared by the tests of one session."""
    import torch

    from i2v_daemon.models.loader import load_model

    # One thread: the tiny model is no faster on two, and with two, OpenMP threads that wait for
    # each other make a job 10-50x slower whenever another process is busy on the same cores.
    torch.set_num_threads(1)
    model = load_model(str(tiny_i2vgen_dir), device="cpu", dtype="float32")
    yield model
    model.close()
