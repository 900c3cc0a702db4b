"""The graphs a runtime's peak is measured on (pipeline.measure.peak): one large product in each of the two forms a
CPU runtime runs ConvNeXt's pointwise layers in, as ONNX every runtime here reads like an artifact.

- "gemm": y = x·W, x [n, n] a float input, W [n, n] a constant (`MatMul`).
- "conv1x1": the same n³ multiply-accumulates as a 1×1 convolution: x [1, n, h, w] with h·w = n pixels, W [n, n, 1, 1]
  (`Conv`): the channels-first graph form runs its pointwise layers so, and a runtime may give the two forms
  different kernels (OpenVINO 2026.4 on AVX2 without VNNI: its generic `jit_gemm_I8` inner product for the GEMM, a
  dedicated `jit_avx2_1x1_I8` convolution for the 1×1 form).

INT8 is Q/DQ: a per-tensor u8 activation (scale 1/255) and s8 weights (scale 1/127), the U8S8 products both ONNX
Runtime and OpenVINO run ConvNeXt's INT8 layers with. The convolution's output is quantized too (Q → DQ after the
Conv), as in every QDQ model of a quantizer: ONNX Runtime fuses DQ → Conv → Q into QLinearConv and, without the Q,
runs a float Conv on dequantized weights. The GEMM keeps its float output: ONNX Runtime fuses that into
MatMulIntegerToFloat, the form our INT8 recipe's MatMuls take.

Shared by the targets whose runners run it (Target.gemm_peak), through targets.base.peak_onnx. onnx is imported
inside the functions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FORMS = ("gemm", "conv1x1")


def input_shape(form: str, n: int) -> list[int]:
    """The form's input: [n, n] for the GEMM, [1, n, h, w] with h·w = n (h the largest divisor ≤ √n) for the 1×1
    convolution, so both are an n×n×n product."""
    if form == "gemm":
        return [n, n]
    h = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return [1, n, h, n // h]


def write_peak_onnx(path: Path, form: str, int8: bool, n: int) -> list[int]:
    """The form's graph at size n, written to `path`; returns its input shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if form not in FORMS:
        raise ValueError(f"no peak form {form!r}: one of {', '.join(FORMS)}")
    rng = np.random.default_rng(0)
    shape = input_shape(form, n)
    w_shape = (n, n) if form == "gemm" else (n, n, 1, 1)
    op = "MatMul" if form == "gemm" else "Conv"
    if int8:
        inits = [numpy_helper.from_array(rng.integers(-127, 128, w_shape, dtype=np.int8), "w_q"),
                 numpy_helper.from_array(np.array(1 / 255, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
                 numpy_helper.from_array(np.array(1 / 127, np.float32), "w_scale"),
                 numpy_helper.from_array(np.array(0, np.int8), "w_zero")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
                 helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
                 helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
                 helper.make_node(op, ["x_dq", "w_dq"], ["y" if form == "gemm" else "y_f"])]
        if form == "conv1x1":
            # a sum of n products of u8/255 and s8/127 has a spread of about √n/3: u8 around 128 at this scale
            # holds ±6 of them
            inits += [numpy_helper.from_array(np.array(n ** 0.5 / 64, np.float32), "y_scale"),
                      numpy_helper.from_array(np.array(128, np.uint8), "y_zero")]
            nodes += [helper.make_node("QuantizeLinear", ["y_f", "y_scale", "y_zero"], ["y_q"]),
                      helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["y"])]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal(w_shape, dtype=np.float32), "w")]
        nodes = [helper.make_node(op, ["x", "w"], ["y"])]
    out_shape = [n, n] if form == "gemm" else shape
    graph = helper.make_graph(nodes, f"peak_{form}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return shape
