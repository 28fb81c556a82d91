"""`i2v-daemon validate PATH…`: check sidecars and images exactly as intake would, without queueing them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from i2v_daemon.errors import InputError
from i2v_daemon.logs import terminal_safe

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings

EX_OK, EX_FAILED = 0, 1


def check_path(settings: Settings, path: Path) -> tuple[str, ...]:
    """Notes on a good file; InputError saying what to fix on a bad one."""
    from i2v_daemon.intake.choices import check_choices
    from i2v_daemon.intake.images import IMAGE_SUFFIXES, inspect_image
    from i2v_daemon.intake.sidecar import SIDECAR_SUFFIXES, parse_sidecar
    from i2v_daemon.params import merge

    suffix = path.suffix.lower()
    if suffix in SIDECAR_SUFFIXES:
        side = parse_sidecar(path, max_bytes=settings.max_sidecar_bytes)
        # The folder it sits in may be a preset's (inbox/fast/), which is then its default preset.
        folder = path.parent.name if path.parent.name in settings.all_presets() else None
        params = merge(side.values, presets=settings.all_presets(), default_preset=folder or settings.default_preset,
                       defaults=settings.job_defaults(), rife_model=settings.rife_model, where=path.name)
        check_choices({**side.values, "lora": params.lora}, settings, path.name)  # model allowed, LoRA file present
        return side.notes
    if suffix in IMAGE_SUFFIXES:
        info = inspect_image(path, max_pixels=settings.max_image_pixels)
        return (f"{info.format} {info.width}x{info.height}", *info.notes)
    if suffix in (".csv", ".jsonl"):
        return _check_batch(settings, path)
    raise InputError(f"{path.name}: not an image (.png .jpg .jpeg .webp), a sidecar (.txt .json .toml) or a batch "
                     "manifest (.csv .jsonl)")


def _check_batch(settings: Settings, path: Path) -> tuple[str, ...]:
    """A batch manifest's rows, checked as intake would check them (its images read where they are, never moved)."""
    from i2v_daemon.intake.batch import read_batch

    folder = path.parent.name if path.parent.name in settings.all_presets() else ""
    batch = read_batch(path, settings, folder=folder, inbox=settings.filled("inbox_dir"))
    if batch.error:
        raise InputError(batch.error)
    bad = [row.request.rejection["message"] for row in batch.rows if row.request.rejection]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise InputError(f"{len(bad)} of {len(batch.rows)} rows would fail: {'; '.join(bad[:3])}{more}")
    return (f"{len(batch.rows)} rows, each a valid job",)


def group_errors(paths: list[Path]) -> dict[Path, str]:
    """What intake would refuse about files named together (one folder, one stem), per file."""
    from i2v_daemon.intake.images import IMAGE_SUFFIXES
    from i2v_daemon.intake.sidecar import SIDECAR_SUFFIXES
    from i2v_daemon.intake.staging import group_problem

    groups: dict[tuple[Path, str], list[Path]] = {}
    for p in dict.fromkeys(paths):
        groups.setdefault((p.parent, p.stem), []).append(p)
    out: dict[Path, str] = {}
    for (_, stem), members in groups.items():
        problem = group_problem(
            stem, [p.name for p in members if p.suffix.lower() in IMAGE_SUFFIXES],
            [p.name for p in members if p.suffix.lower() in SIDECAR_SUFFIXES],
        )
        if problem:
            out.update({p: problem for p in members})
    return out


def files_in(paths: list[str]) -> list[str]:
    """The paths, a folder replaced by the files directly in it that intake would take (an empty one stays)."""
    from i2v_daemon.intake.inbox import is_ignored_name

    out: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not path.is_symlink():
            inside = sorted(str(p) for p in path.iterdir() if not is_ignored_name(p.name) and not p.is_dir())
            out += inside or [raw]
        else:
            out.append(raw)
    return out


def validate(settings: Settings, paths: list[str]) -> int:
    bad = 0
    paths = files_in(paths)
    together = group_errors([Path(raw) for raw in paths])
    for raw in paths:
        path = Path(raw)
        try:
            if not path.exists() and not path.is_symlink():
                raise InputError(f"{raw}: no such file")
            if path.is_dir():
                raise InputError(f"{raw}: a folder with no file in it to check (the files directly in a folder "
                                 "are checked, as intake takes them; its subfolders are not)")
            if path in together:
                raise InputError(together[path])
            notes = check_path(settings, path)
        except InputError as err:
            bad += 1
            print(terminal_safe(f"invalid {raw}: {err}"))
            continue
        print(terminal_safe(f"ok {raw}" + (f" ({'; '.join(notes)})" if notes else "")))
    return EX_FAILED if bad else EX_OK
