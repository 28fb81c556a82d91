"""RIFE's IFNet (Huang et al., "Real-Time Intermediate Flow Estimation for Video Frame Interpolation",
ECCV 2022), written for this project from the paper and the public description of the v4 network.

The layout (parameter names and shapes) is that of the public v4.25 `flownet.pkl`: five IFBlocks
estimate, coarse to fine (1/16 of the frame up to full size), the two intermediate flows F_t->0 and
F_t->1 and a fusion mask; each block refines the previous estimate from the frames backward-warped
by it; the frame at time t is the mask-weighted sum of the two warped frames. Weights come only
from a local file (the config's `rife_model`), never from the network. Importing this module
imports torch (models/ is where torch lives); `check_rife_weights` reads a .safetensors header only.
"""

from __future__ import annotations

import gc
import json
import struct
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from i2v_daemon.errors import ConfigError

#: One IFBlock per scale, coarse to fine: its width and how much it shrinks the frames first.
BLOCK_WIDTHS = (192, 128, 96, 64, 32)
SCALES = (16, 8, 4, 2, 1)
HEAD_CHANNELS = 16  # features per frame from the encoder head
CARRIED = 8  # features a block hands to the next one, besides flows and mask
BLOCK_OUTPUTS = 4 + 1 + CARRIED  # two flows (x and y each), the mask logit, the carried features
#: Frame sides must be multiples of this: the coarsest block sees 1/16 of the frame and halves it twice.
MULTIPLE = 64
#: In-between frames computed in one forward pass; bounds memory when k is large.
MAX_BATCH = 4
SUFFIXES = (".safetensors", ".pth", ".pt", ".pkl", ".ckpt")
_FIX = "set rife_model to a local RIFE v4.25 IFNet weights file (.safetensors, or .pth from torch.save)"


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, from the constants above (no torch: doctor checks files with it)."""
    h = HEAD_CHANNELS
    shapes: dict[str, tuple[int, ...]] = {
        "encode.cnn0.weight": (h, 3, 3, 3), "encode.cnn1.weight": (h, h, 3, 3),
        "encode.cnn2.weight": (h, h, 3, 3), "encode.cnn3.weight": (h, h, 4, 4),  # transposed: (in, out, …)
    }
    shapes.update({f"encode.cnn{i}.bias": (h,) for i in range(4)})
    for b, c in enumerate(BLOCK_WIDTHS):
        p = f"block{b}."
        shapes[p + "conv0.0.0.weight"] = (c // 2, _block_inputs(b), 3, 3)
        shapes[p + "conv0.0.0.bias"] = (c // 2,)
        shapes[p + "conv0.1.0.weight"] = (c, c // 2, 3, 3)
        shapes[p + "conv0.1.0.bias"] = (c,)
        for r in range(8):
            shapes[p + f"convblock.{r}.conv.weight"] = (c, c, 3, 3)
            shapes[p + f"convblock.{r}.conv.bias"] = (c,)
            shapes[p + f"convblock.{r}.beta"] = (1, c, 1, 1)
        shapes[p + "lastconv.0.weight"] = (c, 4 * BLOCK_OUTPUTS, 4, 4)
        shapes[p + "lastconv.0.bias"] = (4 * BLOCK_OUTPUTS,)
    return shapes


def _block_inputs(index: int) -> int:
    """Channels into block `index`: both frames, both head features and t; then also mask, carried, flows."""
    first = 3 + 3 + 2 * HEAD_CHANNELS + 1
    return first if index == 0 else first + 1 + CARRIED + 4


class ResConv(nn.Module):
    """A 3x3 convolution added back to its input, scaled per channel by a learned beta."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones((1, c, 1, 1)))
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) * self.beta + x)


