"""The TensorRT target's engine: building a serialized engine and running it. Needs the tensorrt package and a
CUDA device; the rest of the target (its Q/DQ ONNX and the CPU proxy) lives in targets.trt_gpu, which alone calls
this module.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convnext_deploy.targets.base import Runner


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
                 sizes: tuple[int, ...], timing_cache: Path) -> dict:
    """Parse, configure and build a serialized engine from the ONNX (Q/DQ for INT8); written atomically with its
    settings beside it. `options`: the target's TensorRTOptions (workspace and batch profile)."""
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
                "device": cuda_device(), "timing_cache": str(timing_cache)}
    engine_path.with_suffix(".json").write_text(json.dumps(settings, indent=1))
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
                  device=cuda_device() or "CUDA device", precision=precision, threads=1,
                  device_ms=lambda batch: execute(batch)[1])
