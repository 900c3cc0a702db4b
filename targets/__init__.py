"""The table of targets. Each row names its module; the module is imported only when asked for."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipeline.errors import UserError


@dataclass(frozen=True)
class TargetSpec:
    name: str
    module: str
    hardware: str
    precisions: tuple[str, ...]
    extra: str  # pip extra that installs its toolchain


TARGETS: dict[str, TargetSpec] = {t.name: t for t in (
    TargetSpec("onnxruntime", "targets.ort_cpu", "portable CPU (reference)", ("fp32", "int8"), "onnxruntime"),
    TargetSpec("openvino", "targets.openvino_cpu", "x86 CPU (Intel)", ("fp32", "bf16", "int8"), "openvino"),
    TargetSpec("tensorrt", "targets.trt_gpu", "NVIDIA GPU", ("fp32", "int8"), "tensorrt"),
)}


def get_spec(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]


def load_target(name: str):
    """The target's module (implements targets.base.TargetModule)."""
    return importlib.import_module(get_spec(name).module)
