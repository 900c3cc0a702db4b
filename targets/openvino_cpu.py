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
from dataclasses import asdict, dataclass

import numpy as np

from convnext_deploy.pipeline.measure.machine import device_label
from convnext_deploy.targets.base import (
    Artifact,
    Availability,
    BuildRequest,
    Int8Recipe,
    LayerProbe,
    Runner,
    Target,
    probe_chunks,
    requires,
)

NAME = "openvino"
INSTALL_HINT = "pip install 'convnext-deploy[openvino]' (or `make setup`)"
PEER_DEFAULT = "nncf.quantize defaults"  # nncf.quantize(model, dataset) with nothing else set: the peer
PRESETS = ("performance", "mixed")
FLOAT_PRECISIONS = ("bf16", "f32")


@dataclass(frozen=True)
class OpenVINOOptions:
    recipe: str = "ours"  # or PEER_DEFAULT
    preset: str | None = "mixed"  # asymmetric activations, symmetric weights: measured 2.2 ms faster than performance on T
    model_type: str | None = "transformer"  # NNCF's LayerNorm/GELU-aware scheme (SmoothQuant, MatMul-focused placement)
    fast_bias_correction: bool = True
    subset_size: int = 300
    float_precision: str = "bf16"  # precision of the layers left float in INT8 (the CPU plugin's default here)
    accuracy_control: float | None = None  # max top-1 drop (fraction) for quantize_with_accuracy_control, or None
    accuracy_control_max_iterations: int | None = None  # NNCF's restorer: None = until the bound is met
    accuracy_control_ranking_subset: int | None = None  # images ranking the layers to revert: None = 300
    ignored_types: tuple[str, ...] = ()  # op types NNCF leaves unquantized (e.g. GroupConvolution)
    # 7-bit weights against u8×s8 saturation on CPUs without VNNI (OpenVINO's documented workaround): None = NNCF's
    # default, "enable" (every layer), "first_layer_only", "disable"
    overflow_fix: str | None = None
    float_layers: tuple[str, ...] = ()  # checkpoint layer names kept in float (the accuracy fallback), as nncf's ignored scope


# Other INT8 recipes a deploy builds, validates and times next to ours, so the report shows why ours is chosen.
INT8_RECIPES = (
    Int8Recipe(PEER_DEFAULT, {"recipe": PEER_DEFAULT}, smoothed=False),
    Int8Recipe("ours with preset=performance", {"preset": "performance"}),
    Int8Recipe("ours without model_type=transformer", {"model_type": None}),
    Int8Recipe("ours with float layers in f32", {"float_precision": "f32"}),
    Int8Recipe("ours with overflow_fix=enable (7-bit weights)", {"overflow_fix": "enable"}),
)
_ACCURACY_CONTROL_FIELDS = ("accuracy_control_max_iterations", "accuracy_control_ranking_subset")


def available() -> Availability:
    return requires("openvino", "nncf", hint=INSTALL_HINT)


def describe_environment() -> dict:
    import nncf
    import openvino as ov

    core = ov.Core()
    return {"openvino": ov.__version__, "nncf": nncf.__version__,
            "cpu_capabilities": core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def build_config(precision: str, options: OpenVINOOptions) -> dict:
    """The settings the build really uses (recorded in the artifact and keyed by the build cache)."""
    if precision == "int8":
        if options.recipe not in ("ours", PEER_DEFAULT):
            raise ValueError(f"unknown openvino INT8 recipe {options.recipe!r}; use 'ours' or {PEER_DEFAULT!r}")
        if options.float_precision not in FLOAT_PRECISIONS:
            raise ValueError(f"float_precision {options.float_precision!r}: use one of {', '.join(FLOAT_PRECISIONS)}")
        if options.recipe == PEER_DEFAULT:  # the peer sets nothing; layers the fallback floats are still honoured
            return {"recipe": PEER_DEFAULT, "float_precision": options.float_precision,
                    **({"float_layers": list(options.float_layers)} if options.float_layers else {})}
        if options.preset not in (None, *PRESETS):
            raise ValueError(f"preset {options.preset!r}: use one of {', '.join(PRESETS)} (or None)")
        if options.model_type not in (None, "transformer"):
            raise ValueError(f"model_type {options.model_type!r}: use 'transformer' or None")
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}
        if options.accuracy_control is None:  # the restorer's settings shape nothing without it
            for k in _ACCURACY_CONTROL_FIELDS:
                config.pop(k)
        return config
    if precision in ("fp32", "bf16"):
        return {"float_precision": "f32" if precision == "fp32" else "bf16"}
    raise ValueError(f"openvino target offers fp32, bf16 and int8, not {precision}")


WEIGHT_OPS = ("Convolution", "GroupConvolution", "MatMul")


def layer_names_for(model, torch_model, modules: list[str]) -> list[str]:
    """OpenVINO op names of the named checkpoint layers in a float model: its Convolution/GroupConvolution/
    MatMul ops with a constant weight are the Conv/Linear layers in network order (count checked)."""
    from convnext_deploy.pipeline.models.convnext import map_by_network_order

    ops = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in WEIGHT_OPS
           and not _is_activation(op.input_value(1).get_node())]
    return map_by_network_order(ops, torch_model, modules, "OpenVINO model")


def _is_activation(node) -> bool:
    """False for a weight: a Constant, or a chain of Convert/Multiply/Subtract/Reshape/FakeQuantize over one."""
    while node.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape", "FakeQuantize", "Transpose"):
        node = node.input_value(0).get_node()
    return node.get_type_name() != "Constant"


