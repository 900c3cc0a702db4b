"""ONNX Runtime on the CPU: the portable reference target. FP32, and INT8 W8A8 by static QDQ quantization.

INT8 recipe (default), and why (the figures are in the README and each deploy's report, not here):
- Only Conv and MatMul/Gemm are quantized. LayerNorm, GELU, Transpose and the residual Adds stay float:
  quantizing every op (quantize_static's default) puts Q/DQ pairs around them that block ORT's fusions
  and run slower than FP32, for no accuracy gain.
- Activations uint8 (asymmetric), weights int8 per output channel (symmetric): on x86 this is the pair
  ORT turns into QLinearConv / QLinearMatMul-class integer kernels; int8 activations leave Conv in float.
- MatMul outputs are left in float (`OpTypesToExcludeOutputQuantization`): ORT then runs
  MatMulIntegerToFloat, which writes float directly for the bias+GELU / residual that follow, instead of
  QLinearMatMul followed by a DequantizeLinear: faster, and one quantization point fewer per layer.
- Calibration on our calibration split (never random tensors), method selectable: minmax, percentile, entropy.
- ORT's pre-processing (symbolic shape inference + graph optimisation) runs first, as its docs require.
- Each deploy builds the other recipes (INT8_RECIPES) beside this one and keeps the fastest that meets the gates.
"""
from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from convnext_deploy.targets.base import (
    Artifact,
    Availability,
    BuildRequest,
    Int8Recipe,
    LayerProbe,
    Runner,
    Target,
    calibration_record,
    options_config,
    requires,
)
from convnext_deploy.targets.image_input import example_input, fed, finish_onnx
from convnext_deploy.targets.ort_peer import user_paths

NAME = "onnxruntime"
INSTALL_HINT = "pip install 'convnext-deploy[onnxruntime]' (or `make setup`)"

# Op types ORT runs as integer kernels once a QDQ graph is fused (CPU EP, ORT ≥ 1.16).
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
               "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearSigmoid",
               "DynamicQuantizeMatMul", "QAttention")
PEER_DEFAULT = "quantize_static defaults"  # quantize_static with its defaults: QDQ, S8S8, per-tensor, every op


@dataclass(frozen=True)
class OrtOptions:
    recipe: str = "ours"  # or PEER_DEFAULT
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    per_channel: bool = True
    calibrate_method: str = "minmax"  # minmax | percentile | entropy
    percentile: float = 99.999
    quant_format: str = "QDQ"
    matmul_float_output: bool = True
    reduce_range: bool = False  # 7-bit weights: no u8×s8 saturation on CPUs without VNNI (ORT's advice for AVX2)
    float_layers: tuple[str, ...] = ()  # checkpoint layer names kept in float (the accuracy fallback)


# The INT8 candidates a deploy builds beside ours; `--recipe auto` keeps the fastest that meets the accuracy gates
# on the control split of the CPU it runs on (U8S8's speed and numerics depend on VNNI; ORT's quantization docs
# advise reduce_range or U8U8 without it).
INT8_RECIPES = (
    Int8Recipe(PEER_DEFAULT, {"recipe": PEER_DEFAULT}, smoothed=False),
    Int8Recipe("ours with int8 MatMul outputs (QLinearMatMul)", {"matmul_float_output": False}),
    Int8Recipe("ours with int8 activations (S8S8)", {"activation_type": "QInt8"}),
    Int8Recipe("ours with reduce_range (U8S8, 7-bit weights)", {"reduce_range": True}),
    Int8Recipe("ours with uint8 weights (U8U8)", {"weight_type": "QUInt8"}),
    # ORT fuses LayerNorm only over the last axis: on the channels-first form the norms run as float op chains
    Int8Recipe("ours on the channels-first graph", {}, form="channels_first"),
)


# the default on x86 without VNNI: reduce_range, measured as fast as full 8-bit U8S8 there and faster than U8U8
# (benchmarks/amd-epyc-zen3-2026-12-07), without the saturation ORT's quantization docs warn of
SATURATION_SAFE = {"reduce_range": True}


def saturates_without_vnni(artifact: Artifact) -> bool:
    """Full 8-bit s8 weights, whatever the activations' type (on x86 ORT rewrites S8 activations to U8): VPMADDUBSW
    saturates their pair sums without VNNI. reduce_range (7-bit weights: 255·63·2 < 2^15) and U8U8 do not."""
    q = artifact.metadata.get("quantization", {})
    return q.get("recipe") == PEER_DEFAULT or (q.get("weight_type", "QInt8") == "QInt8" and not q.get("reduce_range"))


