"""What provenance costs: C2PA signing of a job's video and poster, reading the recipe back, and `inspect`.

    .venv/bin/python bench/bench_provenance.py [--repeats N] [--json OUT]

Signs the files a job leaves in work/<id>/ (an mp4 written by the encoder with its recipe, the
poster, the input image as ingredient) at a tiny job's size (the tests' 64x96, 4 frames) and at the
`standard` preset's (512x512, 16 frames), with the self-made certificate; then times the recipe's
read (XMP, and SEI after a remux), c2pa's validation, and the whole `i2v-daemon inspect` command.
No model and no GPU: the share of a job's time comes from a tiny job's own manifest
(`provenance.seconds` over finished_at - started_at), which `tests/daemon` runs print.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from i2v_daemon.work import provenance, recipe  # noqa: E402
from i2v_daemon.work.postprocess import write_poster  # noqa: E402
from i2v_daemon.work.video import write_mp4  # noqa: E402

CASES = {"tiny 64x96x4": (4, 96, 64), "standard 512x512x16": (16, 512, 512)}


def _job_dir(root: Path, frames: int, height: int, width: int) -> tuple[Path, Path, float]:
    jdir = root / f"job-{frames}-{height}"
    (jdir / "input").mkdir(parents=True)
    image = jdir / "input" / "cat.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
    video = (rng.random((frames, height, width, 3)) * 64 + np.linspace(0, 190, width)[None, None, :, None])
    video = video.astype(np.uint8)
    made = recipe.build("cat", "a cat turns its head", "", {"seed": 1, "width": width, "height": height,
                                                           "num_frames": frames, "steps": 50, "fps": 8,
                                                           "guidance_scale": 9.0, "model": "default"},
                        model_id="ali-vilab/i2vgen-xl", input_file=image)
    t0 = time.perf_counter()
    write_mp4(video, jdir / "cat.mp4", 8, recipe=made)
    encode = time.perf_counter() - t0
    write_poster(video, jdir / "poster.jpg")
    return jdir, image, encode


def _timed(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = SimpleNamespace(data_dir=root / "data", provenance="c2pa", c2pa_cert=None, c2pa_key=None,
                                   c2pa_tsa_url=None)
        t0 = time.perf_counter()
        provenance.signer_files(settings)
        first_start = time.perf_counter() - t0
        for name, (frames, height, width) in CASES.items():
            jdir, image, encode = _job_dir(root, frames, height, width)
            unsigned = {p: p.read_bytes() for p in (jdir / "cat.mp4", jdir / "poster.jpg")}
            signer = provenance.Provenance(settings)

            def sign(jdir: Path = jdir, image: Path = image, unsigned: dict = unsigned,  # type: ignore[type-arg]
                     signer: provenance.Provenance = signer) -> None:
                for path, data in unsigned.items():
                    path.write_bytes(data)
                signer.sign_job(jdir, image)

            signs = _timed(sign, args.repeats)
            video = jdir / "cat.mp4"
            reads = _timed(lambda video=video: recipe.read(video), args.repeats)
            validates = _timed(lambda video=video: provenance.describe(video), args.repeats)
            inspects = _timed(lambda video=video: subprocess.run(
                [sys.executable, "-m", "i2v_daemon.cli", "inspect", str(video), "--json", "--data-dir",
                 str(root / "data")], capture_output=True, check=True, cwd=ROOT), max(1, args.repeats // 2))
            results[name] = {
                "encode_s": round(encode, 3), "sign_job_s": round(statistics.median(signs), 3),
                "read_recipe_s": round(statistics.median(reads), 4),
                "validate_c2pa_s": round(statistics.median(validates), 3),
                "inspect_command_s": round(statistics.median(inspects), 3),
                "video_bytes_unsigned": len(unsigned[video]), "video_bytes_signed": video.stat().st_size,
            }
        results["self-made certificate (first start)"] = {"seconds": round(first_start, 3)}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