def _nncf_kwargs(options: OpenVINOOptions, names: list[str], n_calibration: int) -> dict:
    """nncf.quantize's arguments for our recipe; `names`: OpenVINO op names kept in float."""
    import nncf

    kwargs = {"subset_size": min(int(options.subset_size), n_calibration),
              "fast_bias_correction": bool(options.fast_bias_correction), "target_device": nncf.TargetDevice.CPU}
    if options.preset:
        kwargs["preset"] = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                            "mixed": nncf.QuantizationPreset.MIXED}[options.preset]
    if options.model_type == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if options.ignored_types or names:
        kwargs["ignored_scope"] = nncf.IgnoredScope(types=list(options.ignored_types), names=list(names))
    if options.overflow_fix:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix(options.overflow_fix))
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

    options = request.options if request.options is not None else OpenVINOOptions()
    config = build_config(request.precision, options)
    model = ov.convert_model(str(request.onnx_path))
    meta: dict = {"build": config, "converted_from": "onnx"}
    if request.precision == "int8":
        import nncf

        if request.calibration is None or len(request.calibration.images) == 0:
            raise ValueError("INT8 needs calibration data")
        n_calib = len(request.calibration.images)
        calib = nncf.Dataset(list(request.calibration.batches(1)))
        floated = layer_names_for(model, request.torch_model, list(options.float_layers)) if options.float_layers else []
        if options.recipe == PEER_DEFAULT:
            scope = {"ignored_scope": nncf.IgnoredScope(names=floated)} if floated else {}
            plain = nncf.quantize(model, calib, subset_size=min(300, n_calib), **scope)  # 300: nncf's own default
        else:
            plain = nncf.quantize(model, calib, **_nncf_kwargs(options, floated, n_calib))
        model, reverted = plain, []
        if options.recipe != PEER_DEFAULT and options.accuracy_control is not None:
            if request.validation is None:
                raise ValueError("accuracy control needs a labelled validation set")
            model, reverted = _accuracy_controlled(ov.convert_model(str(request.onnx_path)), calib, request, options,
                                                   floated, plain)
            meta["accuracy_control"] = {"max_drop": float(options.accuracy_control),
                                        "control_images": len(request.validation.images),
                                        "control_ids_sha256": request.validation.ids_sha256}
        meta["quantized_layers"] = len(quantized_layers(model))
        meta["reverted_to_float"] = reverted
        meta["float_layers"] = dict(zip(options.float_layers, floated))
        meta["ops"] = dict(Counter(op.get_type_name() for op in model.get_ops() if op.get_type_name() != "Constant"))
        meta["calibration"] = {"images": n_calib, "manifest_sha256": request.calibration.manifest_sha256}
    # .xml + .bin written into the build directory, which the build cache publishes atomically as a whole
    xml = request.out_dir / f"model_{request.precision}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return Artifact(NAME, request.precision, [xml, xml.with_suffix(".bin")], meta)


def _accuracy_controlled(model, calib, request: BuildRequest, options: OpenVINOOptions, floated: list[str],
                         plain) -> tuple[object, list[str]]:
    """nncf.quantize_with_accuracy_control on the labelled control split; returns the model and the op names
    it returned to float (quantized in `plain`, not in the result)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    val = request.validation
    items = [(val.images[i:i + 1], int(val.labels[i])) for i in range(len(val.images))]

    def validate(compiled, data) -> tuple[float, list[float]]:
        # NNCF passes the whole set or a ranking subset; per-sample scores let it rank layers cheaply
        out = compiled.output(0)
        scores = [float(compiled(x)[out].argmax(1)[0] == y) for x, y in data]
        return float(np.mean(scores)), scores

    restorer = AdvancedAccuracyRestorerParameters(
        max_num_iterations=int(options.accuracy_control_max_iterations or 2**31),
        ranking_subset_size=min(int(options.accuracy_control_ranking_subset or 300), len(items)))
    controlled = nncf.quantize_with_accuracy_control(
        model, calib, nncf.Dataset(items), validation_fn=validate, max_drop=float(options.accuracy_control),
        drop_type=nncf.DropType.ABSOLUTE, advanced_accuracy_restorer_parameters=restorer,
        **_nncf_kwargs(options, floated, len(request.calibration.images)))
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
    config = _compile_config(art.metadata["build"].get("float_precision", "f32"), threads)
    weight_ops = [op for op in q.get_ordered_ops() if op.get_type_name() in WEIGHT_OPS
                  and not _is_activation(op.input_value(1).get_node())]
    layers = [op for op in weight_ops if op.input_value(0).get_node().get_type_name() == "FakeQuantize"]
    names = [op.get_friendly_name() for op in layers]
    modules = None
    if model is not None:  # the weight ops are the checkpoint's Conv/Linear layers in network order
        checkpoint = [n for n, _ in weight_layers(model)]
        if len(checkpoint) == len(weight_ops):
            module_of = dict(zip((op.get_friendly_name() for op in weight_ops), checkpoint))
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
    model.reshape({model.inputs[0]: [1, 3, input_size, input_size]})
    config = {**_compile_config(artifact.metadata["build"].get("float_precision", "f32"), threads), "PERF_COUNT": True}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, 3, input_size, input_size)).astype(np.float32)
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


TARGET = Target(
    name=NAME, hardware="x86 CPU (Intel)", precisions=("fp32", "bf16", "int8"), extra="openvino",
    options=OpenVINOOptions, available=available, describe_environment=describe_environment,
    build_config=build_config, build=build, load_runner=load_runner, int8_recipes=INT8_RECIPES,
    peer_default=PEER_DEFAULT, accuracy_control=True, layer_probe=layer_probe, profile=profile,
)
