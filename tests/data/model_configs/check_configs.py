"""Instantiate every model component of the config-only folders on the meta device.

Usage (from the repository root):

    .venv/bin/python tests/data/model_configs/check_configs.py            # every folder
    .venv/bin/python tests/data/model_configs/check_configs.py svd-xt     # named folders only
    .venv/bin/python tests/data/model_configs/check_configs.py --markdown # table for SOURCES.md

No weights are read and no memory is allocated: each component is built under
``torch.device("meta")`` from its ``config.json`` alone, its parameters are counted,
and it is dropped before the next one is built.  Components whose subfolder has
no ``config.json`` (schedulers, tokenizers, processors) are skipped.
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1024**3


def folders(names: list[str]) -> list[Path]:
    if names:
        return [HERE / n for n in names]
    return sorted(p.parent for p in HERE.glob("*/model_index.json"))


def components(folder: Path) -> list[tuple[str, str, str]]:
    index = json.loads((folder / "model_index.json").read_text())
    out = []
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, cls = value
        if library is None or not (folder / name / "config.json").is_file():
            continue
        out.append((name, library, cls))
    return out


def build(folder: Path, name: str, library: str, cls_name: str):
    import torch

    sub = folder / name
    with torch.device("meta"):
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, cls_name)
            return cls.from_config(cls.load_config(sub))
        if library == "transformers":
            import transformers

            cfg = transformers.AutoConfig.from_pretrained(sub)
            cls = getattr(transformers, cls_name)
            return cls._from_config(cfg)
        # model_index.json names pipeline-local modules by their pipeline package,
        # e.g. ["ltx2", "LTX2TextConnectors"] -> diffusers.pipelines.ltx2
        module = importlib.import_module(f"diffusers.pipelines.{library}")
        cls = getattr(module, cls_name)
        return cls.from_config(cls.load_config(sub))


def main(argv: list[str]) -> int:
    markdown = "--markdown" in argv
    names = [a for a in argv if not a.startswith("--")]
    rows = []
    failed = False
    for folder in folders(names):
        total = 0
        for name, library, cls_name in components(folder):
            start = time.monotonic()
            try:
                model = build(folder, name, library, cls_name)
            except Exception as exc:  # report every folder, then fail
                failed = True
                print(f"FAIL {folder.name}/{name} ({cls_name}): {type(exc).__name__}: {exc}", flush=True)
                continue
            params = sum(p.numel() for p in model.parameters())
            del model
            gc.collect()
            total += params
            rows.append((folder.name, name, cls_name, params, time.monotonic() - start))
            if not markdown:
                print(
                    f"{folder.name:28s} {name:15s} {cls_name:34s} {params / 1e9:8.3f} B"
                    f"  {params * 2 / GIB:7.2f} GiB bf16",
                    flush=True,
                )
        rows.append((folder.name, "TOTAL", "", total, 0.0))
        if not markdown:
            print(f"{folder.name:28s} {'TOTAL':15s} {'':34s} {total / 1e9:8.3f} B  {total * 2 / GIB:7.2f} GiB bf16")
    if markdown:
        print("| folder | component | class | params (B) | bf16 weights (GiB) |")
        print("|---|---|---|---:|---:|")
        for folder_name, name, cls_name, params, _ in rows:
            print(f"| {folder_name} | {name} | {cls_name} | {params / 1e9:.3f} | {params * 2 / GIB:.2f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
