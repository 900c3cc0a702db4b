"""Per-layer sensitivity of a Q/DQ ONNX (ONNX Runtime's INT8 and the TensorRT proxy share this form).

Not a target: a tool the Q/DQ targets call. For each quantized layer (a Conv/MatMul/Gemm fed by
DequantizeLinear) it measures, on a slice of the calibration split,
- SQNR of the layer's output in the INT8 graph against the same graph with every layer in float
  (10·log10(Σ f² / Σ (f − q)²), dB; errors accumulate along the network, as they do on the device);
- the top-1 agreement with FP32 regained when only that layer is left in float (pp).
"Left in float" means its activation is read before QuantizeLinear, its weight and bias are the FP32
export's own initializers (quantize_static names a quantized weight `<name>_quantized`), and its output,
where it was quantized, reaches its consumers unquantized.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

QUANTIZABLE = ("Conv", "MatMul", "Gemm")


def quantized_layers(model) -> list:
    producers = {o: n for n in model.graph.node for o in n.output}
    return [n for n in model.graph.node if n.op_type in QUANTIZABLE
            and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input[:2])]


def node_names_for(model, torch_model, modules: list[str]) -> list[str]:
    """ONNX node names of the named checkpoint layers (e.g. `stages.2.blocks.0.mlp.fc1`) in a float ONNX
    graph: its Conv/MatMul/Gemm nodes with a weight initializer are the model's Conv/Linear layers in
    network order (the export keeps that order; the count is checked)."""
    from pipeline.model import map_by_network_order

    inits = {i.name for i in model.graph.initializer}
    nodes = [n.name for n in model.graph.node if n.op_type in QUANTIZABLE and len(n.input) > 1 and n.input[1] in inits]
    return map_by_network_order(nodes, torch_model, modules, "ONNX graph")


def float_layers(model, names: set[str], fp32_inits: dict):
    """A copy of the Q/DQ `model` with the named layers reading float inputs, weights and biases."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    added: set[str] = set()
    shared_inputs = {n.input[0] for n in model.graph.node if n.name in names
                     and n.input[0] in producers and producers[n.input[0]].op_type == "DequantizeLinear"}
    for node in model.graph.node:
        if node.name not in names:
            continue
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = dq.input[0]
            q = producers.get(src)
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]  # activation before quantization
            elif src in inits and src.endswith("_quantized") and src[:-len("_quantized")] in fp32_inits:
                orig = src[:-len("_quantized")]
                name_f = f"{orig}_fp32"  # the DQ output often carries the original name already (biases)
                if name_f not in added:
                    model.graph.initializer.append(numpy_helper.from_array(fp32_inits[orig], name_f))
                    added.add(name_f)
                node.input[k] = name_f
    # A floated layer's quantized output (ONNX Runtime quantizes Conv outputs) reaches its consumers in float, and
    # so does its quantized input where other ops read it too (ORT shares one Q/DQ pair: the residual Add reads
    # the same dequantized block input as the depthwise conv); those Q/DQ pairs exist only for this layer.
    layer_ops = {n.name for n in quantized_layers(model)}
    floated = {n.output[0] for n in model.graph.node if n.name in names}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            if q.input[0] in floated or (name in shared_inputs and node.name not in layer_ops):
                node.input[k] = q.input[0]
    return model


def with_outputs(model, tensors: list[str]):
    from onnx import TensorProto, helper

    model = copy.deepcopy(model)
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    return model


def _run(model, images: np.ndarray, session_options, outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), sess_options=session_options,
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    names = outputs or [sess.get_outputs()[0].name]
    chunks = [sess.run(names, {name: images[i:i + 64]}) for i in range(0, len(images), 64)]
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(names))]


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)


def layer_sensitivity(qdq_path: Path, fp32_path: Path, images: np.ndarray, threads: int = 2,
                      optimize: bool = True, log=lambda m: None) -> dict:
    """Per quantized layer, in network order: name, op, weight, SQNR (dB) and agreement regained (pp)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not optimize:  # the TensorRT proxy runs the Q/DQ arithmetic as written
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    q = onnx.load(str(qdq_path))
    fp32 = onnx.load(str(fp32_path))
    fp32_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    layers = quantized_layers(q)
    names = {n.name for n in layers}
    f = float_layers(q, names, fp32_inits)
    outs = [n.output[0] for n in layers]
    f_outs = _run(with_outputs(f, outs), images, so, [f.graph.output[0].name, *outs])
    q_outs = _run(with_outputs(q, outs), images, so, [q.graph.output[0].name, *outs])
    # the surgery is checked: the all-float graph must compute what the FP32 export computes
    float_diff = float(np.abs(f_outs[0] - _run(fp32, images, so)[0]).max())
    ref_top1 = f_outs[0].argmax(1)
    base_agree = float((q_outs[0].argmax(1) == ref_top1).mean())
    base_sqnr = sqnr_db(f_outs[0], q_outs[0])
    rows = []
    for i, node in enumerate(layers):
        alone = _run(float_layers(q, {node.name}, fp32_inits), images, so)[0]
        agree = float((alone.argmax(1) == ref_top1).mean())
        rows.append({"layer": node.name, "op": node.op_type, "weight": node.input[1].replace("_DequantizeLinear_Output", ""),
                     "sqnr_db": sqnr_db(f_outs[i + 1], q_outs[i + 1]),
                     "agreement_regained_pp": (agree - base_agree) * 100.0,
                     # continuous where agreement is already ~100 %: how much cleaner the logits get
                     "logit_sqnr_gain_db": sqnr_db(f_outs[0], alone) - base_sqnr})
        log(f"sensitivity {i + 1}/{len(layers)} {node.name}: SQNR {rows[-1]['sqnr_db']:.1f} dB, float alone "
            f"{rows[-1]['agreement_regained_pp']:+.2f} pp, logits {rows[-1]['logit_sqnr_gain_db']:+.2f} dB")
    return {"layers": rows, "images": len(images), "int8_agreement": base_agree, "logit_sqnr_db": base_sqnr,
            "float_graph_max_abs_diff": float_diff}