def _conv(cin: int, cout: int) -> nn.Sequential:
    """A stride-2 3x3 convolution and its activation (halves the size)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2, True))


class IFBlock(nn.Module):
    """One scale: from (frames, warped features, previous flow) to a flow update, a mask, carried features."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(_conv(cin, c // 2), _conv(c // 2, c))
        self.convblock = nn.Sequential(*(ResConv(c) for _ in range(8)))
        # Back up 4x: a transposed convolution doubles the size, the pixel shuffle doubles it again.
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * BLOCK_OUTPUTS, 4, 2, 1), nn.PixelShuffle(2))

    def forward(
        self, x: torch.Tensor, flow: torch.Tensor | None, scale: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if scale != 1:
            x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:  # flows are in pixels: shrinking the frame shrinks them too
            small = flow if scale == 1 else F.interpolate(
                flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False
            )
            x = torch.cat((x, small / scale), 1)
        out = self.lastconv(self.convblock(self.conv0(x)))
        if scale != 1:
            out = F.interpolate(out, scale_factor=float(scale), mode="bilinear", align_corners=False)
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


class Head(nn.Module):
    """Per-frame features at full size, warped along with the frames so blocks can compare them."""

    def __init__(self) -> None:
        super().__init__()
        h = HEAD_CHANNELS
        self.cnn0 = nn.Conv2d(3, h, 3, 2, 1)
        self.cnn1 = nn.Conv2d(h, h, 3, 1, 1)
        self.cnn2 = nn.Conv2d(h, h, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(h, h, 4, 2, 1)
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.cnn0(x))
        x = self.relu(self.cnn1(x))
        x = self.relu(self.cnn2(x))
        return self.cnn3(x)


class IFNet(nn.Module):
    """The frame at time t (0..1) between img0 and img1, both (B, 3, H, W) in 0..1, H and W multiples of 64."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = Head()
        for b, c in enumerate(BLOCK_WIDTHS):
            self.add_module(f"block{b}", IFBlock(_block_inputs(b), c))
        self._grids: dict[tuple[Any, ...], torch.Tensor] = {}  # freed with the model, not kept globally

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        _, _, height, width = img0.shape
        t = timestep.reshape(-1, 1, 1, 1).to(img0.dtype).expand(img0.shape[0], 1, height, width)
        f0, f1 = self.encode(img0), self.encode(img1)
        blocks = [getattr(self, f"block{b}") for b in range(len(SCALES))]
        flow, mask, carried = blocks[0](torch.cat((img0, img1, f0, f1, t), 1), None, SCALES[0])
        warped0, warped1 = self.warp(img0, flow[:, :2]), self.warp(img1, flow[:, 2:4])
        for b in range(1, len(SCALES)):
            # Each finer block sees the frames and features as the current flows warp them, and corrects.
            wf0, wf1 = self.warp(f0, flow[:, :2]), self.warp(f1, flow[:, 2:4])
            x = torch.cat((warped0, warped1, wf0, wf1, t, mask, carried), 1)
            delta, mask, carried = blocks[b](x, flow, SCALES[b])
            flow = flow + delta
            warped0, warped1 = self.warp(img0, flow[:, :2]), self.warp(img1, flow[:, 2:4])
        weight = torch.sigmoid(mask)
        return warped0 * weight + warped1 * (1 - weight)

    def warp(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Backward warp: output pixel (x, y) samples `image` at (x + flow_x, y + flow_y), bilinearly."""
        height, width = flow.shape[2:]
        # At least float32, even for a half-precision model: in float16, -1..1 across 1280 pixels
        # would be off by up to a third of a pixel.
        work = torch.promote_types(flow.dtype, torch.float32)
        key = (flow.device, work, height, width)
        grid = self._grids.get(key)
        if grid is None:
            ys = torch.linspace(-1.0, 1.0, height, device=flow.device, dtype=work)
            xs = torch.linspace(-1.0, 1.0, width, device=flow.device, dtype=work)
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), 0)[None]  # (1, 2, H, W): x then y
            self._grids[key] = grid
        # Pixels to grid_sample's -1..1 coordinates, where -1 and 1 are the centres of the edge pixels.
        scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], device=flow.device, dtype=work)
        coords = (grid + flow.to(work) * scale.view(1, 2, 1, 1)).permute(0, 2, 3, 1)
        warped = F.grid_sample(image.to(work), coords, mode="bilinear", padding_mode="border", align_corners=True)
        return warped.to(image.dtype)


# ---- weights --------------------------------------------------------------------------------------


