"""ONNX Runtime's INT8 the way Hugging Face users take it: Optimum's `ORTQuantizer` with
`AutoQuantizationConfig.avx512_vnni(is_static=True)` and `.avx2(is_static=True)`, on the same FP32 ONNX and
calibration images as ours. Optimum is not a dependency (it pulls transformers), so its documented static settings
are given to ONNX Runtime's `quantize_static`, which `ORTQuantizer.quantize` itself calls:

- both: QDQ format, per-channel weights, symmetric weights and asymmetric activations, MinMax calibration, and only
  the operators Optimum's configs quantize by default (`ORT_FULLY_CONNECTED_OPERATORS`: MatMul and Add), so the
  stem, downsampling and depthwise convolutions stay float;
- `avx512_vnni`: u8 activations × s8 weights at full 8 bits; `avx2`: u8 × u8 weights (reduce_range off).

Belongs to targets.ort_cpu, which alone calls it. The bench times these beside our artifacts with the target's own
runner, so a ratio compares the quantized graphs.
"""
from __future__ import annotations

from convnext_deploy.targets.base import Artifact, BuildRequest

NAME = "onnxruntime"
OPERATORS = ["MatMul", "Add"]  # optimum.onnxruntime.configuration.ORT_FULLY_CONNECTED_OPERATORS
PATHS = (("Optimum AutoQuantizationConfig.avx512_vnni (static)", "QInt8"),
         ("Optimum AutoQuantizationConfig.avx2 (static)", "QUInt8"))


def user_paths(request: BuildRequest) -> dict[str, Artifact]:
    """label → INT8 ONNX written under `request.out_dir`, one per path of PATHS, from `request.onnx_path`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    from convnext_deploy.targets.ort_tools import quantize

    out = {}
    for i, (label, weight_type) in enumerate(PATHS):
        dst = request.out_dir / f"peer_{i}_int8.onnx"
        settings = {"quant_format": QuantFormat.QDQ, "per_channel": True, "reduce_range": False,
                    "activation_type": QuantType.QUInt8, "weight_type": getattr(QuantType, weight_type),
                    "op_types_to_quantize": OPERATORS, "calibrate_method": CalibrationMethod.MinMax,
                    "extra_options": {"WeightSymmetric": True, "ActivationSymmetric": False}}
        quantize(request.onnx_path, dst, request.calibration, optimize=False, **settings)
        out[label] = Artifact(NAME, "int8", [dst], {
            "path": label, "converted_from": "our FP32 ONNX (as Optimum's ORTQuantizer takes an exported model)",
            "quantize_static": {"activation_type": "QUInt8", "weight_type": weight_type, "per_channel": True,
                                "reduce_range": False, "op_types_to_quantize": OPERATORS, "format": "QDQ"}})
    return out
