"""The ONNX a strongly typed TensorRT network is built from: Q/DQ where TensorRT wants it, float parts in FP16.
Helpers of targets.trt_gpu, which alone imports them.

Q/DQ placement (`tensorrt_placement`, on ONNX Runtime's quantized graph): TensorRT's rule is Q/DQ on the inputs of
Conv and MatMul/Gemm and, for ConvNeXt, between a Conv and the LayerNorm it feeds (NVIDIA ModelOpt PR #1117: without
it TensorRT picks INT8-in/FP16-out Conv kernels, with it INT8-out ones; checked on ConvNeXt-tiny). TensorRT moves
Q/DQ across layout-only ops (Q backward, DQ forward: its explicit-quantization guide), so a pair on the Conv's output,
before its Transpose, builds as ModelOpt's Conv → Transpose → Q → DQ → LayerNorm does; placed there, it goes with the
Conv when that layer is kept float.
LayerNorm itself, GELU and the residual Adds stay float (NVIDIA: normalization runs in FP16/FP32, TensorRT #4084).

FP16 (`to_fp16`): TensorRT 11 builds every network strongly typed (10.12 deprecated weak typing), so each tensor has
the type the ONNX gives it and no builder flag lowers FP32 to FP16 any more: FP16 has to be in the graph, in the form
NVIDIA's ModelOpt AutoCast writes (`convert_to_f16` with `keep_io_types`, which ModelOpt's own INT8 flow runs after
placing Q/DQ). Written here with `onnx` alone: ModelOpt's ONNX extra pins onnx and onnxruntime-gpu versions this
project's CPU stack cannot take.
- Every FP32 initializer and constant becomes FP16, the Q/DQ scales included: a DequantizeLinear's output has its
  scale's type and a QuantizeLinear's scale has its input's type (opset ≥ 19), so FP16 scales keep each INT8 layer
  between FP16 tensors with no Cast between a DequantizeLinear and its Conv or MatMul. A weight channel whose scale
  lies below FP16's normal range is re-rounded onto a grid FP16 states exactly (`_weight_scales_fp16`).
- The graph's inputs and outputs stay FP32 behind one Cast each: the engine's I/O buffers and every runner stay float32.
- LayerNormalization keeps FP32 statistics (`stash_type` 1, ONNX's default, which TensorRT's parser takes as the
  layer's compute precision).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

QDQ_FP32_FILE = "model_int8_qdq_fp32.onnx"  # the quantizer's graph before FP16: the layer probe runs it
COPY_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")  # layout only: TensorRT moves Q/DQ across them
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).tiny)  # below it FP16 is subnormal: a scale there loses its precision


def tensorrt_placement(model, quantized_ops: set[str]) -> None:
    """TensorRT's rule is Q/DQ on the inputs of quantizable ops, and (NVIDIA ModelOpt PR #1117, checked on
    ConvNeXt) between a Conv and the LayerNorm it feeds, so the Conv writes INT8. ORT shares one Q/DQ pair among
    all consumers of a tensor: every other consumer (the residual Add reading a block's input, say) reads the float
    tensor the QuantizeLinear read, and a pair no one reads any more is dropped."""
    from convnext_deploy.targets.qdq import graph_index, rewire_to_float

    index = graph_index(model.graph)

    def feeds_layernorm(node) -> bool:
        readers = index.consumers.get(node.output[0], [])
        return node.op_type == "LayerNormalization" or (node.op_type in COPY_OPS and bool(readers)
                                                         and all(feeds_layernorm(r) for r in readers))

    def conv_output(q) -> bool:
        producer = index.producer.get(q.input[0])
        return producer is not None and producer.op_type == "Conv"

    rewire_to_float(model, lambda node, k, q: node.op_type not in quantized_ops | {"QuantizeLinear", "DequantizeLinear"}
                    and not (conv_output(q) and feeds_layernorm(node)), index)
    _drop_unread_qdq(model)


def _drop_unread_qdq(model) -> None:
    while True:
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        unread = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and not any(o in read for o in n.output)]
        if not unread:
            return
        for n in unread:
            model.graph.node.remove(n)


def to_fp16(src: Path, dst: Path) -> dict:
    """Write `src` with every float tensor but the graph's inputs and outputs in FP16; what changed, for the report."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError(f"{src.name} has subgraphs (If/Loop/Scan); the FP16 conversion handles flat graphs only")
    regridded = _weight_scales_fp16(graph)
    converted = 0
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(_half_tensor(init))
            converted += 1
    for node in graph.node:
        _node_to_fp16(node)
    _keep_io_fp32(graph)
    del graph.value_info[:]  # re-inferred below with the new types, so a type that does not follow is an error
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model)
    types = float_types(model)
    if types["fp32"]:
        raise ValueError(f"FP16 conversion of {src.name} left FP32 tensors: {', '.join(types['fp32'][:3])}")
    onnx.save(model, str(dst))
    return {"float": "fp16", "io": "fp32", "qdq_scales": "fp16", "initializers_converted": converted,
            "fp16_tensors": types["fp16"], "weight_channels_regridded": regridded}