def available() -> Availability:
    return requires("onnxruntime", "onnx", hint=INSTALL_HINT)


def describe_environment() -> dict:
    import onnx
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "providers": ort.get_available_providers()}


def quantize_int8(src: Path, dst: Path, calibration, options: OrtOptions, torch_model=None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType

    from convnext_deploy.targets.ort_tools import calibration_method, quantize

    if options.recipe == PEER_DEFAULT:
        quantize(src, dst, calibration, options.float_layers, torch_model)
        return
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if options.matmul_float_output:
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
    if options.calibrate_method == "percentile":
        extra["CalibPercentile"] = float(options.percentile)
    quantize(src, dst, calibration, options.float_layers, torch_model,
             quant_format=QuantFormat[options.quant_format], op_types_to_quantize=list(options.op_types),
             per_channel=bool(options.per_channel), activation_type=QuantType[options.activation_type],
             weight_type=QuantType[options.weight_type], calibrate_method=calibration_method(options.calibrate_method),
             reduce_range=bool(options.reduce_range), extra_options=extra)


def op_counts(path: Path) -> dict:
    """Op types in the file as written and in the graph ORT actually executes after its fusions."""
    import onnx

    from convnext_deploy.targets.ort_tools import session

    written = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    tmp = path.with_name(path.stem + ".ort-optimized.onnx")
    try:
        session(path, 1, optimized_out=tmp)
        executed = Counter(n.op_type for n in onnx.load(str(tmp)).graph.node)
    finally:
        tmp.unlink(missing_ok=True)
    integer = {k: v for k, v in executed.items() if k in INTEGER_OPS}
    return {"written": dict(written), "executed": dict(executed), "integer_kernels": integer,
            "integer_kernel_count": sum(integer.values()),
            "float_conv_matmul_left": sum(executed.get(k, 0) for k in ("Conv", "MatMul", "Gemm", "FusedConv",
                                                                       "FusedMatMul", "FusedGemm"))}


def build_config(precision: str, options: OrtOptions) -> dict:
    if precision == "int8":
        if options.recipe == PEER_DEFAULT:
            return {"recipe": PEER_DEFAULT, "float_layers": list(options.float_layers)}
        return options_config(options)
    if precision == "fp32":
        return {}
    raise ValueError(f"onnxruntime target offers fp32 and int8, not {precision}")


def build(request: BuildRequest) -> Artifact:
    out = request.out_dir
    if request.precision == "fp32":
        dst = out / "model_fp32.onnx"
        shutil.copyfile(request.onnx_path, dst)
        return Artifact(NAME, "fp32", [dst], {"ops": op_counts(dst)})
    if request.precision == "int8":
        calibration = calibration_record(request.calibration)
        dst = out / "model_int8.onnx"
        quantize_int8(request.onnx_path, dst, request.calibration, request.options, request.torch_model)
        return Artifact(NAME, "int8", [dst], {"quantization": build_config("int8", request.options), "ops": op_counts(dst),
                                              "calibration": calibration})
    raise ValueError(f"onnxruntime target offers fp32 and int8, not {request.precision}")


def load_runner(artifact: Artifact, threads: int) -> Runner:
    from convnext_deploy.targets.ort_tools import runner

    # a file this target did not build (the runtime's peak graphs) is read back here: what ORT runs after fusion
    ops = artifact.metadata.get("ops") or op_counts(artifact.files[0])
    executed = "fp32"
    if artifact.precision == "int8":
        executed = f"int8 ({ops.get('integer_kernel_count', 0)} integer kernels, " \
                   f"{ops.get('float_conv_matmul_left', 0)} float Conv/MatMul left)"
    return fed(replace(runner(artifact.files[0], threads, executed), ops=ops), artifact)


def finish(artifact: Artifact, spec, out_dir: Path) -> Artifact:
    """The ONNX with its input (targets.image_input) and its labels and preprocessing in metadata_props."""
    dst = out_dir / artifact.files[0].name
    record = finish_onnx(artifact.files[0], dst, spec)
    return Artifact(NAME, artifact.precision, [dst], {**artifact.metadata, "input": record, "ops": op_counts(dst)},
                    artifact.proxy)


def stream_runner(artifact: Artifact, threads: int, input_size: int):
    """Parallel single-threaded sessions, one per thread (targets.ort_tools.stream_runner)."""
    from convnext_deploy.targets.ort_tools import stream_runner as parallel_sessions

    return parallel_sessions(artifact.files[0], threads)


def layer_probe(artifacts: dict, images: np.ndarray, threads: int, model=None, calibration=None) -> LayerProbe:
    """The INT8 graph run as this target runs it (ORT's fusions on)."""
    from convnext_deploy.targets.ort_tools import runtime_label
    from convnext_deploy.targets.qdq import layer_probe as qdq_probe

    return qdq_probe(artifacts["int8"].files[0], artifacts["fp32"].files[0], images, threads, optimize=True,
                     runtime=runtime_label(), kind="real", model=model)


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def profile(artifact: Artifact, threads: int, input_size: int, runs: int = 20) -> dict:
    """Where the time goes, from ONNX Runtime's own profiler: per-node kernel time at batch 1 (mean of the last
    `runs` runs, after 3 warm-up runs), the top nodes, and the total split by integer kernels, Q/DQ and float ops."""
    import shutil
    import tempfile

    from convnext_deploy.targets.ort_tools import session

    scratch = Path(tempfile.mkdtemp(prefix="ort-profile-"))  # never inside a verified cache entry
    try:
        sess = session(artifact.files[0], threads, profile_prefix=scratch / "profile")
        return _profiled(sess, example_input(artifact, 1, input_size), runs, threads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _profiled(sess, image: np.ndarray, runs: int, threads: int) -> dict:
    import json

    x = {sess.get_inputs()[0].name: image}
    for _ in range(3 + runs):
        sess.run(None, x)
    events = json.loads(Path(sess.end_profiling()).read_text())
    # the profile covers every run since the session started: keep the node events of the last `runs` runs
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first = starts[-runs] if len(starts) >= runs else 0
    per_node: dict[str, list] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first:
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_node.setdefault(e["name"][:-len("_kernel_time")], [op, 0.0])[1] += e["dur"] / 1e3 / runs
    kinds = {"integer kernels": 0.0, "Q/DQ": 0.0, "float ops": 0.0}
    by_op: dict[str, float] = {}
    for op, ms in per_node.values():
        kinds["integer kernels" if op in INTEGER_OPS else "Q/DQ" if op in QDQ_OPS else "float ops"] += ms
        by_op[op] = by_op.get(op, 0.0) + ms
    top = sorted(per_node.items(), key=lambda kv: -kv[1][1])[:10]
    last_run = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                       and e["ts"] >= starts[-1]), key=lambda e: e["ts"]) if starts else []
    return {"total_ms": sum(kinds.values()), "by_kind_ms": kinds, "layers": _layer_times(last_run, per_node),
            "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "top_nodes": [{"node": n, "op": op, "ms": ms} for n, (op, ms) in top], "runs": runs,
            "input_size": int(image.shape[1 if image.dtype == np.uint8 else 2]), "batch": 1, "threads": threads,
            "source": "onnxruntime profiler: kernel time per node (excludes the session's own overhead)"}


