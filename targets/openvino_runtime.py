"""The OpenVINO target's CPU plugin as it runs: the compile settings, the precision each layer really executes in,
the per-layer probe of the INT8 IR and the profiler (the plugin's performance counters).

Belongs to targets.openvino_cpu, which alone calls it. OpenVINO is imported inside the functions.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from convnext_deploy.targets.base import Artifact, LayerProbe, probe_chunks
from convnext_deploy.targets.image_input import example_input, input_shape
from convnext_deploy.targets.openvino_nncf import weight_ops


def compile_config(precision: str | None, threads: int) -> dict:
    """One stream at the latency hint, and the float precision stated: left unset (None, as OpenVINO's users
    compile), the plugin picks BF16 wherever the CPU has it."""
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}


COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")
_BOOKKEEPING = ("Const", "Input", "Output", "Reorder", "Parameter", "Result", "Constant")


def executed_precisions(compiled) -> dict:
    """What the CPU plugin really runs: compute layers by type and runtime precision, other layers by precision, and
    the kernel each compute layer got ("kernels": "FullyConnected u8 (jit_gemm_I8)"): one precision can run in
    kernels of very different speed (on AVX2 without VNNI a u8 GEMM's generic jit_gemm_I8 against a 1×1
    convolution's jit_avx2_1x1_I8)."""
    compute: Counter = Counter()
    kernels: Counter = Counter()
    other: Counter = Counter()
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        kind = str(rt["layerType"].astype(str)) if "layerType" in rt else op.get_type_name()
        prec = str(rt["runtimePrecision"].astype(str)) if "runtimePrecision" in rt else "?"
        if kind in COMPUTE_LAYERS:
            compute[f"{kind} {prec}"] += 1
            kernels[f"{kind} {prec} ({rt['primitiveType'].astype(str) if 'primitiveType' in rt else '?'})"] += 1
        elif kind not in _BOOKKEEPING:
            other[prec] += 1
    return {"compute": dict(compute), "other": dict(other), "kernels": dict(kernels)}


def executed_summary(precision: str, hint: str, layers: dict) -> str:
    ints = sum(v for k, v in layers["compute"].items() if k.split()[-1] in ("u8", "i8"))
    total = sum(layers["compute"].values())
    compute = ", ".join(f"{k} {v}" for k, v in sorted(layers["compute"].items()))
    other = ", ".join(f"{k} {v}" for k, v in sorted(layers["other"].items()))
    return f"{precision}: {ints}/{total} compute layers in int8 ({compute}); other layers {other}; hint {hint}"


def _bypassed(model, names: set[str]):
    """A copy of the INT8 IR whose named layers read their activation before its FakeQuantize."""
    m = model.clone()
    for op in m.get_ordered_ops():
        if op.get_friendly_name() in names:
            src = op.input_value(0).get_node()
            if src.get_type_name() == "FakeQuantize":
                op.input(0).replace_source_output(src.input_value(0))
    m.validate_nodes_and_infer_types()
    return m


def _stream_ir(core, model, images: np.ndarray, config: dict, layer_names: list[str] = ()):
    """Compiled once; yields [logits, each named layer's output] chunk by chunk."""
    m = model.clone()
    ops = {op.get_friendly_name(): op for op in m.get_ordered_ops()}
    extra = [ops[n].output(0) for n in layer_names]
    if extra:
        m.add_outputs(extra)
    compiled = core.compile_model(m, "CPU", config)
    ports = [compiled.output(0)] + [compiled.outputs[j] for j in range(len(compiled.outputs) - len(extra), len(compiled.outputs))]
    for chunk in probe_chunks(images):
        out = compiled(chunk)
        yield [np.array(out[p]) for p in ports]


def layer_probe(artifacts: dict, images: np.ndarray, threads: int, model=None, calibration=None) -> LayerProbe:
    """The INT8 IR as the CPU plugin runs it. Its layers: the Convolution/MatMul ops whose activation passes a
    FakeQuantize, in network order; "in float" = that FakeQuantize bypassed. Weights stay as stored (INT8,
    dequantized): NNCF's SmoothQuant has rescaled them with the activations, so the FP32 IR's would not fit."""
    import openvino as ov

    from convnext_deploy.pipeline.models.convnext import weight_layers

    art = artifacts["int8"]
    core = ov.Core()
    q = core.read_model(str(art.files[0]))
    config = compile_config(art.metadata["build"].get("float_precision", "f32"), threads)
    weights = weight_ops(q)
    layers = [op for op in weights if op.input_value(0).get_node().get_type_name() == "FakeQuantize"]
    names = [op.get_friendly_name() for op in layers]
    modules = None
    if model is not None:  # the weight ops are the checkpoint's Conv/Linear layers in network order
        checkpoint = [n for n, _ in weight_layers(model)]
        if len(checkpoint) == len(weights):
            module_of = dict(zip((op.get_friendly_name() for op in weights), checkpoint))
            modules = [module_of[n] for n in names]

    def run(floated: set, tapped: list):
        return _stream_ir(core, _bypassed(q, set(floated)) if floated else q, images, config, list(tapped))

    return LayerProbe(names, run, f"openvino {ov.__version__} CPU plugin", "real", modules=modules,
                      ops=[op.get_type_name() for op in layers],
                      details={"float_reference": "the same IR with every activation FakeQuantize bypassed "
                                                  "(weights as stored)",
                               "weights": ["int8 (as stored)"] * len(layers)})


def profile(artifact: Artifact, threads: int, input_size: int, runs: int = 20) -> dict:
    """Where the time goes, from the CPU plugin's own performance counters (PERF_COUNT): per-node real time at
    batch 1 (mean of `runs` runs after 3 warm-up runs), the top nodes, the total split by integer kernels (an
    executed kernel of I8/U8 precision), quantize ops and float ops, and the weight layers in execution order."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(artifact.files[0]))
    model.reshape({model.inputs[0]: input_shape(artifact, 1, input_size)})
    config = {**compile_config(artifact.metadata["build"].get("float_precision", "f32"), threads), "PERF_COUNT": True}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    x = example_input(artifact, 1, input_size)
    for _ in range(3):
        request.infer({0: x})
    per_node: dict[str, list] = {}
    for _ in range(runs):
        request.infer({0: x})
        for p in request.profiling_info:
            if str(p.status).endswith("EXECUTED") and not str(p.status).endswith("NOT_EXECUTED"):
                row = per_node.setdefault(p.node_name, [p.node_type, p.exec_type, 0.0])
                row[2] += p.real_time.total_seconds() * 1e3 / runs
    kinds = {"integer kernels": 0.0, "Q/DQ": 0.0, "float ops": 0.0}
    by_op: dict[str, float] = {}
    layers, pending = [], 0.0
    for name, (op, exec_type, ms) in per_node.items():  # insertion order: the order the plugin executed them
        integer = any(t in exec_type.upper() for t in ("_I8", "_U8"))
        kinds["Q/DQ" if op == "FakeQuantize" else "integer kernels" if integer else "float ops"] += ms
        by_op[op] = by_op.get(op, 0.0) + ms
        if op == "FakeQuantize":
            pending += ms
        elif op in COMPUTE_LAYERS:
            layers.append({"node": name, "op": f"{op} ({exec_type})", "ms": ms + pending, "input_quantize_ms": pending})
            pending = 0.0
    top = sorted(per_node.items(), key=lambda kv: -kv[1][2])[:10]
    return {"total_ms": sum(kinds.values()), "by_kind_ms": kinds, "layers": layers,
            "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "top_nodes": [{"node": n, "op": f"{op} ({et})", "ms": ms} for n, (op, et, ms) in top], "runs": runs,
            "input_size": input_size, "batch": 1, "threads": threads,
            "source": "OpenVINO CPU plugin performance counters (PERF_COUNT): real time per executed node"}


def stream_runner(artifact: Artifact, threads: int, input_size: int):
    """OpenVINO's way to a stream's throughput: the CPU plugin compiled with the THROUGHPUT hint (its own number
    of streams over `threads`) and an AsyncInferQueue of its optimal number of requests, one image (batch 1) each.
    Returns run_many(images) → their logits, in order."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(artifact.files[0]))
    model.reshape({model.inputs[0]: [1, 3, input_size, input_size]})
    config = {**compile_config(artifact.metadata["build"].get("float_precision", "f32"), threads),
              "PERFORMANCE_HINT": "THROUGHPUT"}
    config.pop("NUM_STREAMS")
    compiled = core.compile_model(model, "CPU", config)
    queue = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    results: dict[int, np.ndarray] = {}
    queue.set_callback(lambda request, i: results.__setitem__(i, request.get_output_tensor(0).data[0].copy()))

    def run_many(images: np.ndarray) -> np.ndarray:
        results.clear()
        for i in range(len(images)):
            queue.start_async({0: np.ascontiguousarray(images[i:i + 1], dtype=np.float32)}, i)
        queue.wait_all()
        return np.stack([results[i] for i in range(len(images))])

    return run_many