def save_random_rife(path: Path, seed: int = 0) -> Path:
    """Write an IFNet with random weights (PyTorch's default initialisation) as .safetensors, for tests and benches."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in IFNet().state_dict().items()}
    save_file(state, str(path))
    return Path(path)


def load_rife(path: Path | None, device: str = "cpu", dtype: torch.dtype | None = None) -> IFNet:
    """The IFNet in `path` (the config's rife_model) on `device`, ready for inference; ConfigError if unusable."""
    state = _read_state(path)
    problem = _shape_problem(path, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ConfigError(problem)
    model = IFNet()
    model.load_state_dict({k: state[k] for k in expected_shapes()})
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def check_rife_weights(path: Path | None) -> str | None:
    """For `doctor`: None when `path` holds usable IFNet weights, else what is wrong and what to do."""
    try:
        if path is not None and Path(path).suffix.lower() == ".safetensors" and Path(path).is_file():
            return _shape_problem(path, _safetensors_shapes(Path(path)))  # the header is enough
        state = _read_state(path)
    except ConfigError as err:
        return str(err)
    return _shape_problem(path, {k: tuple(v.shape) for k, v in state.items()})


def _read_state(path: Path | None) -> dict[str, torch.Tensor]:
    """The tensors in a weights file, names without DataParallel's `module.` prefix; ConfigError if unreadable."""
    if path is None:
        raise ConfigError(f"rife_model is not set: interpolation = 'rife' needs it; {_FIX}")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"rife_model {str(path)!r} does not exist or is not a file; {_FIX}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"rife_model {str(path)!r}: unknown weights format {suffix!r}; {_FIX}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:  # weights_only: a pickle from elsewhere must not run code when loaded
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors share no base class
        raise ConfigError(f"rife_model {str(path)!r} cannot be read ({type(err).__name__}: {err}); {_FIX}") from err
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConfigError(f"rife_model {str(path)!r} holds no plain tensor dictionary; {_FIX}")
    state = {str(k).removeprefix("module."): v for k, v in raw.items()}
    floats = [k for k, v in state.items() if k in expected_shapes() and not v.is_floating_point()]
    if floats:
        raise ConfigError(f"rife_model {str(path)!r}: {floats[0]} is not floating point; {_FIX}")
    return state


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a .safetensors header (8 little-endian length bytes, then JSON)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 0 < length <= min(2**26, size - 8):
                raise ValueError("not a safetensors file: implausible header length")
            header = json.loads(fh.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        # A file cut short (an interrupted copy) has a good header but not all the bytes it promises.
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        if end > size - 8 - length:
            raise ValueError(f"truncated: the header promises {end} bytes of tensors, {size - 8 - length} are there")
        floats = [k for k, v in tensors.items() if not str(v["dtype"]).startswith(("F", "BF"))]
        if floats:
            raise ValueError(f"{floats[0]} is {tensors[floats[0]]['dtype']}, not floating point")
        return {str(k).removeprefix("module."): tuple(v["shape"]) for k, v in tensors.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ConfigError(f"rife_model {str(path)!r} cannot be read ({err}); {_FIX}") from err


def _shape_problem(path: Path | None, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What keeps these tensors from being this IFNet (missing or misshapen ones), or None."""
    want = expected_shapes()
    missing = [k for k in want if k not in shapes]
    if len(missing) == len(want):
        return f"rife_model {str(path)!r} holds no RIFE IFNet weights (no encode.*/block* tensors); {_FIX}"
    if missing:
        return f"rife_model {str(path)!r} lacks {len(missing)} IFNet tensors, e.g. {missing[0]}; {_FIX}"
    for k, shape in want.items():
        if tuple(shapes[k]) != shape:
            return (f"rife_model {str(path)!r} is another RIFE version or network: {k} is {tuple(shapes[k])}, "
                    f"v4.25 needs {shape}; {_FIX}")
    return None


# ---- interpolating --------------------------------------------------------------------------------


def interpolate_frames(
    model: IFNet, frames: np.ndarray, k: int, on_progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """(F-1)*k+1 frames from F uint8 frames (F, H, W, 3): frame i kept exactly at i*k, k-1 made between each pair."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    times = [Fraction(n, k) for n in range((len(frames) - 1) * k + 1)]
    return interpolate_at(model, frames, times, on_progress)


def interpolate_at(
    model: IFNet, frames: np.ndarray, times: Sequence[Fraction],
    on_progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """One frame per time (in generated-frame units, 0..F-1): whole times copy that frame, others are made."""
    count, height, width, _ = frames.shape
    if any(not 0 <= t <= count - 1 for t in times):
        raise ValueError(f"times must lie within 0..{count - 1}")
    out = np.empty((len(times), height, width, 3), dtype=np.uint8)
    param = next(model.parameters())
    pad_h, pad_w = -height % MULTIPLE, -width % MULTIPLE

    def tensor(i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames[i])).to(param.device)
        x = x.permute(2, 0, 1)[None].to(param.dtype) / 255.0
        # Edge pixels repeated, not zeros: a black border would pull flows and the mask near the edges.
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x

    by_pair: dict[int, list[int]] = {}
    for n, t in enumerate(times):
        if t.denominator == 1:
            out[n] = frames[int(t)]
        else:
            by_pair.setdefault(int(t), []).append(n)
    done, total = len(times) - sum(len(v) for v in by_pair.values()), len(times)
    with torch.inference_mode():
        for i in sorted(by_pair):
            img0, img1 = tensor(i), tensor(i + 1)
            wanted = by_pair[i]
            for start in range(0, len(wanted), MAX_BATCH):
                chunk = wanted[start : start + MAX_BATCH]
                ts = torch.tensor([float(times[n] - i) for n in chunk], device=param.device, dtype=param.dtype)
                b = len(chunk)
                mid = model(img0.expand(b, -1, -1, -1), img1.expand(b, -1, -1, -1), ts)[:, :, :height, :width]
                pixels = (mid.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
                out[chunk] = pixels.permute(0, 2, 3, 1).cpu().numpy()
                done += b
            if on_progress is not None:
                on_progress(done, total)
    return out


def run_rife(
    frames: np.ndarray, times: Sequence[Fraction], path: Path | None, device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, int | None]:
    """Load `path`, make the frames at `times`, free the model; also the peak VRAM on CUDA (else None)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # float16 on a GPU (as RIFE is usually run there); float32 on the CPU, where half is slow or missing.
    model = load_rife(path, device, torch.float16 if cuda else torch.float32)
    try:
        out = interpolate_at(model, frames, times, on_progress)
        peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    finally:
        # Give the memory back whatever happened: the next job's pipeline needs it.
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out, peak
