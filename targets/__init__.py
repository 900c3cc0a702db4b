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
    precisions: tuple[str, ...]  # the first is the target's reference: INT8 drops and speed-ups are against it
    extra: str  # pip extra that installs its toolchain

    @property
    def reference(self) -> str:
        return self.precisions[0]


TARGETS: dict[str, TargetSpec] = {t.name: t for t in (
    TargetSpec("onnxruntime", "targets.ort_cpu", "portable CPU (reference)", ("fp32", "int8"), "onnxruntime"),
    TargetSpec("openvino", "targets.openvino_cpu", "x86 CPU (Intel)", ("fp32", "bf16", "int8"), "openvino"),
    TargetSpec("tensorrt", "targets.trt_gpu", "NVIDIA GPU", ("fp32", "int8"), "tensorrt"),
    # fp16 is Core ML's reference (Apple's GPU and Neural Engine compute in FP16); w8 = INT8 weights only
    TargetSpec("coreml", "targets.coreml_apple", "Apple (Neural Engine, GPU, CPU)", ("fp16", "w8", "int8"), "coreml"),
)}


def get_spec(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]


def load_target(name: str):
    """The target's module (implements targets.base.TargetModule)."""
    return importlib.import_module(get_spec(name).module)
