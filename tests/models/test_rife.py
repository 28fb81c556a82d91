"""RIFE's IFNet: its layout, what its warping and fusion compute, and loading weights only from a usable file."""

from __future__ import annotations

import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from i2v_daemon.errors import ConfigError
from i2v_daemon.models import rife
from i2v_daemon.models.rife import (
    IFNet,
    check_rife_weights,
    expected_shapes,
    interpolate_at,
    interpolate_frames,
    load_rife,
    run_rife,
    save_random_rife,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_rife(tmp_path_factory.mktemp("rife") / "ifnet.safetensors", seed=1)


@pytest.fixture(scope="module")
def model(weights: Path) -> IFNet:
    return load_rife(weights)


def frames(count: int = 4, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_the_network_has_the_layout_and_size_of_the_public_v4_25_model() -> None:
    state = IFNet().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes()
    assert sum(v.numel() for v in state.values()) == 5_723_156  # five IFBlocks of 192, 128, 96, 64, 32 channels


def test_warping_samples_each_pixel_at_itself_plus_the_flow() -> None:
    net = IFNet()
    image = torch.rand(1, 3, 16, 24, dtype=torch.float64)
    flow = torch.zeros(1, 2, 16, 24, dtype=torch.float64)
    flow[:, 0], flow[:, 1] = 3.0, -2.0  # look 3 pixels right and 2 up
    warped = net.warp(image, flow)
    torch.testing.assert_close(warped[..., 2:, :-3], image[..., :-2, 3:])
    torch.testing.assert_close(net.warp(image, flow * 0), image)  # no flow: the image itself


def test_with_no_flow_and_an_even_mask_the_frame_between_is_the_mean_of_both() -> None:
    net = IFNet().double()
    for b in range(5):  # every block's last layer silent: flows 0, mask logit 0 (weight 1/2)
        last = getattr(net, f"block{b}").lastconv[0]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    img0, img1 = torch.rand(2, 3, 64, 128, dtype=torch.float64), torch.rand(2, 3, 64, 128, dtype=torch.float64)
    with torch.inference_mode():
        mid = net(img0, img1, torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(mid, (img0 + img1) / 2)


@pytest.mark.parametrize("k", [2, 3])
def test_interpolating_keeps_every_frame_exactly_at_i_times_k_and_makes_the_rest(model: IFNet, k: int) -> None:
    source = frames()
    calls: list[tuple[int, int]] = []
    out = interpolate_frames(model, source, k, on_progress=lambda done, total: calls.append((done, total)))
    assert out.shape == ((len(source) - 1) * k + 1, 48, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[::k], source)  # bit for bit: 48x64 went through padding to 64x64 and back
    made = np.delete(out, np.arange(0, len(out), k), axis=0)
    assert all(not any(np.array_equal(m, s) for s in source) for m in made)  # new frames, not copies
    assert calls[-1] == (len(out), len(out)) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_frames_of_one_colour_stay_that_colour_between(model: IFNet) -> None:
    # Whatever the (random) flows, warping a flat image gives the same flat image, and so does any mix.
    flat = np.full((2, 48, 64, 3), (30, 140, 220), dtype=np.uint8)
    out = interpolate_frames(model, flat, 3)
    assert np.abs(out.astype(int) - flat[0].astype(int)).max() <= 1


def test_any_time_between_frames_can_be_asked_for(model: IFNet) -> None:
    out = interpolate_at(model, frames(3), [Fraction(0), Fraction(2, 5), Fraction(1), Fraction(9, 5)])
    assert out.shape == (4, 48, 64, 3)
    assert np.array_equal(out[2], frames(3)[1])


def test_a_half_precision_model_as_run_on_a_gpu_makes_nearly_the_same_frames(weights: Path) -> None:
    source = frames(2)
    full = interpolate_frames(load_rife(weights, "cpu", torch.float32), source, 3)
    half = interpolate_frames(load_rife(weights, "cpu", torch.float16), source, 3)
    assert np.array_equal(half[::3], source)
    assert np.abs(half.astype(int) - full.astype(int)).mean() < 1.0


def test_run_rife_loads_interpolates_and_reports_no_vram_on_the_cpu(weights: Path) -> None:
    out, peak = run_rife(frames(2), [Fraction(0), Fraction(1, 2), Fraction(1)], weights, "cpu")
    assert out.shape == (3, 48, 64, 3) and peak is None


# ---- weights files ------------------------------------------------------------------------------


def test_saved_random_weights_load_back_exactly(weights: Path) -> None:
    torch.manual_seed(1)
    original = IFNet().state_dict()
    loaded = load_rife(weights).state_dict()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    assert check_rife_weights(weights) is None


def test_a_torch_save_file_with_data_parallel_names_loads_too(tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in IFNet().state_dict().items()}
    path = tmp_path / "flownet.pkl"
    torch.save(state, path)
    assert check_rife_weights(path) is None
    assert torch.equal(load_rife(path).state_dict()["block0.conv0.0.0.weight"], state["module.block0.conv0.0.0.weight"])


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"encode.cnn0.weight": Payload()}, protocol=2))
    with pytest.raises(ConfigError, match=r"rife_model .* cannot be read"):
        load_rife(path)
    assert not marker.exists()


def unusable(kind: str, folder: Path) -> Path | None:
    """A rife_model setting that cannot work, of the given kind."""
    if kind == "unset":
        return None
    path = folder / {"unknown format": "w.bin", "other tensors": "o.safetensors"}.get(kind, "w.safetensors")
    if kind == "unknown format":
        path.write_bytes(b"x" * 64)
    elif kind == "garbage":
        path.write_bytes(b"not a weights file at all")
    elif kind == "other tensors":
        save_file({"x": torch.zeros(3)}, str(path))
    elif kind == "other version":
        state = dict(IFNet().state_dict())
        state["block0.conv0.0.0.weight"] = torch.zeros(48, 23, 3, 3)  # v4.6's first block: 7+16 inputs
        save_file(state, str(path))
    return path  # "missing": never written


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("unset", "rife_model is not set"),
        ("missing", "does not exist"),
        ("unknown format", "unknown weights format"),
        ("garbage", "cannot be read"),
        ("other tensors", "holds no RIFE IFNet weights"),
        ("other version", "another RIFE version"),
    ],
)
def test_unusable_weights_are_refused_with_a_message_naming_rife_model(tmp_path: Path, kind: str, words: str) -> None:
    path = unusable(kind, tmp_path)
    problem = check_rife_weights(path)
    assert problem is not None and "rife_model" in problem and words in problem
    with pytest.raises(ConfigError, match="rife_model") as err:
        load_rife(path)
    assert words in str(err.value)


def test_a_weights_file_cut_short_is_caught_from_its_header_alone(weights: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:100_000])
    problem = check_rife_weights(cut)
    assert problem is not None and "truncated" in problem and "rife_model" in problem


def test_the_header_check_needs_no_tensor_loaded(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no(*args: object, **kwargs: object) -> None:
        raise AssertionError("check_rife_weights loaded tensors")

    monkeypatch.setattr(rife, "_read_state", no)
    assert check_rife_weights(weights) is None
