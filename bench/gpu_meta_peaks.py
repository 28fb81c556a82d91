"""Peak activation memory of the full-size I2VGen-XL UNet step and VAE decode, replayed on PyTorch's meta device.

No GPU and no weights: every operator runs on "meta" tensors (shapes only) under a dispatch mode
that adds up the bytes of the storages alive at each moment, as the caching allocator would hold
them. memory.py's DECODE_BYTES_PER_PIXEL comes from here; the UNet line checks the method against
the H200 measurements in shared/anchors (0.616 GiB per million pixel-frames above the weights).

    python bench/gpu_meta_peaks.py            # prints both, a second or two on a CPU
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from i2v_daemon.models.sizing import LivePeak

GIB = 2**30


def main() -> int:
    from diffusers import AutoencoderKL, I2VGenXLUNet

    dtype = torch.float16
    side, frames = 512, 16
    vae: Any
    unet: Any
    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=768,
        )
        unet = I2VGenXLUNet(sample_size=32)
    vae, unet = vae.to(dtype), unet.to(dtype)
    for chunk in (1, 4):
        latents = torch.randn(chunk, 4, side // 8, side // 8, device="meta", dtype=dtype)
        with torch.inference_mode(), LivePeak() as peak:
            vae.decode(latents)
        print(f"VAE decode {side}² × {chunk} frame(s): {peak.peak / GIB:.3f} GiB, "
              f"{peak.peak / (chunk * side * side):.0f} bytes per decoded pixel")
    sample = torch.randn(2, 4, frames, side // 8, side // 8, device="meta", dtype=dtype)  # guidance: batch 2
    with torch.inference_mode(), LivePeak() as peak:
        unet(sample, torch.tensor(500, device="meta"), encoder_hidden_states=torch.randn(2, 77, 1024, device="meta",
             dtype=dtype), fps=torch.tensor([8, 8], device="meta"), image_latents=sample.clone(),
             image_embeddings=torch.randn(2, 1, 1024, device="meta", dtype=dtype))
    per = peak.peak / GIB / (side * side * frames / 1e6)
    print(f"UNet step {side}² × {frames}: {peak.peak / GIB:.3f} GiB, {per:.3f} GiB per million pixel-frames "
          "(measured on the H200: 0.616)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