def float_types(model) -> dict:
    """Every float tensor the graph holds or computes, its inputs and outputs aside: how many are FP16, and the
    names of those that are FP32. `model` needs inferred value_info (to_fp16 writes it)."""
    from onnx import TensorProto

    io = {v.name for v in (*model.graph.input, *model.graph.output)}
    typed = [(i.name, i.data_type) for i in model.graph.initializer]
    typed += [(v.name, v.type.tensor_type.elem_type) for v in model.graph.value_info]  # Constant outputs too
    fp32 = sorted({name for name, t in typed if t == TensorProto.FLOAT and name not in io})
    return {"fp16": sum(t == TensorProto.FLOAT16 for name, t in typed if name not in io), "fp32": fp32}


def _half_tensor(tensor):
    from onnx import numpy_helper

    values = numpy_helper.to_array(tensor)
    if np.abs(values).max(initial=0.0) > FP16_MAX:
        raise ValueError(f"{tensor.name} holds values beyond FP16's range ({np.abs(values).max():.3g}); "
                         "it cannot run in FP16")
    return numpy_helper.from_array(values.astype(np.float16), tensor.name)


def _weight_scales_fp16(graph) -> int:
    """Per-channel weight scales below FP16's normal range (a channel of tiny weights: a layer-scale γ near 0 folded
    into the layer) are a few bits wide in FP16, and TensorRT refuses a scale that rounds to 0. Such a channel is
    put on the grid of its scale rounded up to FP16, its INT8 values re-rounded: every weight moves by under half
    a step, as quantizing did, and never clips. Returns how many channels moved."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    moved = 0
    for dq in (n for n in graph.node if n.op_type == "DequantizeLinear"):
        weight, scale = inits.get(dq.input[0]), inits.get(dq.input[1])
        if weight is None or scale is None or weight.data_type != TensorProto.INT8:
            continue
        s = numpy_helper.to_array(scale).astype(np.float32)
        tiny = s < FP16_TINY
        if not tiny.any():
            continue
        half = s.astype(np.float16)
        half = np.where(half.astype(np.float32) < s, np.nextafter(half, np.float16(np.inf)), half)  # rounded up
        half = np.maximum(half, np.finfo(np.float16).smallest_subnormal).astype(np.float32)
        new = np.where(tiny, half, s).astype(np.float32)
        shape = [1] * len(weight.dims)
        if s.ndim:
            shape[next((a.i for a in dq.attribute if a.name == "axis"), 1)] = -1
        w = numpy_helper.to_array(weight).astype(np.float32) * (s / new).reshape(shape)  # ≤ 1: nothing clips
        weight.CopyFrom(numpy_helper.from_array(np.clip(np.round(w), -128, 127).astype(np.int8), weight.name))
        scale.CopyFrom(numpy_helper.from_array(new, scale.name))
        moved += int(tiny.sum())
    return moved


def _node_to_fp16(node) -> None:
    """Constants and Casts that state FP32 state FP16; an op whose output type is an attribute must say FP16 too."""
    from onnx import TensorProto, helper

    for i, attr in enumerate(node.attribute):
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" \
                and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(_half_tensor(attr.t))
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            values = np.array(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
            node.attribute[i].CopyFrom(helper.make_attribute("value", helper.make_tensor(
                "", TensorProto.FLOAT16, values.shape, values.astype(np.float16).tolist())))
        elif attr.name == "dtype" and attr.i == TensorProto.FLOAT:  # EyeLike, Random*: FP32 by attribute
            attr.i = TensorProto.FLOAT16


def _keep_io_fp32(graph) -> None:
    """One Cast after each FP32 graph input and before each FP32 graph output; everything between is FP16."""
    from onnx import TensorProto, helper

    inits = {i.name for i in graph.initializer}
    casts_in, casts_out = [], []
    for inp in graph.input:
        if inp.name in inits or inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{inp.name}_fp16"
        _rename(graph, inp.name, half, outputs=False)
        casts_in.append(helper.make_node("Cast", [inp.name], [half], name=f"{inp.name}_to_fp16",
                                         to=TensorProto.FLOAT16))
    for out in graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{out.name}_fp16"
        _rename(graph, out.name, half, outputs=True)
        casts_out.append(helper.make_node("Cast", [half], [out.name], name=f"{out.name}_to_fp32", to=TensorProto.FLOAT))
    nodes = casts_in + list(graph.node) + casts_out  # kept in topological order, as the checker requires
    del graph.node[:]
    graph.node.extend(nodes)


def _rename(graph, old: str, new: str, outputs: bool) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
        if outputs:
            for k, name in enumerate(node.output):
                if name == old:
                    node.output[k] = new
