"""Turning one stem's files (an image, its sidecar) into a `JobRequest`, or a rejection that says why."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from i2v_daemon.choices import check_choices
from i2v_daemon.errors import InputError
from i2v_daemon.images import inspect_image
from i2v_daemon.jobs import JobRequest, Params
from i2v_daemon.settings import Settings
from i2v_daemon.sidecar import parse_sidecar


def intake_key(inbox: Path, files: list[Path]) -> str:
    """Identifies these exact file instances: the same files seen twice, from any host, give the same key.

    Several hosts may scan one shared inbox, and each must compute the same key for the same file,
    or two of them would each queue it. So the key holds only what every NFS/SMB client sees alike:
    the name, size, mtime (ns) and inode number (NFS reports the server's fileid; SMB the server's
    unique id, unless mounted with `noserverino`). Not `st_dev`, which every client numbers on its
    own, nor the inbox's path, which may be mounted elsewhere on each host. The inode is what tells
    a second drop of identical bytes (a new file, a new inode) from the same file seen again.
    `inbox` is kept in the signature for callers; all one inbox's files share it anyway.
    """
    h = hashlib.sha256(b"i2v-intake-v2")
    for f in sorted(files, key=lambda p: p.name):
        st = os.lstat(f)
        h.update(f"|{f.name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode())
    return h.hexdigest()


def build_request(
    stem: str, images: list[Path], sidecars: list[Path], settings: Settings, key: str
) -> JobRequest:
    """Validate and merge; any problem becomes a rejected request (its files still travel with it)."""
    inputs = tuple(p.name for p in sorted(images) + sorted(sidecars))
    try:
        return _valid_request(stem, images, sidecars, settings, key, inputs)
    except InputError as err:
        return JobRequest(name=stem, inputs=inputs, intake_key=key, rejection=err.as_dict())


def _valid_request(
    stem: str, images: list[Path], sidecars: list[Path], settings: Settings, key: str, inputs: tuple[str, ...]
) -> JobRequest:
    if len(images) > 1:
        names = ", ".join(sorted(p.name for p in images))
        raise InputError(f"{names}: several images share the name {stem!r}; keep one, or rename the others")
    if len(sidecars) > 1:
        names = ", ".join(sorted(p.name for p in sidecars))
        raise InputError(
            f"{names}: more than one sidecar for {images[0].name}; keep exactly one of .txt, .json or .toml"
        )
    info = inspect_image(images[0], max_pixels=settings.max_image_pixels)
    notes = list(info.notes)
    if sidecars:
        side = parse_sidecar(sidecars[0], max_bytes=settings.max_sidecar_bytes)
        prompt, values = side.prompt, dict(side.values)
        notes.extend(side.notes)
    else:
        prompt, values = "", {}
        notes.append(
            f"no sidecar arrived within {settings.sidecar_wait_seconds:g} s: "
            f"running with the {settings.default_preset!r} preset and an empty prompt"
        )
    presets = settings.all_presets()
    preset_name = values.pop("preset", None) or settings.default_preset
    if preset_name not in presets:
        raise InputError(
            f"{sidecars[0].name}: unknown preset {preset_name!r}; use one of {', '.join(sorted(presets))}"
        )
    preset = presets[preset_name]
    params = Params(
        preset=preset_name,
        resolution=values.get("resolution", preset.resolution),
        num_frames=values.get("num_frames", preset.num_frames),
        steps=values.get("steps", preset.steps),
        guidance_scale=float(values.get("guidance_scale", preset.guidance_scale)),
        fps=values.get("fps", preset.fps),
        width=values.get("width"),
        height=values.get("height"),
        seed=values.get("seed"),
        model=values.get("model"),
        motion=values.get("motion"),
        lora=values.get("lora"),
        lora_scale=values.get("lora_scale"),
    )
    if sidecars:
        check_choices(values, settings, sidecars[0].name)  # a model the config allows, a LoRA that exists
    return JobRequest(
        name=stem,
        inputs=inputs,
        intake_key=key,
        prompt=prompt,
        negative_prompt=values.get("negative_prompt", ""),
        params=params,
        priority=values.get("priority", 0),
        notes=tuple(notes),
    )
