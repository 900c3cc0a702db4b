"""TensorRT on an NVIDIA GPU: explicitly quantized (Q/DQ) INT8 engine, FP16/FP32 engines as the reference.

The engine's network is strongly typed (TensorRT 10.12 deprecated weak typing, 11 removed it with the FP16 and INT8
builder flags): every tensor's type is the one the ONNX gives it. So the ONNX handed to TensorRT carries the
precision itself:
- The INT8 Q/DQ graph is made with ONNX Runtime's quantizer in TensorRT's explicit-quantization form: symmetric
  INT8 (zero point 0) for activations and weights, per-output-channel weight scales (Conv axis 0, MatMul axis 1),
  per-tensor activation scales from our calibration split, biases left float (TensorRT folds them into the INT8
  kernel), Q/DQ on the inputs of Conv and MatMul/Gemm, and on the input of every LayerNormalization a Conv feeds
  (Conv → Transpose → LayerNorm: TensorRT then picks INT8-in/INT8-out Conv kernels, ModelOpt PR #1117). Other
  outputs stay unquantized; GELU, the residual Adds and LayerNorm itself run float.
- Its float parts are then made FP16 in the graph (targets.trt_onnx, the form of ModelOpt AutoCast): FP16
  initializers and Q/DQ scales, LayerNorm statistics in FP32, the graph's input and output FP32. The fp16 engine
  is built from the export converted the same way; the fp32 engine from the export as it is.
- The engine (targets.trt_engine) is built with the `tensorrt` Python API: a strongly typed network (the creation
  flag on 10.x, the only kind on 11.x), ONNX parser, one optimisation profile for batch 1..max at the requested
  size, a workspace limit, a timing cache on disk, and the serialized engine and its build settings beside it,
  each written through a temporary file and a rename.
- The runner executes the engine with `execute_async_v3`; its `device_ms` returns the engine's own GPU time
  from CUDA events, which the shared latency harness uses for p50/p90/p99 (copies excluded).

Where TensorRT or a CUDA device is missing, the ONNX handed to TensorRT is still built and its numerics are run by
ONNX Runtime on the CPU: a real, runnable proxy of the engine's INT8 arithmetic on FP16 tensors (ONNX Runtime
computes ops it has no FP16 kernel for in FP32 between FP16 tensors), labelled "Q/DQ ONNX on ONNX Runtime CPU
(proxy for the TensorRT engine)". No latency is reported for it. The per-layer probe runs the FP32 Q/DQ graph the
quantizer wrote (kept beside as `model_int8_qdq_fp32.onnx`): its layers put back in float must equal the FP32 export.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convnext_deploy.targets.base import (
    Artifact,
    Availability,
    BuildRequest,
    CalibrationData,
    LayerProbe,
    Runner,
    Target,
    calibration_record,
    options_config,
    requires,
)
from convnext_deploy.targets.image_input import IMAGE, fed, finish_onnx
from convnext_deploy.targets.trt_engine import SUPPORTED_TENSORRT, build_engine, cuda_device, engine_runner, supported
from convnext_deploy.targets.trt_onnx import QDQ_FP32_FILE, to_fp16

NAME = "tensorrt"
INSTALL_HINT = ("on a machine with an NVIDIA GPU and driver: pip install 'convnext-deploy[tensorrt]' "
                f"({SUPPORTED_TENSORRT}, cuda-python)")
PROXY_LABEL = "Q/DQ ONNX on ONNX Runtime CPU (proxy for the TensorRT engine)"
NOT_BUILT_NOTE = "engine not built"
ENGINE_FILE = "model_{precision}.engine"
RECIPE = "tensorrt explicit Q/DQ"


@dataclass(frozen=True)
class TensorRTOptions:
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")  # Q/DQ on these ops' inputs (and Conv → LayerNorm)
    calibrate_method: str = "minmax"  # minmax | percentile | entropy (activation scales, per tensor)
    layernorm_inputs: bool = True  # Q/DQ on the LayerNorm inputs a Conv feeds: INT8-out Conv kernels in TensorRT
    max_batch: int = 32  # the optimisation profile: batch 1..max_batch, tuned for opt_batch
    opt_batch: int = 1
    workspace_mib: int = 4096
    float_layers: tuple[str, ...] = ()  # checkpoint layer names left without Q/DQ (the accuracy fallback): FP16 in the engine


_ENGINE_FIELDS = ("max_batch", "opt_batch", "workspace_mib")


def available() -> Availability:
    """Full availability needs the tensorrt package and a CUDA device; the proxy needs ONNX Runtime only."""
    have = requires("tensorrt", hint=INSTALL_HINT)
    if not have.ok:
        return Availability(False, have.reason, proxy=_proxy_ok())
    import tensorrt as trt

    if not supported(trt.__version__):
        return Availability(False, f"tensorrt {trt.__version__} is installed; this project builds with "
                                   f"{SUPPORTED_TENSORRT}: pip install 'convnext-deploy[tensorrt]'", proxy=_proxy_ok())
    gpu = cuda_device()
    if gpu is None:
        return Availability(False, "no CUDA device is visible (nvidia-smi / CUDA driver): the engine needs an NVIDIA GPU",
                            proxy=_proxy_ok())
    return Availability(True, proxy=True)


def _proxy_ok() -> bool:
    return requires("onnxruntime", "onnx", hint="").ok


def describe_environment() -> dict:
    env: dict = {"tensorrt": None, "cuda_device": None}
    if requires("tensorrt", hint="").ok:
        import tensorrt as trt

        env["tensorrt"] = trt.__version__
        env["cuda_device"] = cuda_device()
    if _proxy_ok():
        import onnxruntime as ort

        env["onnxruntime (proxy)"] = ort.__version__
    return env


def build_config(precision: str, options: TensorRTOptions) -> dict:
    """The settings the build really uses: the engine's for every precision, the Q/DQ recipe's for INT8."""
    from convnext_deploy.targets.ort_tools import CALIBRATION_METHODS

    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"tensorrt target offers fp32, fp16 and int8, not {precision}")
    config = options_config(options, _ENGINE_FIELDS)
    if precision == "int8":
        if options.calibrate_method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {options.calibrate_method!r}; use one of "
                             f"{', '.join(CALIBRATION_METHODS)}")
        config = {"recipe": RECIPE, **options_config(options)}
    return config


# ---------------------------------------------------------------- Q/DQ ONNX (runs anywhere)

def make_qdq_onnx(src: Path, dst: Path, calibration: CalibrationData, options: TensorRTOptions, torch_model=None) -> None:
    """ONNX Runtime's static quantizer, set to TensorRT's explicit-quantization rules; the graph stays FP32 (build
    converts it). Shape inference only before it (`optimize=False`): ORT's graph optimisations could emit ORT-only
    contrib ops TensorRT cannot parse."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType

    from convnext_deploy.targets.ort_tools import calibration_method, quantize
    from convnext_deploy.targets.trt_onnx import tensorrt_placement

    # ORT puts Q/DQ on a Conv's output for every consumer; tensorrt_placement keeps only the LayerNorm-bound ones
    unquantized_outputs = [op for op in options.op_types if not (options.layernorm_inputs and op == "Conv")]
    quantize(src, dst, calibration, options.float_layers, torch_model, optimize=False,
             quant_format=QuantFormat.QDQ,
             op_types_to_quantize=list(options.op_types),
             per_channel=True,
             activation_type=QuantType.QInt8,
             weight_type=QuantType.QInt8,
             calibrate_method=calibration_method(options.calibrate_method),
             extra_options={
                 "ActivationSymmetric": True,  # zero point 0: TensorRT supports symmetric INT8 only
                 "WeightSymmetric": True,
                 # TensorRT takes float biases into its INT8 kernels (ModelOpt quantizes none); an INT32 bias's
                 # scale (input × weight scale) would also fall below FP16's range
                 "QuantizeBias": False,
                 "OpTypesToExcludeOutputQuantization": unquantized_outputs,
                 "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # MatMul weight (K, N): N is the output channel
             })
    model = onnx.load(str(dst))
    tensorrt_placement(model, set(options.op_types))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def qdq_report(path: Path) -> dict:
    """What the Q/DQ graph holds, for the report and the conformity tests."""
    import onnx
    from onnx import numpy_helper

    from convnext_deploy.targets.qdq import QUANTIZABLE, graph_index

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    index = graph_index(g)
    quantized, float_ops, weight_channels = [], [], []
    for n in g.node:
        if n.op_type not in QUANTIZABLE:
            continue
        srcs = [index.dequantize_of(i) for i in n.input[:2]]
        if all(s is not None for s in srcs):
            quantized.append(n.name)
            w_dq = srcs[1]
            scale = inits.get(w_dq.input[1])
            zp = inits.get(w_dq.input[2]) if len(w_dq.input) > 2 else None
            weight_channels.append({"node": n.name, "op": n.op_type, "scales": int(np.size(scale)),
                                    "zero_points_nonzero": int(np.count_nonzero(zp)) if zp is not None else 0})
        else:
            float_ops.append(n.name)
    zero_points = [inits[n.input[2]] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(n.input) > 2 and n.input[2] in inits]
    qdq_next_to = sorted({c.op_type for n in g.node if n.op_type == "DequantizeLinear"
                          for c in index.consumers.get(n.output[0], [])})
    return {"quantized": quantized, "float_conv_matmul": float_ops, "weights": weight_channels,
            "nonzero_zero_points": int(sum(np.count_nonzero(z) for z in zero_points)),
            "dq_consumers": qdq_next_to,
            "qdq_nodes": sum(1 for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))}