WEIGHT_KERNELS = ("Conv", "FusedConv", "QLinearConv", "ConvInteger", "MatMul", "FusedMatMul", "MatMulInteger",
                  "MatMulIntegerToFloat", "QLinearMatMul", "Gemm", "FusedGemm", "QGemm")


def _layer_times(run_events: list, per_node: dict) -> list[dict]:
    """The kernel of each weight layer in execution order (a chain network: the checkpoint's network order), its
    mean time, and the QuantizeLinear time spent on its way in: what the layer costs in INT8 beyond its kernel."""
    layers, pending = [], 0.0
    for e in run_events:
        name = e["name"][:-len("_kernel_time")]
        op, ms = per_node[name]
        if op == "QuantizeLinear":
            pending += ms
        elif op in WEIGHT_KERNELS:
            layers.append({"node": name, "op": op, "ms": ms + pending, "input_quantize_ms": pending})
            pending = 0.0
    return layers


TARGET = Target(
    name=NAME, hardware="portable CPU (reference)", precisions=("fp32", "int8"), extra="onnxruntime",
    options=OrtOptions, available=available, describe_environment=describe_environment, build_config=build_config,
    build=build, load_runner=load_runner, int8_recipes=INT8_RECIPES, peer_default=PEER_DEFAULT,
    layer_probe=layer_probe, profile=profile, user_paths=user_paths, stream_runner=stream_runner, gemm_peak=True,
    finish=finish, saturates_without_vnni=saturates_without_vnni, saturation_safe=SATURATION_SAFE,
)
