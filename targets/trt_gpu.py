"""TensorRT on an NVIDIA GPU: explicitly quantized (Q/DQ) INT8 engine, FP16/FP32 engines as the reference.

The INT8 path follows TensorRT 10's explicit quantization (implicit INT8 calibration is deprecated):
- A Q/DQ ONNX is made with ONNX Runtime's quantizer in TensorRT-compatible settings: symmetric INT8
  (zero point 0) for activations and weights, per-output-channel weight scales (Conv axis 0, MatMul axis 1),
  per-tensor activation scales from our calibration split, Q/DQ only on the *inputs* of Conv and MatMul/Gemm
  (outputs left float) so TensorRT fuses each DQ→Conv/MatMul into an INT8 kernel; LayerNorm, GELU and the
  residual Adds get no Q/DQ and run in FP16 (the builder's FP16 flag is the fallback for float ops).
- The engine is built with the `tensorrt` Python API: ONNX parser, INT8 + FP16 flags, one optimisation
  profile for batch 1..max at the requested size, a workspace limit, a timing cache on disk, and the
  serialized engine written through a temporary file and a rename, with its build settings beside it.
- The runner executes the engine with `execute_async_v3`; its `device_ms` returns the engine's own GPU time
  from CUDA events, which the shared latency harness uses for p50/p90/p99 (copies excluded).

Where TensorRT or a CUDA device is missing (every machine of this project), the Q/DQ ONNX is still built and
its numerics are run by ONNX Runtime on the CPU: a real, runnable proxy of the engine's INT8 arithmetic,
labelled "Q/DQ ONNX on ONNX Runtime CPU (proxy for the TensorRT engine)". No latency is reported for it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from convnext_deploy.pipeline.measure.machine import device_label
from convnext_deploy.targets.base import (
    Artifact,
    Availability,
    BuildRequest,
    CalibrationData,
    LayerProbe,
    Runner,
    Target,
    requires,
)

NAME = "tensorrt"
INSTALL_HINT = ("on a machine with an NVIDIA GPU and driver: pip install 'convnext-deploy[tensorrt]' "
                "(tensorrt ≥ 10, cuda-python)")
PROXY_LABEL = "Q/DQ ONNX on ONNX Runtime CPU (proxy for the TensorRT engine)"
NOT_BUILT_NOTE = "engine not built"
ENGINE_FILE = "model_{precision}.engine"
RECIPE = "tensorrt explicit Q/DQ"


@dataclass(frozen=True)
class TensorRTOptions:
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")  # Q/DQ on these ops' inputs only
    calibrate_method: str = "minmax"  # minmax | percentile | entropy (activation scales, per tensor)
    max_batch: int = 32  # the optimisation profile: batch 1..max_batch, tuned for opt_batch
    opt_batch: int = 1
    workspace_mib: int = 4096
    float_layers: tuple[str, ...] = ()  # checkpoint layer names left without Q/DQ (the accuracy fallback): FP16/FP32 in the engine


_ENGINE_FIELDS = ("max_batch", "opt_batch", "workspace_mib")


def available() -> Availability:
    """Full availability needs the tensorrt package and a CUDA device; the proxy needs ONNX Runtime only."""
    have = requires("tensorrt", hint=INSTALL_HINT)
    if not have.ok:
        return Availability(False, have.reason, proxy=_proxy_ok())
    gpu = _cuda_device()
    if gpu is None:
        return Availability(False, "no CUDA device is visible (nvidia-smi / CUDA driver): the engine needs an NVIDIA GPU",
                            proxy=_proxy_ok())
    return Availability(True, proxy=True)


def _proxy_ok() -> bool:
    return requires("onnxruntime", "onnx", hint="").ok


def _cuda_device() -> str | None:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python ≥ 12.6
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return None
    err, props = cudart.cudaGetDeviceProperties(0)
    return props.name.decode(errors="replace") if int(err) == 0 else "CUDA device 0"


def describe_environment() -> dict:
    env: dict = {"tensorrt": None, "cuda_device": None}
    if requires("tensorrt", hint="").ok:
        import tensorrt as trt

        env["tensorrt"] = trt.__version__
        env["cuda_device"] = _cuda_device()
    if _proxy_ok():
        import onnxruntime as ort

        env["onnxruntime (proxy)"] = ort.__version__
    return env


def build_config(precision: str, options: TensorRTOptions) -> dict:
    """The settings the build really uses: the engine's for every precision, the Q/DQ recipe's for INT8."""
    from convnext_deploy.targets.ort_tools import CALIBRATION_METHODS

    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"tensorrt target offers fp32, fp16 and int8, not {precision}")
    config = {k: v for k, v in asdict(options).items() if k in _ENGINE_FIELDS}
    if precision == "int8":
        if options.calibrate_method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {options.calibrate_method!r}; use one of "
                             f"{', '.join(CALIBRATION_METHODS)}")
        config = {"recipe": RECIPE, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}}
    return config


# ---------------------------------------------------------------- Q/DQ ONNX (runs anywhere)

def make_qdq_onnx(src: Path, dst: Path, calibration: CalibrationData, options: TensorRTOptions, torch_model=None) -> None:
    """ONNX Runtime's static quantizer, set to TensorRT's explicit-quantization rules. Shape inference only
    before it (`optimize=False`): ORT's graph optimisations could emit ORT-only contrib ops TensorRT cannot parse."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType

    from convnext_deploy.targets.ort_tools import calibration_method, quantize

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
                 "OpTypesToExcludeOutputQuantization": list(options.op_types),  # Q/DQ on inputs only
                 "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # MatMul weight (K, N): N is the output channel
             })
    model = onnx.load(str(dst))
    _float_for_other_consumers(model, set(options.op_types))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _float_for_other_consumers(model, quantized_ops: set[str]) -> None:
    """ORT shares one Q/DQ pair among all consumers of a tensor, so the residual Add that reads a block's
    input would read it fake-quantized. TensorRT's rule is Q/DQ on the inputs of quantizable ops only:
    every other consumer reads the float tensor the QuantizeLinear read."""
    from convnext_deploy.targets.qdq import rewire_to_float

    rewire_to_float(model, lambda node, k, q: node.op_type not in quantized_ops
                    and node.op_type not in ("QuantizeLinear", "DequantizeLinear"))


