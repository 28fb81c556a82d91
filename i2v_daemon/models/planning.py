"""Sizes and frame counts a family can make, planned from a request: pure functions, shared by every adapter.

A value the model cannot take is moved to the nearest one it can, with a note for the manifest;
a request that could only be met by something a person would not expect (a different explicit
size, frames cut off) is refused with an `InputError` that says what to ask for instead.
"""

from __future__ import annotations

import math

from i2v_daemon.errors import InputError
from i2v_daemon.models.base import FramePlan, SizePlan

#: Widest video shape planned from `resolution`: the released models' own defaults are at most
#: about 1.8:1 (1280×704, 1024×576, 832×480), and much wider shapes are far from what they have seen.
MAX_ASPECT = 2.0


def plan_size(
    image_size: tuple[int, int],
    resolution: int,
    width: int | None,
    height: int | None,
    multiple: int,
) -> SizePlan:
    """Round an explicit size, or derive one from `resolution` and the image's aspect ratio."""
    image_w, image_h = image_size
    if image_w <= 0 or image_h <= 0:
        raise ValueError(f"image size {image_size} must be positive")
    notes: list[str] = []
    if width is not None and height is not None:
        out_w = _round_to(width, multiple, "width", notes)
        out_h = _round_to(height, multiple, "height", notes)
        if not math.isclose(out_w / out_h, image_w / image_h, rel_tol=0.01):
            notes.append(f"the image ({image_w}×{image_h}) will be center-cropped to fit {out_w}×{out_h}")
        return SizePlan(out_w, out_h, tuple(notes))
    short = _round_to(resolution, multiple, "resolution", notes)
    aspect = max(image_w, image_h) / min(image_w, image_h)
    if aspect > MAX_ASPECT:
        notes.append(
            f"the image's aspect ratio {aspect:.2f}:1 is wider than this model's {MAX_ASPECT:g}:1 limit; "
            f"it will be center-cropped to {MAX_ASPECT:g}:1"
        )
        aspect = MAX_ASPECT
    long = nearest_multiple(short * aspect, multiple)
    out_w, out_h = (long, short) if image_w >= image_h else (short, long)
    return SizePlan(out_w, out_h, tuple(notes))


def plan_fixed_size(
    image_size: tuple[int, int],
    resolution: int,
    width: int | None,
    height: int | None,
    fixed: tuple[int, int],
    family: str,
    why: str,
) -> SizePlan:
    """A model that makes one size only: `resolution` gives way with a note, a different explicit size is refused."""
    fixed_w, fixed_h = fixed
    if width is not None and height is not None and (width, height) != fixed:
        raise InputError(
            f"{family} makes only {fixed_w}×{fixed_h} videos ({why}), not {width}×{height}; "
            f"remove 'width' and 'height', set them to {fixed_w} and {fixed_h}, or choose another model"
        )
    notes = []
    if width is None and resolution != min(fixed):
        notes.append(f"{family} makes only {fixed_w}×{fixed_h} videos ({why}); resolution {resolution} was not used")
    image_w, image_h = image_size
    if not math.isclose(fixed_w / fixed_h, image_w / image_h, rel_tol=0.01):
        notes.append(f"the image ({image_w}×{image_h}) will be center-cropped to fit {fixed_w}×{fixed_h}")
    return SizePlan(fixed_w, fixed_h, tuple(notes))


def plan_frames(num_frames: int, family: str, step: int = 1, minimum: int = 1, maximum: int | None = None) -> FramePlan:
    """The valid count (1 + step·k, at least `minimum`) nearest to `num_frames`; more than `maximum` is refused."""
    if maximum is not None and num_frames > maximum:
        raise InputError(
            f"num_frames {num_frames} is more than {family} can make (at most {maximum}); "
            f"ask for {maximum} or fewer, or choose another model"
        )
    planned = 1 + nearest_multiple(num_frames - 1, step, at_least=0) if step > 1 else num_frames
    planned = max(planned, minimum)
    if planned == num_frames:
        return FramePlan(num_frames)
    rule = f"1 + a multiple of {step} frames" if step > 1 else "any number of frames"
    return FramePlan(planned, (f"num_frames {num_frames} rounded to {planned} ({family} makes {rule}, "
                               f"at least {minimum})",))


def nearest_multiple(value: float, multiple: int, at_least: int | None = None) -> int:
    """The multiple of `multiple` nearest to `value` (halves round up), never less than `at_least` (one multiple)."""
    floor = multiple if at_least is None else at_least
    return max(floor, math.floor(value / multiple + 0.5) * multiple)


def _round_to(value: int, multiple: int, name: str, notes: list[str]) -> int:
    """`value` rounded to the nearest multiple (at least one), noting any change."""
    rounded = nearest_multiple(value, multiple)
    if rounded != value:
        notes.append(f"{name} {value} rounded to {rounded} (the model needs multiples of {multiple})")
    return rounded
