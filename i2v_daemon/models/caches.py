"""Step caches (`cache`): diffusers' own cache hooks on a transformer, on for one pipeline call.

They reuse work of earlier denoising steps instead of computing it: faster, with slightly different
frames. Only transformers with diffusers' `CacheMixin` (Wan, LTX-Video, CogVideoX) take them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from i2v_daemon.errors import InputError, first_line

#: The step caches a transformer with `enable_cache` takes, by their `cache` names.
CACHES = ("first-block", "pab")
#: First Block Cache skips the other blocks while the first block's residual changed by less than this
#: share since the last full step: diffusers' default.
FIRST_BLOCK_THRESHOLD = 0.05
#: Pyramid Attention Broadcast recomputes spatial attention every this many steps, between these
#: timesteps (of 1000), and reuses it in between: diffusers' documented example.
PAB_SKIP_RANGE, PAB_TIMESTEPS = 2, (100, 800)


@contextmanager
def step_cache(denoisers: Sequence[Any], name: str | None, pipeline: Any, family: str) -> Iterator[None]:
    """Cache `name` on every denoiser (both Wan 2.2 experts) for one call; they run plain again afterwards."""
    if name in (None, "off"):
        yield
        return
    enabled: list[Any] = []
    try:
        for module in denoisers:
            try:
                module.enable_cache(_config(name, pipeline))
            except (ValueError, IndexError) as err:  # e.g. First Block Cache on a single block
                raise InputError(
                    f"cache {name!r} cannot be used with this {family} model ({first_line(err, limit=200)}); "
                    'set cache = "off" for it'
                ) from err
            enabled.append(module)
        yield
    finally:
        for module in enabled:
            module.disable_cache()


def _config(name: str, pipeline: Any) -> Any:
    """diffusers' configuration for cache `name`, new for each denoiser (each keeps its own state)."""
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    if name == "first-block":
        return FirstBlockCacheConfig(threshold=FIRST_BLOCK_THRESHOLD)
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=PAB_SKIP_RANGE, spatial_attention_timestep_skip_range=PAB_TIMESTEPS,
        current_timestep_callback=lambda: pipeline.current_timestep,
    )
