"""OpenVINO on an x86 CPU: FP32, BF16 and INT8 (NNCF post-training quantization) IRs.

The measured figures behind these choices are in BENCHMARKS.md and each deploy's report; this says what and why.

- Conversion: `openvino.convert_model` from the exported ONNX, in the channels-first graph form
  (pipeline.models.graph_forms): 1×1 convolutions and every channel LayerNorm written as mean/variance, which the
  converter fuses into one MVN op, so no Transpose is left in the blocks and the CPU plugin keeps one blocked
  layout from the stem to the head. On the CPUs measured it ran faster than the channels-last form in FP32 and
  INT8 (BENCHMARKS.md); "ours on the channels-last graph" stays a candidate, so the recipe choice measures both.
  Opset 20 brings GELU as one Gelu op.
- Precision is partly a *runtime* choice: without a hint OpenVINO runs float layers in BF16 on a CPU with
  AVX-512 BF16, which without AMX can be slower than FP32. So FP32 compiles with INFERENCE_PRECISION_HINT=f32,
  BF16 with bf16, and the report states what executed, read back from the compiled model's runtime graph
  (compute layers by runtime precision; targets.openvino_runtime).
- INT8: `nncf.quantize(model, nncf.Dataset(calibration), ...)` on our calibration split (targets.openvino_nncf).
  Ours is preset MIXED (asymmetric activations, symmetric weights: the one NNCF option that changes speed) with
  model_type TRANSFORMER, whose SmoothQuant step protects per-tensor activation scales from the channel outliers
  ImageNet-trained ConvNeXts carry. Each deploy builds the main alternatives (INT8_RECIPES) beside it and
  reports them ("INT8 recipes compared").
- INT8 is not as fast as the integer kernels alone: the bias/residual Adds, Transposes, the depthwise
  GroupConvolution, reorders, norms and GELU stay float (the profiler's per-layer counters show where).
- Accuracy control: `nncf.quantize_with_accuracy_control` with a validation function over the labelled control
  split, held out of the evaluation side (disjoint from calibration and from the images evaluated), and
  `max_drop` from the gate file (`deploy --accuracy-control`); the layers it returned to float are listed in
  the artifact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convnext_deploy.pipeline.measure.machine import device_label
from convnext_deploy.targets.base import (
    Artifact,
    Availability,
    BuildRequest,
    Int8Recipe,
    Runner,
    Target,
    options_config,
    requires,
)
from convnext_deploy.targets.image_input import IMAGE, META_PREFIX, fed, input_shape, takes_image
from convnext_deploy.targets.openvino_nncf import (
    PEER_DEFAULT,
    quantize_int8,
)
from convnext_deploy.targets.openvino_peer import user_paths
from convnext_deploy.targets.openvino_runtime import (
    compile_config,
    executed_precisions,
    executed_summary,
    layer_probe,
    profile,
    stream_runner,
)

NAME = "openvino"
INSTALL_HINT = "pip install 'convnext-deploy[openvino]' (or `make setup`)"
PRESETS = ("performance", "mixed")
FLOAT_PRECISIONS = ("bf16", "f32")


@dataclass(frozen=True)
class OpenVINOOptions:
    recipe: str = "ours"  # or PEER_DEFAULT
    preset: str | None = "mixed"  # asymmetric activations, symmetric weights: faster than performance
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
    Int8Recipe("ours on the channels-last graph", {}, form="channels_last"),
)
_ACCURACY_CONTROL_FIELDS = ("accuracy_control_max_iterations", "accuracy_control_ranking_subset")


# the default on x86 without VNNI: 7-bit weights in every layer, OpenVINO's documented workaround for the saturation
# (its speed there: benchmarks/amd-epyc-zen3-2026-12-07, the recipe "ours with overflow_fix=enable")
SATURATION_SAFE = {"overflow_fix": "enable"}


def saturates_without_vnni(artifact: Artifact) -> bool:
    """NNCF's default overflow fix makes only the first layer's weights 7-bit; the others keep 8 bits, whose u8×s8
    pair sums saturate in oneDNN's kernels on x86 without VNNI. `overflow_fix=enable` makes them all 7-bit."""
    return (artifact.metadata.get("build") or {}).get("overflow_fix") != "enable"


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
        config = options_config(options)
        if options.accuracy_control is None:  # the restorer's settings shape nothing without it
            for k in _ACCURACY_CONTROL_FIELDS:
                config.pop(k)
        return config
    if precision in ("fp32", "bf16"):
        return {"float_precision": "f32" if precision == "fp32" else "bf16"}
    raise ValueError(f"openvino target offers fp32, bf16 and int8, not {precision}")