# ---------------------------------------------------------------- the target protocol

def build(request: BuildRequest) -> Artifact:
    from convnext_deploy.pipeline.core.cache import cache_root

    options = request.options if request.options is not None else TensorRTOptions()
    config = build_config(request.precision, options)
    out = request.out_dir
    onnx_path = out / f"model_{request.precision}.onnx"  # what TensorRT parses, typed as the engine runs
    meta: dict = {"build": config}
    files = [onnx_path]
    if request.precision == "int8":
        calibration = calibration_record(request.calibration)
        make_qdq_onnx(request.onnx_path, out / QDQ_FP32_FILE, request.calibration, options, request.torch_model)
        meta["onnx_types"] = to_fp16(out / QDQ_FP32_FILE, onnx_path)
        meta["qdq"] = qdq_report(onnx_path)
        meta["calibration"] = calibration
        files.append(out / QDQ_FP32_FILE)
    elif request.precision == "fp16":
        meta["onnx_types"] = to_fp16(request.onnx_path, onnx_path)
    else:
        shutil.copyfile(request.onnx_path, onnx_path)
    avail = available()
    if avail.ok:
        engine = out / ENGINE_FILE.format(precision=request.precision)
        meta["engine"] = build_engine(onnx_path, engine, request.precision, options, request.input_sizes or (224,),
                                      cache_root() / "tensorrt" / "timing.cache")
        files += [engine, engine.with_suffix(".json")]
        return Artifact(NAME, request.precision, files, meta)
    meta["engine_not_built"] = avail.reason
    return Artifact(NAME, request.precision, files, meta, proxy=PROXY_LABEL)


