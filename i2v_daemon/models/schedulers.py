"""A job's `scheduler` key: which denoising schedulers each family can swap in, built from its own config.

`default` is the scheduler the model was released with (DDIM for I2VGen-XL). The others are
opt-in trade-offs (INTERFACE.md §8): `dpm++` (DPM-Solver++ multistep, second order) reaches the
same look in 20–25 steps where DDIM needs 50, but its frames are not DDIM's. A family only
offers what its own noise schedule supports; anything else is refused before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from i2v_daemon.errors import InputError

#: diffusers scheduler class -> the name a job and the manifest use for it.
NAMES: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "CogVideoXDDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpm++",
    "CogVideoXDPMScheduler": "dpm++",
    "EulerDiscreteScheduler": "euler",
    "UniPCMultistepScheduler": "unipc",
    "FlowMatchEulerDiscreteScheduler": "flow-match-euler",
}


def name_of(scheduler: Any) -> str:
    """Our name for a scheduler instance (its class name when we have none)."""
    cls = type(scheduler).__name__
    return NAMES.get(cls, cls)


def _dpmpp_from_ddim(default: Any) -> Any:
    """DPM-Solver++ (2nd order) on I2VGen-XL's own schedule: v-prediction, zero terminal SNR."""
    from diffusers import DPMSolverMultistepScheduler

    # "trailing" spacing starts at the last training step, where zero-SNR v-prediction is defined;
    # diffusers recommends it for rescaled schedules (DDIM's "leading" would skip the noisiest step).
    return DPMSolverMultistepScheduler.from_config(
        default.config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
    )


def _ddim_from_dpmpp(default: Any) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(default.config)


def _cogvideox_dpm(default: Any) -> Any:
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler.from_config(default.config)


def _cogvideox_ddim(default: Any) -> Any:
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler.from_config(default.config)


def _dpmpp_flow(default: Any) -> Any:
    """DPM-Solver++ on Wan's flow-matching sigmas (its config carries use_flow_sigmas and flow_shift)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(default.config, algorithm_type="dpmsolver++", solver_order=2)


#: family -> {name: build it from the model's own scheduler}. Names equal to the loaded one need no build.
ALTERNATIVES: dict[str, dict[str, Callable[[Any], Any]]] = {
    "i2vgen-xl": {"ddim": _ddim_from_dpmpp, "dpm++": _dpmpp_from_ddim},
    "cogvideox": {"ddim": _cogvideox_ddim, "dpm++": _cogvideox_dpm},
    "wan": {"dpm++": _dpmpp_flow},
    "skyreels-v2": {"dpm++": _dpmpp_flow},  # Wan's scheduler and sigmas
}


def offered(family: str, loaded: str) -> tuple[str, ...]:
    """The names a job may ask for on this family, besides "default" (the loaded one included)."""
    return tuple(sorted({loaded, *ALTERNATIVES.get(family, {})}))


def check(family: str, loaded: str, requested: str | None) -> str:
    """The name that will run for `requested` (None / "default": the loaded one); InputError if not offered."""
    if requested in (None, "", "default"):
        return loaded
    names = offered(family, loaded)
    if requested not in names:
        raise InputError(
            f"scheduler {requested!r} is not available for {family} (it offers {', '.join(names)}); "
            "remove 'scheduler' or set it to 'default'"
        )
    return requested


def build(family: str, default: Any, name: str) -> Any:
    """A scheduler called `name` for this family, made from the model's own `default` scheduler's config."""
    if name == name_of(default):
        return default
    return ALTERNATIVES[family][name](default)