def build(request: BuildRequest) -> Artifact:
    import openvino as ov

    options = request.options if request.options is not None else OpenVINOOptions()
    config = build_config(request.precision, options)
    model = ov.convert_model(str(request.onnx_path))
    meta: dict = {"build": config, "converted_from": "onnx"}
    if request.precision == "int8":
        model = quantize_int8(model, request, options, meta)
    # .xml + .bin written into the build directory, which the build cache publishes atomically as a whole
    xml = request.out_dir / f"model_{request.precision}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return Artifact(NAME, request.precision, [xml, xml.with_suffix(".bin")], meta)


# the element type the plugin reports as its resolved hint → the value INFERENCE_PRECISION_HINT takes
HINT_NAMES = {"float32": "f32", "f32": "f32", "bfloat16": "bf16", "bf16": "bf16", "float16": "f16", "f16": "f16"}


def load_runner(artifact: Artifact, threads: int) -> Runner:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(artifact.files[0]))
    float_precision = artifact.metadata["build"].get("float_precision", "f32")
    config = compile_config(float_precision, threads)
    current: dict[tuple, object] = {}

    def compiled_for(shape: tuple):
        # A static shape per input size/batch: the CPU plugin's dynamic-shape path is slower. One compiled at a time:
        # each holds its own packed weights (ConvNeXt-B FP32: 0.2-0.4 GiB a shape, four shapes held were 2 GiB a
        # runner), and compiling another takes under a second for B, far less than a pass it serves.
        if shape not in current:
            current.clear()
            m = model.clone()
            m.reshape({m.inputs[0]: list(shape)})
            current[shape] = core.compile_model(m, "CPU", config)
        return current[shape]

    dtype = np.uint8 if takes_image(artifact) else np.float32

    def run(batch: np.ndarray) -> np.ndarray:
        c = compiled_for(tuple(batch.shape))
        return c(np.ascontiguousarray(batch, dtype=dtype))[c.output(0)]

    shape = model.inputs[0].get_partial_shape()  # a graph with a static input (the runtime's GEMM peak) keeps it
    probe = compiled_for(tuple(shape.to_shape()) if shape.is_static else tuple(input_shape(artifact, 1, 64)))
    hint = str(probe.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: ", "").rstrip(">").strip("'")
    layers = executed_precisions(probe)
    settings = {"INFERENCE_PRECISION_HINT": HINT_NAMES.get(hint, hint)}
    return fed(Runner(run, f"openvino {ov.__version__} CPU plugin", device_label(threads),
                      executed_summary(artifact.precision, hint, layers), threads, settings=settings, layers=layers),
               artifact)


def finish(artifact: Artifact, spec, out_dir) -> Artifact:
    """The IR with its input (an image: uint8 NHWC through OpenVINO's PrePostProcessor, mean/std as its
    mean/scale steps) and its labels and input record in rt_info under `convnext_deploy`."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    model = ov.Core().read_model(str(artifact.files[0]))
    record = spec.record()
    if spec.input == IMAGE:
        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32) \
            .mean([255.0 * m for m in record["mean"]]).scale([255.0 * s for s in record["std"]])
        model = ppp.build()
        record["normalisation"] = "OpenVINO PrePostProcessor steps (convert, mean, scale) inside the IR"
    for k, v in spec.metadata(record).items():
        model.set_rt_info(v, [META_PREFIX.rstrip("."), k])
    xml = out_dir / artifact.files[0].name
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return Artifact(NAME, artifact.precision, [xml, xml.with_suffix(".bin")], {**artifact.metadata, "input": record},
                    artifact.proxy)


TARGET = Target(
    name=NAME, hardware="x86 or ARM CPU", precisions=("fp32", "bf16", "int8"), extra="openvino",
    options=OpenVINOOptions, available=available, describe_environment=describe_environment,
    build_config=build_config, build=build, load_runner=load_runner, int8_recipes=INT8_RECIPES,
    peer_default=PEER_DEFAULT, accuracy_control=True, layer_probe=layer_probe, profile=profile,
    user_paths=user_paths, stream_runner=stream_runner, gemm_peak=True, form="channels_first", finish=finish,
    saturates_without_vnni=saturates_without_vnni, saturation_safe=SATURATION_SAFE,
    # ConvNeXt-B FP32 with one shape compiled, measured here (Zen 4): 909 MiB over 338 MiB of weights, the IR's .bin
    # mapped and kept by the compiled model (367) beside the plugin's packed copies (530); ONNX Runtime's session of
    # the same graph 586 MiB (1.7 W, counted as the default 2). The OpenVINO rows' decide was 0.7-1.2 GiB over 2
    fp32_runner_w=2.7,
)
