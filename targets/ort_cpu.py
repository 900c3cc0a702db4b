"""ONNX Runtime on the CPU: the portable reference target. FP32, and INT8 W8A8 by static QDQ quantization.

INT8 recipe (default), and why — measured on this project's CPU, figures in the README and report:
- Only Conv and MatMul/Gemm are quantized. LayerNorm, GELU, Transpose and the residual Adds stay float:
  quantizing every op (quantize_static's default) puts Q/DQ pairs around them that block ORT's fusions
  and run slower than FP32, for no accuracy gain.
- Activations uint8 (asymmetric), weights int8 per output channel (symmetric): on x86 this is the pair
  ORT turns into QLinearConv / QLinearMatMul-class integer kernels; int8 activations left Conv in float.
- MatMul outputs are left in float (`OpTypesToExcludeOutputQuantization`): ORT then runs
  MatMulIntegerToFloat, which writes float directly for the bias+GELU / residual that follow, instead of
  QLinearMatMul followed by a DequantizeLinear. ConvNeXt-T, 224 px, batch 1, 2 threads: 21.6 ms vs 24.6 ms
  (FP32 41.6 ms), and one quantization point fewer per layer.
- Calibration on our calibration split (never random tensors), method selectable: minmax, percentile, entropy.
- ORT's pre-processing (symbolic shape inference + graph optimisation) runs first, as its docs require.
"""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.machine import device_label
from targets.base import Artifact, Availability, BuildRequest, CalibrationData, Runner, requires
from targets.qdq import node_names_for

NAME = "onnxruntime"
INSTALL_HINT = "pip install 'convnext-deploy[onnxruntime]' (or `make setup`)"

# Op types ORT runs as integer kernels once a QDQ graph is fused (CPU EP, ORT ≥ 1.16).
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
               "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearSigmoid",
               "DynamicQuantizeMatMul", "QAttention")

DEFAULT_INT8 = {
    "recipe": "ours",
    "op_types": ["Conv", "MatMul", "Gemm"],
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "per_channel": True,
    "calibrate_method": "minmax",
    "quant_format": "QDQ",
    "matmul_float_output": True,
}
# quantize_static with its defaults (QDQ, int8 activations and weights, per-tensor, every op type): the peer.
PEER_DEFAULT_INT8 = {"recipe": "quantize_static defaults"}

# Other INT8 recipes a deploy builds, validates and times next to ours, so the report shows why ours is chosen.
INT8_ALTERNATIVES = {
    "quantize_static defaults": PEER_DEFAULT_INT8,
    "ours with int8 MatMul outputs (QLinearMatMul)": {"matmul_float_output": False},
    "ours with int8 activations (S8S8)": {"activation_type": "QInt8"},
}


def available() -> Availability:
    return requires("onnxruntime", "onnx", hint=INSTALL_HINT)


def describe_environment() -> dict:
    import onnx
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "providers": ort.get_available_providers()}


class _Reader:
    """onnxruntime's CalibrationDataReader over our calibration images, in equal-size batches."""

    def __init__(self, calibration: CalibrationData, input_name: str):
        self._batches = list(calibration.equal_batches())
        self._name = input_name
        self._it = iter(self._batches)

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {self._name: b}

    def rewind(self):
        self._it = iter(self._batches)


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if name not in methods:
        raise ValueError(f"unknown calibration method {name!r}; use one of {sorted(methods)}")
    return methods[name]


