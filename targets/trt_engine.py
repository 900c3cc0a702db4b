"""The TensorRT target's engine: building a serialized engine and running it. Needs the tensorrt package and a
CUDA device; the rest of the target (its ONNX, Q/DQ and FP16, and the CPU proxy) lives in targets.trt_gpu, which
alone calls this module.

The network is strongly typed: every tensor's type comes from the ONNX (FP16 float parts, INT8 from the Q/DQ
nodes), never from builder flags. TensorRT 11 removed the weak-typing flags (`BuilderFlag.FP16`, `INT8`, ...)
and builds nothing else; 10.12 deprecated them. `tests/test_trt_api.py` checks every `tensorrt` name used here
against the Python API documented for the supported range.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from convnext_deploy.targets.base import Runner

# pyproject.toml's `tensorrt` extra and constraints.txt pin the same range (tests/test_trt_api.py keeps them equal):
# from 10.12, where NVIDIA made strong typing the build mode (weak typing deprecated), through 11.x, where it is the
# only one; 12 may drop what 11 only deprecated.
SUPPORTED_TENSORRT = "tensorrt>=10.12,<12"
_LOWEST, _BEYOND = (10, 12), (12, 0)


def supported(version: str) -> bool:
    """Whether a tensorrt version string lies in SUPPORTED_TENSORRT."""
    major_minor = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    return _LOWEST <= major_minor < _BEYOND


def network_flags(trt) -> int:
    """create_network's flags for a strongly typed network: 10.x builds one only when the creation flag asks;
    11.x builds nothing else and keeps the flag only as a deprecated no-op, so it is not passed there."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def cuda_device() -> str | None:
    """The name of CUDA device 0, or None where cuda-python or a device is missing."""
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


def build_engine(onnx_path: Path, engine_path: Path, precision: str, options,
                 sizes: tuple[int, ...], timing_cache: Path, image: bool = False) -> dict:
    """Parse, configure and build a serialized engine from the strongly typed ONNX (FP16 float parts and INT8 Q/DQ
    for INT8, FP16 for fp16, FP32 for fp32: the engine runs the types the graph states); written atomically with its
    settings beside it. `options`: the target's TensorRTOptions (workspace and batch profile); `image`: the input is
    uint8 NHWC pixels (targets.image_input), else a float NCHW tensor."""
    import tensorrt as trt

    from convnext_deploy.pipeline.core.cache import publish_file

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mib) << 20)
    name = network.get_input(0).name
    profile = builder.create_optimization_profile()
    # one profile covers every size the artifact runs at; tuned for the last one (the deployment size)
    lo, hi, opt = min(sizes), max(sizes), sizes[-1]
    shape = (lambda b, s: (b, s, s, 3)) if image else (lambda b, s: (b, 3, s, s))
    mins, opts, maxs = shape(1, lo), shape(int(options.opt_batch), opt), shape(int(options.max_batch), hi)
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
    settings = {"precision": precision, "network": "strongly typed", "onnx": onnx_path.name,
                "profile": {"min": mins, "opt": opts, "max": maxs},
                "workspace_mib": int(options.workspace_mib), "tensorrt": trt.__version__,
                "device": cuda_device(), "timing_cache": str(timing_cache)}
    text = json.dumps(settings, indent=1)
    publish_file(engine_path.with_suffix(".json"), lambda p: p.write_text(text))
    return settings


def engine_runner(engine_path: Path, precision: str) -> Runner:
    """The engine run with execute_async_v3; `device_ms` is the engine's own GPU time, which the latency harness
    prefers to the host clock (the copies are not the engine's)."""
    import tensorrt as trt
    import torch  # CUDA buffers and events; torch is the project's one framework dependency

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    stream = torch.cuda.Stream()
    dtype = np.uint8 if engine.get_tensor_dtype(inp) == trt.DataType.UINT8 else np.float32  # an image-input engine

    def execute(batch: np.ndarray) -> tuple[np.ndarray, float]:
        """Logits, and the GPU time of the engine alone (CUDA events around it, without the copies)."""
        # Copies and the engine share one stream, so the engine never reads a half-copied input.
        with torch.cuda.stream(stream):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=dtype)).to("cuda", non_blocking=False)
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
                  device=cuda_device() or "CUDA device", precision=precision, threads=1,
                  device_ms=lambda batch: execute(batch)[1])