def qdq_report(path: Path) -> dict:
    """What the Q/DQ graph holds, for the report and the conformity tests."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    quantized, float_ops, weight_channels = [], [], []
    for n in g.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        srcs = [producers.get(i) for i in n.input[:2]]
        if all(s is not None and s.op_type == "DequantizeLinear" for s in srcs):
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
                          for c in consumers.get(n.output[0], [])})
    return {"quantized": quantized, "float_conv_matmul": float_ops, "weights": weight_channels,
            "nonzero_zero_points": int(sum(np.count_nonzero(z) for z in zero_points)),
            "dq_consumers": qdq_next_to,
            "qdq_nodes": sum(1 for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))}


# ---------------------------------------------------------------- engine (needs TensorRT and a GPU)

def build_engine(onnx_path: Path, engine_path: Path, precision: str, options: TensorRTOptions,
                 sizes: tuple[int, ...], timing_cache: Path) -> dict:
    """Parse, configure and build a serialized engine; written atomically with its settings beside it."""
    import tensorrt as trt

    from convnext_deploy.pipeline.core.cache import publish_file

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mib) << 20)
    if precision in ("fp16", "int8"):
        cfg.set_flag(trt.BuilderFlag.FP16)  # float ops (LayerNorm, GELU, Adds) fall back to FP16
    if precision == "int8":
        cfg.set_flag(trt.BuilderFlag.INT8)  # honour the Q/DQ nodes (explicit quantization)
    name = network.get_input(0).name
    profile = builder.create_optimization_profile()
    # one profile covers every size the artifact runs at; tuned for the last one (the deployment size)
    lo, hi, opt = min(sizes), max(sizes), sizes[-1]
    mins, opts, maxs = (1, 3, lo, lo), (int(options.opt_batch), 3, opt, opt), (int(options.max_batch), 3, hi, hi)
    profile.set_shape(name, mins, opts, maxs)
    cfg.add_optimization_profile(profile)
    cache = cfg.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    cfg.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build the {precision} engine (see the builder log above)")
    engine_bytes, cache_bytes = bytes(serialized), bytes(cfg.get_timing_cache().serialize())
    publish_file(engine_path, lambda p: p.write_bytes(engine_bytes))
    publish_file(timing_cache, lambda p: p.write_bytes(cache_bytes))  # shared by builds: never half-written
    settings = {"precision": precision, "flags": ["FP16"] * (precision != "fp32") + ["INT8"] * (precision == "int8"),
                "profile": {"min": mins, "opt": opts, "max": maxs},
                "workspace_mib": int(options.workspace_mib), "tensorrt": trt.__version__,
                "device": _cuda_device(), "timing_cache": str(timing_cache)}
    engine_path.with_suffix(".json").write_text(json.dumps(settings, indent=1))
    return settings


def _engine_runner(engine_path: Path, precision: str) -> Runner:
    import tensorrt as trt
    import torch  # CUDA buffers and events; torch is the project's one framework dependency

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    stream = torch.cuda.Stream()

    def execute(batch: np.ndarray) -> tuple[np.ndarray, float]:
        """Logits, and the GPU time of the engine alone (CUDA events around it, without the copies)."""
        # Copies and the engine share one stream, so the engine never reads a half-copied input.
        with torch.cuda.stream(stream):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to("cuda", non_blocking=False)
            context.set_input_shape(inp, tuple(x.shape))
            y = torch.empty(tuple(context.get_tensor_shape(out)), dtype=torch.float32, device="cuda")
            context.set_tensor_address(inp, x.data_ptr())
            context.set_tensor_address(out, y.data_ptr())
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            end.record(stream)
            result = y.cpu().numpy()
        end.synchronize()
        return result, start.elapsed_time(end)

    return Runner(run=lambda batch: execute(batch)[0], runtime=f"tensorrt {trt.__version__}",
                  device=_cuda_device() or "CUDA device", precision=precision, threads=1,
                  device_ms=lambda batch: execute(batch)[1])


# ---------------------------------------------------------------- the target protocol

def build(request: BuildRequest) -> Artifact:
    from convnext_deploy.pipeline.core.cache import cache_root

    options = request.options if request.options is not None else TensorRTOptions()
    config = build_config(request.precision, options)
    out = request.out_dir
    onnx_path = out / f"model_{request.precision}.onnx"
    meta: dict = {"build": config}
    if request.precision == "int8":
        if request.calibration is None or len(request.calibration.images) == 0:
            raise ValueError("INT8 needs calibration data")
        make_qdq_onnx(request.onnx_path, onnx_path, request.calibration, options, request.torch_model)
        meta["qdq"] = qdq_report(onnx_path)
        meta["calibration"] = {"images": len(request.calibration.images),
                               "manifest_sha256": request.calibration.manifest_sha256}
    else:
        shutil.copyfile(request.onnx_path, onnx_path)
    files = [onnx_path]
    avail = available()
    if avail.ok:
        engine = out / ENGINE_FILE.format(precision=request.precision)
        meta["engine"] = build_engine(onnx_path, engine, request.precision, options, request.input_sizes or (224,),
                                      cache_root() / "tensorrt" / "timing.cache")
        files += [engine, engine.with_suffix(".json")]
        return Artifact(NAME, request.precision, files, meta)
    meta["engine_not_built"] = avail.reason
    return Artifact(NAME, request.precision, files, meta, proxy=PROXY_LABEL)


def load_runner(artifact: Artifact, threads: int) -> Runner:
    engines = [f for f in artifact.files if f.suffix == ".engine"]
    if engines and available().ok:
        return _engine_runner(engines[0], artifact.precision)
    if artifact.precision == "fp16":
        raise ValueError("no CPU proxy reproduces the FP16 engine's numerics; it needs TensorRT on a GPU")
    # The proxy: the same ONNX (Q/DQ for INT8) executed by ONNX Runtime on the CPU, with no graph
    # optimisation that could fuse the Q/DQ pairs into kernels of another arithmetic.
    from convnext_deploy.targets.ort_tools import runtime_label, session

    sess = session(artifact.files[0], threads, optimize=False)
    name = sess.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    executed = {"int8": "int8 Q/DQ (fake-quantized: float arithmetic on int8-rounded values)",
                "fp32": "fp32"}[artifact.precision]
    return Runner(run, runtime_label(), device_label(threads), executed, threads, proxy=PROXY_LABEL, timed=False)


def layer_probe(artifacts: dict, images: np.ndarray, threads: int, model=None, calibration=None) -> LayerProbe:
    """The Q/DQ graph as written (the proxy's arithmetic: no fusion turns Q/DQ into other kernels)."""
    from convnext_deploy.targets.qdq import layer_probe as qdq_probe

    return qdq_probe(artifacts["int8"].files[0], artifacts["fp32"].files[0], images, threads, optimize=False,
                     runtime=PROXY_LABEL, kind="proxy", model=model)


TARGET = Target(
    name=NAME, hardware="NVIDIA GPU", precisions=("fp32", "int8"), extra="tensorrt", options=TensorRTOptions,
    available=available, describe_environment=describe_environment, build_config=build_config, build=build,
    load_runner=load_runner, layer_probe=layer_probe, not_built_note=NOT_BUILT_NOTE,
)