def quantize_int8(src: Path, dst: Path, calibration: CalibrationData, config: dict, torch_model=None) -> None:
    """`config["float_layers"]`: checkpoint layer names kept in float (the accuracy fallback); naming them
    needs the torch model."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    pre = dst.with_name("preprocessed.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    pre_model = onnx.load(str(pre), load_external_data=False)
    input_name = pre_model.graph.input[0].name
    reader = _Reader(calibration, input_name)
    excluded = node_names_for(pre_model, torch_model, config["float_layers"]) if config.get("float_layers") else []
    if config.get("recipe") == PEER_DEFAULT_INT8["recipe"]:
        quantize_static(str(pre), str(dst), reader)
    else:
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if config.get("matmul_float_output"):
            extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
        if config["calibrate_method"] == "percentile":
            extra["CalibPercentile"] = float(config.get("percentile", 99.999))
        quantize_static(
            str(pre), str(dst), reader,
            quant_format=QuantFormat[config["quant_format"]],
            op_types_to_quantize=list(config["op_types"]),
            per_channel=bool(config["per_channel"]),
            activation_type=QuantType[config["activation_type"]],
            weight_type=QuantType[config["weight_type"]],
            calibrate_method=_calibration_method(config["calibrate_method"]),
            nodes_to_exclude=list(config.get("nodes_to_exclude", [])) + excluded,
            extra_options=extra,
        )
    pre.unlink(missing_ok=True)


def _session(path: Path, threads: int, optimized_out: Path | None = None):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # its warning on saving an NCHWc-optimized graph is expected here
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_out is not None:
        so.optimized_model_filepath = str(optimized_out)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> dict:
    """Op types in the file as written and in the graph ORT actually executes after its fusions."""
    import onnx

    written = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    tmp = path.with_name(path.stem + ".ort-optimized.onnx")
    try:
        _session(path, 1, optimized_out=tmp)
        executed = Counter(n.op_type for n in onnx.load(str(tmp)).graph.node)
    finally:
        tmp.unlink(missing_ok=True)
    integer = {k: v for k, v in executed.items() if k in INTEGER_OPS}
    return {"written": dict(written), "executed": dict(executed), "integer_kernels": integer,
            "integer_kernel_count": sum(integer.values()),
            "float_conv_matmul_left": sum(executed.get(k, 0) for k in ("Conv", "MatMul", "Gemm", "FusedConv",
                                                                       "FusedMatMul", "FusedGemm"))}


def build_config(precision: str, options: dict) -> dict:
    if precision == "int8":
        if options.get("recipe") == PEER_DEFAULT_INT8["recipe"]:
            return dict(PEER_DEFAULT_INT8)
        return {**DEFAULT_INT8, **options}
    return {}


def build(request: BuildRequest) -> Artifact:
    out = request.out_dir
    if request.precision == "fp32":
        dst = out / "model_fp32.onnx"
        shutil.copyfile(request.onnx_path, dst)
        return Artifact(NAME, "fp32", [dst], {"ops": op_counts(dst)})
    if request.precision == "int8":
        if request.calibration is None or len(request.calibration.images) == 0:
            raise ValueError("INT8 needs calibration data")
        config = build_config("int8", request.options)
        dst = out / "model_int8.onnx"
        quantize_int8(request.onnx_path, dst, request.calibration, config, request.torch_model)
        ops = op_counts(dst)
        return Artifact(NAME, "int8", [dst], {"quantization": config, "ops": ops,
                                              "calibration": {"images": len(request.calibration.images),
                                                              "manifest_sha256": request.calibration.manifest_sha256}})
    raise ValueError(f"onnxruntime target offers fp32 and int8, not {request.precision}")


def load_runner(artifact: Artifact, threads: int) -> Runner:
    import onnxruntime as ort

    sess = _session(artifact.files[0], threads)
    name = sess.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    ops = artifact.metadata.get("ops", {})
    executed = "fp32"
    if artifact.precision == "int8":
        executed = f"int8 ({ops.get('integer_kernel_count', 0)} integer kernels, " \
                   f"{ops.get('float_conv_matmul_left', 0)} float Conv/MatMul left)"
    return Runner(run, f"onnxruntime {ort.__version__} CPUExecutionProvider", device_label(threads), executed, threads)



def sensitivity(artifacts: dict, images: np.ndarray, threads: int, log, **_) -> dict:
    """Per-layer SQNR and float-alone gain of the INT8 graph, run as this target runs it (ORT's fusions on)."""
    import onnxruntime as ort

    from targets.qdq import layer_sensitivity

    r = layer_sensitivity(artifacts["int8"].files[0], artifacts["fp32"].files[0], images, threads, optimize=True, log=log)
    return {**r, "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider", "kind": "real"}
