"""`i2v-daemon plan`: will this model fit this card at this size, and how — without a GPU and without weights.

A model folder that holds only `model_index.json` and each component's `config.json` is enough:
ask before downloading 60 GB. The numbers come from models/planner.py (the pipeline built on the
meta device, one denoising step and the decode replayed on meta tensors at the job's size).
Exit 0 when a placement fits, 1 when none does, 78 for a question it cannot answer.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from i2v_daemon.errors import ConfigError, InputError
from i2v_daemon.logs import terminal_json, terminal_safe

if TYPE_CHECKING:
    from i2v_daemon.models.planner import Plan
    from i2v_daemon.settings import Settings

EX_OK, EX_FAILED = 0, 1
GIB = 2**30

#: What each placement costs, in words, for the text output.
COST = {
    "gpu": "everything on the GPU",
    "encoders_offloaded": "text/image encoders visit the GPU once per job",
    "model_offload": "one component on the GPU at a time",
    "group_offload": "the denoiser's blocks stream through the GPU",
    "group_offload_leaf": "single layers stream through the GPU (slowest)",
}


def add_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plan", parents=[common],
                       help="will a model fit a card at a size, and how (no GPU, no weights needed)")
    p.add_argument("--model", metavar="NAME|FOLDER",
                   help="a name from [models], 'default', or a diffusers folder (configs alone are enough)")
    p.add_argument("--vram-gib", type=float, metavar="N",
                   help="the card's memory in GiB (default: vram_budget_gib, else the GPU this machine has)")
    p.add_argument("--preset", metavar="P", help="plan the size and frames of this preset (default default_preset)")
    p.add_argument("--width", type=int, metavar="W", help="width in pixels (with --height; overrides the preset)")
    p.add_argument("--height", type=int, metavar="H", help="height in pixels (with --width)")
    p.add_argument("--num-frames", type=int, metavar="F", help="frames (overrides the preset)")
    p.add_argument("--json", action="store_true", help="one JSON object with every number")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from i2v_daemon.models import planner
    from i2v_daemon.models.holder import resolve_accelerate

    if (args.width is None) != (args.height is None):
        raise ConfigError("plan: give --width and --height together (or neither, to plan from the preset)")
    presets = settings.all_presets()
    preset_name = args.preset or settings.default_preset
    if preset_name not in presets:
        raise ConfigError(f"plan: --preset {preset_name!r} is not a preset (known: {', '.join(sorted(presets))})")
    preset = presets[preset_name]
    model = _model(settings, args.model)
    budget = _budget(settings, args.vram_gib)
    weights = str(getattr(settings, "weights", "auto") or "auto")
    try:
        result = planner.plan(
            model, budget_bytes=budget, num_frames=args.num_frames or preset.num_frames,
            resolution=preset.resolution, width=args.width, height=args.height,
            ladder=list(settings.resolution_ladder), dtype=settings.dtype, weights=weights,
            allow_fp8_fallback=bool(getattr(settings, "allow_fp8_fallback", False)),
            # planned for a GPU, as the daemon runs there; the fast path takes only the dtype's own weights
            autotune=resolve_accelerate(settings.accelerate, "cuda") and weights == "auto",
        )
    except InputError as err:  # a size or length the model never makes: what a job would be refused with
        raise ConfigError(f"plan: {err}") from err
    if args.json:
        print(terminal_json({**result.as_dict(), "preset": preset_name}))
    else:
        for line in render(result, preset_name).splitlines():
            print(terminal_safe(line))
    return EX_OK if result.chosen is not None else EX_FAILED


def _model(settings: Settings, name: str | None) -> str:
    choices = settings.model_choices()
    return str(choices.get(name or "default", name))


def _budget(settings: Settings, vram_gib: float | None) -> int:
    if vram_gib is not None:
        if not 0 < vram_gib <= 4096:
            raise ConfigError(f"plan: --vram-gib {vram_gib:g} is out of range: use a card's memory in GiB, e.g. 24")
        return int(vram_gib * GIB)
    if settings.vram_budget_gib:
        return int(settings.vram_budget_gib * GIB)
    from i2v_daemon.models.gpu import gpu_budget_bytes, is_cuda

    device = settings.device if str(settings.device).startswith("cuda") else "cuda"
    if is_cuda(device):
        return gpu_budget_bytes(device, None)
    raise ConfigError("plan: no GPU here and no vram_budget_gib set; say which card to plan for with --vram-gib N")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def render(plan: Plan, preset: str) -> str:
    lines = [
        f"model     {plan.model} ({plan.family}, {plan.dtype})",
        f"card      {_gib(plan.budget_bytes)}, {_gib(plan.limit_bytes)} usable ({plan.margin:.0%} kept free)",
        f"job       {plan.width}x{plan.height}, {plan.num_frames} frames (preset {preset})",
        "",
        "weights",
    ]
    for name, part in plan.components.items():
        lines.append(f"  {name:<15} {part.class_name:<34} {part.params / 1e9:6.2f} B  {_gib(part.bytes):>9}  "
                     f"{part.dtype}")
    total = sum(c.bytes for c in plan.components.values())
    lines.append(f"  {'total':<15} {'':<34} {'':>8}  {_gib(total):>9}")
    lines += [
        f"activations  one denoising step {_gib(plan.costs.denoise)}, decode {_gib(plan.costs.decode)}"
        + (f", each with up to {_gib(plan.costs.workspace)} of cuDNN autotuning workspace" if plan.costs.workspace
           else ""),
        "",
        "placement                  predicted peak  fits",
    ]
    for p in plan.predictions:
        mark = "yes" if p.fits else "no"
        lines.append(f"  {p.name:<24} {_gib(p.peak_bytes):>14}  {mark:<4} {COST[p.placement]}")
    lines.append("")
    if plan.chosen is None:
        lines.append(f"nothing fits {_gib(plan.limit_bytes)}: ask for fewer frames or a smaller size"
                     + ("" if any(p.fp8 for p in plan.predictions) else
                        ", or allow fp8 weights (weights = \"fp8\", or allow_fp8_fallback = true)"))
    else:
        c = plan.chosen
        host = f"; {_gib(c.host_bytes)} of weights on the host" if c.host_bytes else ""
        lines.append(f"chosen: {c.name} (predicted peak {_gib(c.peak_bytes)}{host})")
    if plan.smaller:
        steps = ", ".join(f"{s['width']}x{s['height']} ({s['chosen']['placement'] if s['chosen'] else 'none fits'})"
                          for s in plan.smaller)
        lines.append(f"sizes a job steps down to if a try still runs out of memory: {steps}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def fits_line(plan: Plan) -> str:
    """One line for doctor: the chosen placement and its peak, or that nothing fits."""
    if plan.chosen is None:
        return f"{plan.width}x{plan.height}x{plan.num_frames}: nothing fits {_gib(plan.limit_bytes)}"
    return (f"{plan.width}x{plan.height}x{plan.num_frames}: {plan.chosen.name}, predicted peak "
            f"{_gib(plan.chosen.peak_bytes)} of {_gib(plan.limit_bytes)}")


__all__ = ["add_command", "fits_line", "render", "run"]
