"""Which weights a model runs with: the `weights` setting's words, the resolved choice, and its checks (no torch).

    auto     the dtype's own (bf16 or fp16 on a GPU, float32 on the CPU): the released quality
    fp8      the denoisers stored in float8_e4m3fn, each layer cast up to the dtype for its forward
    gguf     the transformer read from a GGUF file the user has (`weights_file`), dequantized per layer
    torchao  the denoisers quantized at load by torchao (`torchao_type`, e.g. int8 weight-only)

The config names them globally, per model (a `[models]` table entry) and per preset; `Weights` is
what one model is loaded with, and `asking` turns a preset's word into that.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

WeightsKind = Literal["auto", "fp8", "gguf", "torchao"]
WEIGHTS: tuple[str, ...] = ("auto", "fp8", "gguf", "torchao")

#: torchao_type -> the torchao config class it names (torchao.quantization.<class>()).
TORCHAO_TYPES: dict[str, str] = {
    "int8wo": "Int8WeightOnlyConfig",  # int8 weights, computed in the dtype: half of bf16's memory
    "int4wo": "Int4WeightOnlyConfig",  # int4 weights: a quarter; CUDA only
    "float8wo": "Float8WeightOnlyConfig",  # float8 weights: half
    "int8dq": "Int8DynamicActivationInt8WeightConfig",  # int8 weights and activations
    "float8dq": "Float8DynamicActivationFloat8WeightConfig",  # float8 both: GPUs of compute capability 8.9+
}
TorchaoType = Literal["int8wo", "int4wo", "float8wo", "int8dq", "float8dq"]

#: What a job's notes say when its model stepped from `auto` to fp8 because `allow_fp8_fallback` let it.
FP8_FALLBACK_NOTE = (
    "the denoiser's weights were stored in fp8 (float8_e4m3fn, computed in the model's dtype) to fit the GPU, "
    "as allow_fp8_fallback allows; the video differs slightly from one made with full-precision weights"
)

#: The Python package each kind needs beyond the daemon's own, and the extra that installs it.
PACKAGES: dict[str, str] = {"gguf": "gguf", "torchao": "torchao"}


@dataclass(frozen=True)
class Weights:
    """The weights one model is loaded with."""

    kind: str = "auto"  # one of WEIGHTS
    file: str | None = None  # gguf: the .gguf file of the transformer
    torchao_type: str = "int8wo"  # torchao: one of TORCHAO_TYPES (kept for every kind: a preset may ask torchao)

    def label(self) -> str:
        """What a try entry records: "auto", "fp8", "gguf" or "torchao:int8wo"."""
        return f"torchao:{self.torchao_type}" if self.kind == "torchao" else self.kind

    def same_as(self, other: Weights) -> bool:
        """Whether a model loaded with `other` has these weights (the torchao type only counts for torchao)."""
        return self.label() == other.label() and (self.kind != "gguf" or self.file == other.file)

    def asking(self, kind: str | None) -> Weights:
        """These weights as a preset's `weights` changes them; None: unchanged."""
        if kind is None or kind == self.kind:
            return self
        if kind == "gguf":  # a preset cannot name one (settings refuse it): the file belongs to a model
            raise ValueError("a preset cannot ask for gguf weights; the file belongs to one model")
        return Weights(kind, None, self.torchao_type)

    def record(self) -> dict[str, Any]:
        """The manifest's words for them: `weights`, and its file or torchao type where it has one."""
        out: dict[str, Any] = {"weights": self.kind}
        if self.kind == "gguf":
            out["weights_file"] = self.file
        if self.kind == "torchao":
            out["torchao_type"] = self.torchao_type
        return out


def missing_package(kind: str) -> str | None:
    """The install command when `kind` needs a package that is not installed; None when nothing is missing.

    Told without importing it (torchao imports torch, which `status` must not pay for).
    """
    package = PACKAGES.get(kind)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return f"pip install 'i2v-daemon[{package}]' (or pip install {package}) into the daemon's environment"


def shape_problem(kind: str, file: Path | None, key: str) -> str | None:
    """What is wrong with `kind` and `file` as written, whatever host reads them (checked at config load)."""
    file_key = key + "_file"
    if file is not None and kind != "gguf":
        return (f"{file_key}: it is set but {key} is {kind!r}; set {key} = 'gguf' to load that file, "
                f"or remove {file_key}")
    if kind == "gguf" and file is None:
        return (f"{file_key}: {key} = 'gguf' needs {file_key}, the path of a .gguf file of this model's "
                "transformer (e.g. a Q8_0 quantization of it)")
    return None


def problem(kind: str, file: Path | None, key: str) -> str | None:
    """Why `kind` with `file` cannot be used on this host, said with `key` (e.g. "weights" or
    "models.wan.weights"); None: fine. Checked where the model runs (`run`, `doctor`), not at config load:
    `serve` or `status` on a host without the package or the file reads the same config."""
    file_key = key + "_file"
    shape = shape_problem(kind, file, key)
    if shape:
        return shape
    missing = missing_package(kind)
    if missing:
        return f"{key}: {kind!r} needs the {PACKAGES[kind]} package, which is not installed: {missing}"
    if kind != "gguf":
        return None
    if file is None:
        return (f"{file_key}: {key} = 'gguf' needs {file_key}, the path of a .gguf file of this model's "
                "transformer (e.g. a Q8_0 quantization of it)")
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        return f"{file_key}: {str(file)!r} {what}; give the path of the .gguf file (or set {key} = 'auto')"
    if file.suffix.lower() != ".gguf":
        return (f"{file_key}: {str(file)!r} is not a .gguf file; give a GGUF file of the transformer, "
                f"or set {key} = 'fp8'")
    return None