def finish(artifact: Artifact, spec, out_dir: Path) -> Artifact:
    """Every ONNX of the artifact with its input (targets.image_input), labels and preprocessing; the engine is
    built again from the finished ONNX, since TensorRT bakes the input into it."""
    from convnext_deploy.pipeline.core.cache import cache_root

    onnx_files = [f for f in artifact.files if f.suffix == ".onnx"]
    meta, files = dict(artifact.metadata), []
    for f in onnx_files:
        meta["input"] = finish_onnx(f, out_dir / f.name, spec)
        files.append(out_dir / f.name)
    if not any(f.suffix == ".engine" for f in artifact.files):
        return Artifact(NAME, artifact.precision, files, meta, artifact.proxy)
    engine = out_dir / ENGINE_FILE.format(precision=artifact.precision)
    settings = artifact.metadata["engine"]
    sizes = tuple(settings["profile"][k][2] for k in ("min", "max", "opt"))  # the source engine's NCHW profile
    options = TensorRTOptions(**{k: artifact.metadata["build"][k] for k in _ENGINE_FIELDS if k in artifact.metadata["build"]})
    meta["engine"] = build_engine(files[0], engine, artifact.precision, options, sizes,
                                  cache_root() / "tensorrt" / "timing.cache", image=spec.input == IMAGE)
    return Artifact(NAME, artifact.precision, files + [engine, engine.with_suffix(".json")], meta)


def load_runner(artifact: Artifact, threads: int) -> Runner:
    return fed(_runner(artifact, threads), artifact)


def _runner(artifact: Artifact, threads: int) -> Runner:
    engines = [f for f in artifact.files if f.suffix == ".engine"]
    if engines and available().ok:
        return engine_runner(engines[0], artifact.precision)
    if artifact.precision == "fp16":
        raise ValueError("no CPU proxy reproduces the FP16 engine's numerics; it needs TensorRT on a GPU")
    # The proxy: the ONNX TensorRT parses (FP16 with Q/DQ for INT8) executed by ONNX Runtime on the CPU, with no
    # graph optimisation that could fuse the Q/DQ pairs into kernels of another arithmetic.
    from convnext_deploy.targets.ort_tools import runner

    executed = {"int8": "int8 Q/DQ on fp16 tensors (fake-quantized: float arithmetic on int8-rounded values)",
                "fp32": "fp32"}[artifact.precision]
    return runner(artifact.files[0], threads, executed, optimize=False, proxy=PROXY_LABEL)


def layer_probe(artifacts: dict, images: np.ndarray, threads: int, model=None, calibration=None) -> LayerProbe:
    """The quantizer's FP32 Q/DQ graph as written (no fusion turns Q/DQ into other kernels): a layer put back in
    float reads the FP32 export's weights, which an FP16 graph could not take, and all of them give the export."""
    from convnext_deploy.targets.qdq import layer_probe as qdq_probe

    qdq = next((f for f in artifacts["int8"].files if f.name == QDQ_FP32_FILE), None)
    if qdq is None:
        raise ValueError(f"the TensorRT INT8 artifact has no {QDQ_FP32_FILE} (built by an older version): rebuild it")
    return qdq_probe(qdq, artifacts["fp32"].files[0], images, threads, optimize=False,
                     runtime=PROXY_LABEL, kind="proxy", model=model)


TARGET = Target(
    name=NAME, hardware="NVIDIA GPU", precisions=("fp32", "int8"), extra="tensorrt", options=TensorRTOptions,
    available=available, describe_environment=describe_environment, build_config=build_config, build=build,
    load_runner=load_runner, layer_probe=layer_probe, not_built_note=NOT_BUILT_NOTE, finish=finish,
    int8_runner_w=1.0,  # here the Q/DQ graph runs in float on ONNX Runtime (ConvNeXt-B's validation: 3.5 GiB)
)
