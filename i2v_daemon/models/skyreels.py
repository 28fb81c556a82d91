"""SkyReels-V2 image-to-video behind the `VideoModel` protocol: Wan 2.1's architecture, made for 24 fps."""

from __future__ import annotations

from typing import Any, ClassVar

from i2v_daemon.models.wan import WanModel


class SkyReelsV2Model(WanModel):
    """`SkyReelsV2ImageToVideoPipeline` (Skywork/SkyReels-V2-I2V-1.3B/14B-540P, 14B-720P).

    The pipeline is Wan 2.1's image-to-video one with SkyReels' transformer: the same VAE (8× in space,
    4× in time, so 4k+1 frames on a 16-pixel grid), umT5 prompts of 512 tokens and CLIP image tokens; the
    denoiser forward, the decode and the prompt cleaning are Wan's (wan.py).
    """

    family = "skyreels-v2"
    pipeline_class = "SkyReelsV2ImageToVideoPipeline"
    pipeline_size_multiple = 16  # its check_inputs
    # As the pipeline's example loads it: the VAE in float32, the rest in bf16.
    float32_components: ClassVar[tuple[str, ...]] = ("vae",)

    def _limits(self) -> dict[str, Any]:
        # Trained on 24 fps video (the model cards: 97 frames at 544×960 are 4 s); the I2V transformer is
        # not told the frame rate (inject_sample_info is off in the released configs).
        return {**super()._limits(), "native_fps": 24}
