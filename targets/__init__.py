"""The table of targets: one declared entry (targets.base.Target) per target module.

The modules import their toolchains only inside their functions, so reading this table imports none.
"""
from __future__ import annotations

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.targets import coreml_apple, openvino_cpu, ort_cpu, trt_gpu
from convnext_deploy.targets.base import Target
from convnext_deploy.targets.image_input import Finish, takes_image

TARGETS: dict[str, Target] = {t.name: t for t in (
    ort_cpu.TARGET,  # onnxruntime: portable CPU (reference)
    openvino_cpu.TARGET,  # openvino: x86 or ARM CPU
    trt_gpu.TARGET,  # tensorrt: NVIDIA GPU (Q/DQ ONNX proxy where no GPU)
    coreml_apple.TARGET,  # coreml: Apple (torch proxy off macOS)
)}


__all__ = ["TARGETS", "Finish", "Target", "get_target", "takes_image"]


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]

