"""docs/models.md's "Which family for which card" table, from `i2v-daemon plan`'s numbers (predicted, not measured).

Every released model in tests/data/model_configs (configs only, no weights) at its model card's size,
planned for 16, 24 and 80 GiB cards with the default 10% margin, exact weights (no fp8), and cuDNN's
autotuning workspace cap counted as the daemon runs on a GPU (`accelerate = "auto"`):

    python bench/plan_table.py        # a minute or two on a CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from i2v_daemon.models import planner  # noqa: E402

GIB = 2**30
MODELS = {  # folder -> (label, width, height, frames) as the model card makes them
    "i2vgen-xl": ("I2VGen-XL", 1280, 704, 16),
    "svd-xt": ("SVD-XT", 1024, 576, 25),
    "ltx-video": ("LTX-Video 0.9.5 (2B)", 768, 512, 121),
    "cogvideox-5b-i2v": ("CogVideoX-5b-I2V", 720, 480, 49),
    "wan2.1-i2v-14b-480p": ("Wan 2.1 I2V 14B 480P", 832, 480, 81),
    "wan2.2-i2v-a14b": ("Wan 2.2 I2V A14B", 1280, 720, 81),
    "skyreels-v2-i2v-14b-540p": ("SkyReels-V2 I2V 14B 540P", 960, 544, 97),
    "hunyuanvideo-i2v": ("HunyuanVideo-I2V", 1280, 720, 129),
    "ltx-2": ("LTX-2 (19B)", 768, 512, 121),
    "hunyuanvideo-1.5-i2v": ("HunyuanVideo 1.5 I2V 480p", 848, 480, 121),
}
CARDS = (16, 24, 80)


def main() -> int:
    print("| model | size | weights | " + " | ".join(f"{c} GiB card" for c in CARDS) + " |")
    print("|---|---|---|" + "---|" * len(CARDS))
    for folder, (label, w, h, f) in MODELS.items():
        cells = []
        weights = None
        for card in CARDS:
            plan = planner.plan(str(ROOT / "tests" / "data" / "model_configs" / folder), budget_bytes=card * GIB,
                                width=w, height=h, num_frames=f, autotune=True)
            weights = sum(c.bytes for c in plan.components.values())
            c = plan.chosen
            cells.append(f"{c.placement} ({c.peak_bytes / GIB:.1f})" if c else "does not fit")
        print(f"| {label} | {w}×{h}×{f} | {weights / GIB:.1f} GiB | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
