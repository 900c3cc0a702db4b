"""OpenVINO on an x86 CPU: FP32, BF16 and INT8 (NNCF post-training quantization) IRs.

Measured on this project's CPU (Xeon, 2 threads, AVX-512 VNNI and AVX-512 BF16; AMX is *not* exposed to
this VM), ConvNeXt-T reference checkpoint, 224 px, batch 1, p50 of interleaved rounds (README, `make bench`):

    FP32 42.6 ms · BF16 64.1 ms · INT8 (ours) 19.7 ms · INT8 (nncf.quantize defaults) 21.5 ms
    INT8/FP32 2.16×, INT8/BF16 3.26×; top-1 drop vs FP32 0.06 pp (T), 0.04 pp (atto)

- Conversion: `openvino.convert_model` from the exported ONNX. Converting the torch model directly gives the
  same graph (identical op counts, max |Δlogit| 0.0, 40.1 vs 40.5 ms FP32), so the one checked ONNX file
  serves every target. Opset 20 brings LayerNorm and GELU as single MVN and Gelu ops.
- Precision is partly a *runtime* choice: without a hint OpenVINO runs float layers in BF16 on a CPU with
  AVX-512 BF16. Here that is slower than FP32 (no AMX: BF16 FullyConnected 49.7 ms vs FP32 30.3 ms per image),
  so FP32 compiles with INFERENCE_PRECISION_HINT=f32, BF16 with bf16, and the report states what executed,
  read back from the compiled model's runtime graph (compute layers by runtime precision).
- INT8: `nncf.quantize(model, nncf.Dataset(calibration), ...)` on our calibration split. Options measured
  side by side on T (p50 ms / top-1 drop pp; FP32 42.9 ms):
      preset MIXED + model_type TRANSFORMER (ours)   19.7 / 0.06     preset PERFORMANCE + TRANSFORMER  22.0 / 0.03
      preset MIXED without TRANSFORMER               19.7 / —        NNCF defaults (PERFORMANCE)       21.5 / 0.03
      fast_bias_correction=False                     22.1 / 0.01     subset_size=100 (vs 300)          22.0 / 0.01
      GroupConvolution (depthwise) ignored           22.9 / 0.00     float layers in f32, not bf16     22.6 / 0.04
  MIXED (asymmetric activations) is the one option that changes speed. TRANSFORMER is kept: its SmoothQuant
  step protects per-tensor activation scales from the channel outliers ImageNet-trained ConvNeXts carry, at
  no measured cost. Each deploy re-measures the main alternatives ("INT8 recipes compared" in the report).
- Why INT8 is ~2.2× and not 2.5×: per-layer counters (PERF_COUNT) of T INT8: integer FullyConnected 9.5 ms
  (3.2× faster than FP32's 30.3 ms), but the bias/residual Adds 3.0 ms, Transposes 1.7 ms, depthwise
  GroupConvolution 1.6 ms (no faster in INT8 than FP32's 1.5 ms), reorders, norms and GELU stay float.
  `benchmark_app` on the same IRs agrees with our harness within 2% (20.5 vs 20.9 ms INT8, 40.6 vs 41.0 FP32).
- Accuracy control: `nncf.quantize_with_accuracy_control` with a validation function over a labelled
  control set drawn from the training side (disjoint from calibration and evaluation), and `max_drop` from
  the gate file (`deploy --accuracy-control`); the layers it returned to float are listed in the artifact.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.machine import device_label
from targets.base import Artifact, Availability, BuildRequest, Runner, requires

NAME = "openvino"
ACCURACY_CONTROL = True
INSTALL_HINT = "pip install 'convnext-deploy[openvino]' (or `make setup`)"

DEFAULT_INT8 = {
    "recipe": "ours",
    "preset": "mixed",  # asymmetric activations, symmetric weights: measured 2.2 ms faster than performance on T
    "model_type": "transformer",  # NNCF's LayerNorm/GELU-aware scheme (SmoothQuant, MatMul-focused placement)
    "fast_bias_correction": True,
    "subset_size": 300,
    "float_precision": "bf16",  # precision of the layers left float (the CPU plugin's default here)
    "accuracy_control": None,  # max top-1 drop (fraction) for quantize_with_accuracy_control, or None
    "float_layers": [],  # checkpoint layer names kept in float (the accuracy fallback), as nncf's ignored scope
}
PEER_DEFAULT_INT8 = {"recipe": "nncf.quantize defaults"}

INT8_ALTERNATIVES = {
    "nncf.quantize defaults": PEER_DEFAULT_INT8,
    "ours with preset=performance": {"preset": "performance"},
    "ours without model_type=transformer": {"model_type": None},
    "ours with float layers in f32": {"float_precision": "f32"},
}


def available() -> Availability:
    return requires("openvino", "nncf", hint=INSTALL_HINT)


def describe_environment() -> dict:
    import nncf
    import openvino as ov

    core = ov.Core()
    return {"openvino": ov.__version__, "nncf": nncf.__version__,
            "cpu_capabilities": core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def build_config(precision: str, options: dict) -> dict:
    if precision == "int8":
        if options.get("recipe") == PEER_DEFAULT_INT8["recipe"]:
            return {**PEER_DEFAULT_INT8, "float_precision": options.get("float_precision", "bf16")}
        return {**DEFAULT_INT8, **options}
    if precision in ("fp32", "bf16"):
        return {"float_precision": "f32" if precision == "fp32" else "bf16"}
    raise ValueError(f"openvino target offers fp32, bf16 and int8, not {precision}")


WEIGHT_OPS = ("Convolution", "GroupConvolution", "MatMul")


def layer_names_for(model, torch_model, modules: list[str]) -> list[str]:
    """OpenVINO op names of the named checkpoint layers in a float model: its Convolution/GroupConvolution/
    MatMul ops with a constant weight are the Conv/Linear layers in network order (count checked)."""
    from pipeline.model import map_by_network_order

    ops = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in WEIGHT_OPS
           and not _is_activation(op.input_value(1).get_node())]
    return map_by_network_order(ops, torch_model, modules, "OpenVINO model")


def _is_activation(node) -> bool:
    """False for a weight: a Constant, or a chain of Convert/Multiply/Subtract/Reshape/FakeQuantize over one."""
    while node.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape", "FakeQuantize", "Transpose"):
        node = node.input_value(0).get_node()
    return node.get_type_name() != "Constant"


def _nncf_kwargs(config: dict, names: list[str] = ()) -> dict:
    import nncf

    kwargs = {"subset_size": int(config["subset_size"]), "fast_bias_correction": bool(config["fast_bias_correction"]),
              "target_device": nncf.TargetDevice.CPU}
    if config.get("preset"):
        kwargs["preset"] = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                            "mixed": nncf.QuantizationPreset.MIXED}[config["preset"]]
    if config.get("model_type") == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if config.get("ignored_types") or names:
        kwargs["ignored_scope"] = nncf.IgnoredScope(types=list(config.get("ignored_types") or []), names=list(names))
    return kwargs


def quantized_layers(model) -> list[str]:
    """Names of the layers whose inputs pass through a FakeQuantize (what runs in INT8)."""
    out = []
    for op in model.get_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul"):
            if any(inp.get_source_output().get_node().get_type_name() == "FakeQuantize" for inp in op.inputs()):
                out.append(op.get_friendly_name())
    return out


def build(request: BuildRequest) -> Artifact:
    import openvino as ov

    config = build_config(request.precision, request.options)
    model = ov.convert_model(str(request.onnx_path))
    meta: dict = {"build": config, "converted_from": "onnx"}
    if request.precision == "int8":
        import nncf

        if request.calibration is None or len(request.calibration.images) == 0:
            raise ValueError("INT8 needs calibration data")
        calib = nncf.Dataset(list(request.calibration.batches(1)))
        floated = layer_names_for(model, request.torch_model, config["float_layers"]) if config.get("float_layers") else []
        plain = nncf.quantize(model, calib, subset_size=min(300, len(request.calibration.images))) \
            if config.get("recipe") == PEER_DEFAULT_INT8["recipe"] else \
            nncf.quantize(model, calib, **{**_nncf_kwargs(config, floated),
                                           "subset_size": min(int(config["subset_size"]), len(request.calibration.images))})
        model, reverted = plain, []
        if config.get("accuracy_control") is not None:
            if request.validation is None:
                raise ValueError("accuracy control needs a labelled validation set")
            model, reverted = _accuracy_controlled(ov.convert_model(str(request.onnx_path)), calib, request, config, plain)
        meta["quantized_layers"] = len(quantized_layers(model))
        meta["reverted_to_float"] = reverted
        meta["float_layers"] = dict(zip(config.get("float_layers") or [], floated))
        meta["ops"] = dict(Counter(op.get_type_name() for op in model.get_ops() if op.get_type_name() != "Constant"))
        meta["calibration"] = {"images": len(request.calibration.images),
                               "manifest_sha256": request.calibration.manifest_sha256}
    xml = request.out_dir / f"model_{request.precision}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return Artifact(NAME, request.precision, [xml, xml.with_suffix(".bin")], meta)


def _accuracy_controlled(model, calib, request: BuildRequest, config: dict, plain) -> tuple[object, list[str]]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    val = request.validation
    items = [(val.images[i:i + 1], int(val.labels[i])) for i in range(len(val.images))]

    def validate(compiled, data) -> tuple[float, list[float]]:
        # NNCF passes the whole set or a ranking subset; per-sample scores let it rank layers cheaply
        out = compiled.output(0)
        scores = [float(compiled(x)[out].argmax(1)[0] == y) for x, y in data]
        return float(np.mean(scores)), scores

    kwargs = _nncf_kwargs(config)
    kwargs["subset_size"] = min(int(config["subset_size"]), len(request.calibration.images))
    restorer = AdvancedAccuracyRestorerParameters(
        max_num_iterations=int(config.get("accuracy_control_max_iterations") or 2**31),
        ranking_subset_size=min(int(config.get("accuracy_control_ranking_subset") or 300), len(items)))
    controlled = nncf.quantize_with_accuracy_control(
        model, calib, nncf.Dataset(items), validation_fn=validate, max_drop=float(config["accuracy_control"]),
        drop_type=nncf.DropType.ABSOLUTE, advanced_accuracy_restorer_parameters=restorer, **kwargs)
    before, after = set(quantized_layers(plain)), set(quantized_layers(controlled))
    return controlled, sorted(before - after)


def _compile_config(precision: str, threads: int) -> dict:
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": precision}


COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")
_BOOKKEEPING = ("Const", "Input", "Output", "Reorder", "Parameter", "Result", "Constant")


def executed_precisions(compiled) -> dict:
    """What the CPU plugin really runs: compute layers by type and runtime precision, other layers by precision."""
    compute: Counter = Counter()
    other: Counter = Counter()
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        kind = str(rt["layerType"].astype(str)) if "layerType" in rt else op.get_type_name()
        prec = str(rt["runtimePrecision"].astype(str)) if "runtimePrecision" in rt else "?"
        if kind in COMPUTE_LAYERS:
            compute[f"{kind} {prec}"] += 1
        elif kind not in _BOOKKEEPING:
            other[prec] += 1
    return {"compute": dict(compute), "other": dict(other)}


def _summary(precision: str, hint: str, layers: dict) -> str:
    ints = sum(v for k, v in layers["compute"].items() if k.split()[-1] in ("u8", "i8"))
    total = sum(layers["compute"].values())
    compute = ", ".join(f"{k} {v}" for k, v in sorted(layers["compute"].items()))
    other = ", ".join(f"{k} {v}" for k, v in sorted(layers["other"].items()))
    return f"{precision}: {ints}/{total} compute layers in int8 ({compute}); other layers {other}; hint {hint}"


def load_runner(artifact: Artifact, threads: int) -> Runner:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(artifact.files[0]))
    float_precision = artifact.metadata["build"].get("float_precision", "f32")
    config = _compile_config(float_precision, threads)
    compiled_by_shape: dict[tuple, object] = {}

    def compiled_for(shape: tuple):
        # A static shape per input size/batch: the CPU plugin's dynamic-shape path is slower.
        if shape not in compiled_by_shape:
            m = model.clone()
            m.reshape({m.inputs[0]: list(shape)})
            compiled_by_shape[shape] = core.compile_model(m, "CPU", config)
        return compiled_by_shape[shape]

    def run(batch: np.ndarray) -> np.ndarray:
        c = compiled_for(tuple(batch.shape))
        return c(np.ascontiguousarray(batch, dtype=np.float32))[c.output(0)]

    probe = compiled_for((1, 3, 64, 64))
    hint = str(probe.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: ", "").rstrip(">").strip("'")
    executed = _summary(artifact.precision, hint, executed_precisions(probe))
    return Runner(run, f"openvino {ov.__version__} CPU plugin", device_label(threads), executed, threads)


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


def _run_ir(core, model, images: np.ndarray, config: dict, layer_names: list[str] = ()) -> list[np.ndarray]:
    m = model.clone()
    ops = {op.get_friendly_name(): op for op in m.get_ordered_ops()}
    extra = [ops[n].output(0) for n in layer_names]
    if extra:
        m.add_outputs(extra)
    compiled = core.compile_model(m, "CPU", config)
    outs = [compiled(images[i:i + 64]) for i in range(0, len(images), 64)]
    ports = [compiled.output(0)] + [compiled.outputs[j] for j in range(len(compiled.outputs) - len(extra), len(compiled.outputs))]
    return [np.concatenate([o[p] for o in outs]) for p in ports]


def sensitivity(artifacts: dict, images: np.ndarray, threads: int, log, model=None, **_) -> dict:
    """Per INT8 layer (a Convolution/MatMul whose activation passes a FakeQuantize), as the CPU plugin runs it:
    the SQNR of its output against the same IR with every activation FakeQuantize bypassed, and the agreement
    (and logit SQNR) regained when only its own is bypassed. Weights stay as stored (INT8, dequantized):
    NNCF's SmoothQuant has rescaled them with the activations, so the FP32 IR's weights would not fit."""
    import openvino as ov

    from pipeline.model import weight_layers
    from targets.qdq import sqnr_db

    art = artifacts["int8"]
    core = ov.Core()
    q = core.read_model(str(art.files[0]))
    config = _compile_config(art.metadata["build"].get("float_precision", "f32"), threads)
    weight_ops = [op for op in q.get_ordered_ops() if op.get_type_name() in WEIGHT_OPS
                  and not _is_activation(op.input_value(1).get_node())]
    modules = [n for n, _ in weight_layers(model)] if model is not None else []
    module_of = dict(zip([op.get_friendly_name() for op in weight_ops], modules)) if len(modules) == len(weight_ops) else {}
    layers = [op for op in weight_ops if op.input_value(0).get_node().get_type_name() == "FakeQuantize"]
    names = [op.get_friendly_name() for op in layers]
    f_outs = _run_ir(core, _bypassed(q, set(names)), images, config, names)
    q_outs = _run_ir(core, q, images, config, names)
    ref_top1 = f_outs[0].argmax(1)
    base_agree = float((q_outs[0].argmax(1) == ref_top1).mean())
    base_sqnr = sqnr_db(f_outs[0], q_outs[0])
    rows = []
    for i, op in enumerate(layers):
        alone = _run_ir(core, _bypassed(q, {names[i]}), images, config)[0]
        row = {"layer": names[i], "op": op.get_type_name(), "weight": "int8 (as stored)",
               "sqnr_db": sqnr_db(f_outs[i + 1], q_outs[i + 1]),
               "agreement_regained_pp": (float((alone.argmax(1) == ref_top1).mean()) - base_agree) * 100.0,
               "logit_sqnr_gain_db": sqnr_db(f_outs[0], alone) - base_sqnr}
        if names[i] in module_of:
            row["module"] = module_of[names[i]]
        rows.append(row)
        log(f"sensitivity {i + 1}/{len(layers)} {names[i]}: SQNR {row['sqnr_db']:.1f} dB, float alone "
            f"{row['agreement_regained_pp']:+.2f} pp, logits {row['logit_sqnr_gain_db']:+.2f} dB")
    return {"layers": rows, "images": len(images), "int8_agreement": base_agree, "logit_sqnr_db": base_sqnr,
            "float_graph_max_abs_diff": None, "runtime": f"openvino {ov.__version__} CPU plugin", "kind": "real",
            "float_reference": "the same IR with every activation FakeQuantize bypassed (weights as stored)"}
