"""Q/DQ ONNX graphs (ONNX Runtime's INT8 and the TensorRT proxy share this form): one index of a graph's tensors,
which layers are quantized, how a tensor is taken back to float, and the per-layer probe the sensitivity loop runs.

Not a target: a tool the Q/DQ targets call. "Left in float" means a layer reads its activation before
QuantizeLinear, its weight and bias are the FP32 export's own initializers (quantize_static names a quantized
weight `<name>_quantized`), and its output, where it was quantized, reaches its consumers unquantized.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convnext_deploy.targets.base import LayerProbe, probe_chunks

QUANTIZABLE = ("Conv", "MatMul", "Gemm")


@dataclass
class GraphIndex:
    """Each tensor of an ONNX graph by the node that produces it and the nodes that read it. Every Q/DQ rule asks
    "is this input dequantized, and from which QuantizeLinear?": one index answers it for all of them. Rewiring
    node inputs leaves it valid (no node's outputs change)."""

    producer: dict
    consumers: dict

    def dequantize_of(self, tensor: str):
        """The DequantizeLinear node that produces `tensor`, or None."""
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def quantize_of(self, dq):
        """The QuantizeLinear node a DequantizeLinear reads (a Q/DQ pair on an activation), or None (a weight)."""
        node = self.producer.get(dq.input[0])
        return node if node is not None and node.op_type == "QuantizeLinear" else None


def graph_index(graph) -> GraphIndex:
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return GraphIndex({o: n for n in graph.node for o in n.output}, consumers)


def quantized_layers(model, index: GraphIndex | None = None) -> list:
    """The Conv/MatMul/Gemm nodes whose activation and weight both come through DequantizeLinear."""
    index = index or graph_index(model.graph)
    return [n for n in model.graph.node if n.op_type in QUANTIZABLE
            and all(index.dequantize_of(i) is not None for i in n.input[:2])]


def node_names_for(model, torch_model, modules: list[str]) -> list[str]:
    """ONNX node names of the named checkpoint layers (e.g. `stages.2.blocks.0.mlp.fc1`) in a float ONNX
    graph: its Conv/MatMul/Gemm nodes with a weight initializer are the model's Conv/Linear layers in
    network order (the export keeps that order; the count is checked)."""
    from convnext_deploy.pipeline.models.convnext import map_by_network_order

    inits = {i.name for i in model.graph.initializer}
    nodes = [n.name for n in model.graph.node if n.op_type in QUANTIZABLE and len(n.input) > 1 and n.input[1] in inits]
    return map_by_network_order(nodes, torch_model, modules, "ONNX graph")


def rewire_to_float(model, pick, index: GraphIndex | None = None) -> None:
    """Where `pick(node, k, quantize_node)` says so, input k of a node that reads DequantizeLinear(QuantizeLinear(x))
    reads x instead: the one way this project takes a tensor out of INT8 in a Q/DQ graph."""
    index = index or graph_index(model.graph)
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            dq = index.dequantize_of(name)
            q = index.quantize_of(dq) if dq is not None else None
            if q is not None and pick(node, k, q):
                node.input[k] = q.input[0]


def float_layers(model, names: set[str], fp32_inits: dict):
    """A copy of the Q/DQ `model` with the named layers reading float inputs, weights and biases."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    index = graph_index(model.graph)
    inits = {i.name for i in model.graph.initializer}
    added: set[str] = set()
    for node in model.graph.node:  # weights and biases: the FP32 export's own (quantize_static adds `_quantized`)
        if node.name not in names:
            continue
        for k, name in enumerate(node.input):
            dq = index.dequantize_of(name)
            src = dq.input[0] if dq is not None else None
            if src in inits and src.endswith("_quantized") and src[:-len("_quantized")] in fp32_inits:
                orig = src[:-len("_quantized")]
                name_f = f"{orig}_fp32"  # the DQ output often carries the original name already (biases)
                if name_f not in added:
                    model.graph.initializer.append(numpy_helper.from_array(fp32_inits[orig], name_f))
                    added.add(name_f)
                node.input[k] = name_f
    # The layer's activation before quantization; its quantized output (ONNX Runtime quantizes Conv outputs)
    # reaches its consumers in float, and so does its quantized input where other ops read it too (ORT shares one
    # Q/DQ pair: the residual Add reads the same dequantized block input as the depthwise conv).
    layer_ops = {n.name for n in quantized_layers(model, index)}
    shared_inputs = {n.input[0] for n in model.graph.node if n.name in names
                     and index.dequantize_of(n.input[0]) is not None}
    floated = {n.output[0] for n in model.graph.node if n.name in names}
    rewire_to_float(model, lambda node, k, q: node.name in names or q.input[0] in floated
                    or (node.input[k] in shared_inputs and node.name not in layer_ops), index)
    return model


def with_outputs(model, tensors: list[str]):
    from onnx import TensorProto, helper

    model = copy.deepcopy(model)
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    return model


def _stream(model, images: np.ndarray, threads: int, optimize: bool, outputs: list[str] | None = None):
    """One session, the images chunk by chunk: yields [each named output] per chunk."""
    from convnext_deploy.targets.ort_tools import session

    sess = session(model.SerializeToString(), threads, optimize=optimize, low_memory=True)
    name = sess.get_inputs()[0].name
    names = outputs or [sess.get_outputs()[0].name]
    for chunk in probe_chunks(images):
        yield sess.run(names, {name: chunk})


def layer_probe(qdq_path: Path, fp32_path: Path, images: np.ndarray, threads: int = 2, optimize: bool = True,
                runtime: str = "", kind: str = "real", model=None) -> LayerProbe:
    """The Q/DQ graph for the sensitivity loop: a layer "in float" reads its activation before QuantizeLinear and
    the FP32 export's own weight and bias (`float_layers`). `optimize=False`: the arithmetic as written (the
    TensorRT proxy); otherwise as ONNX Runtime runs it, fusions on."""
    import onnx
    from onnx import numpy_helper

    q = onnx.load(str(qdq_path))
    fp32 = onnx.load(str(fp32_path))
    fp32_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    layers = quantized_layers(q)
    by_name = {n.name: n for n in layers}

    def run(floated: set, tapped: list):
        m = float_layers(q, set(floated), fp32_inits) if floated else q
        outs = [by_name[t].output[0] for t in tapped]
        return _stream(with_outputs(m, outs) if outs else m, images, threads, optimize, [m.graph.output[0].name, *outs])

    def check(all_float_logits: np.ndarray) -> dict:
        # the surgery is checked: the all-float graph must compute what the FP32 export computes
        fp32_logits = np.concatenate([c[0] for c in _stream(fp32, images, threads, optimize)])
        return {"float_graph_max_abs_diff": float(np.abs(all_float_logits - fp32_logits).max())}

    modules = None
    if model is not None:  # quantize_static keeps the export's node names: name the layers as the checkpoint does
        from convnext_deploy.pipeline.models.convnext import weight_layers

        names = [n for n, _ in weight_layers(model)]
        module_of = dict(zip(node_names_for(fp32, model, names), names))
        modules = [module_of.get(n.name, n.name) for n in layers]
    return LayerProbe([n.name for n in layers], run, runtime, kind, modules=modules, ops=[n.op_type for n in layers], check=check,
                      details={"weights": [n.input[1].replace("_DequantizeLinear_Output", "") for n in layers]})
