"""Core ML on Apple devices: ML Program `.mlpackage`s in FP16 (the reference), W8 (weights INT8) and W8A8.

Conversion and quantization run anywhere coremltools installs; `MLModel.predict` runs only on macOS.

- Route (targets.coreml_convert): layer-scale folded into fc2 (as for ONNX) → `torch.jit.trace` →
  `ct.convert(convert_to="mlprogram")`. `torch.export` also converts the float model, but not the quantized one
  (below), so every precision takes the one traced route. The torch pin is not changed for Core ML, though
  coremltools warns it has not tested that torch: the tests convert and check every precision.
- Input: an image (`ct.ImageType`, RGB, one enumerated shape per size the package is run at). When the
  checkpoint's std is the same on every channel, its normalisation is exactly Core ML's `scale`/`bias`
  pre-processing; otherwise the image is scaled to [0, 1] and the per-channel mean/std is a first layer of
  the model (Core ML's `scale` is a single number, so folding a per-channel std there would change the model).
  Output: a classifier (class labels from the checkpoint, softmax probabilities).
- W8: `coremltools.optimize.coreml.linear_quantize_weights`, symmetric per-channel INT8 for every weight of at
  least `weight_threshold` elements (coremltools' default 2048: smaller ones stay FP16); compute stays FP16.
  Minimum deployment target iOS 16 / macOS 13, as for FP16.
- W8A8: activation calibration on the package (`linear_quantize_activations`) calls `MLModel.predict`, so it
  fails off macOS. The torch-side `coremltools.optimize.torch.quantization.LinearQuantizer` is the route that
  runs here: prepare → run the calibration split through it in eval mode with min/max observers (post-training:
  no weight update) → `finalize()` → trace → convert. The package gets INT8 `quantize`/`dequantize` on
  activations and INT8 per-channel weights; it needs iOS 17 / macOS 14.
- Accuracy off macOS comes from a torch proxy of each package (targets.coreml_proxy), labelled as such
  everywhere; no latency is reported for it. On macOS the runner calls `MLModel.predict`, the label goes, and
  the shared harness times it (compute units ALL; CPU_ONLY as a second row, `extra_runners`).
"""
from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass

import numpy as np

from convnext_deploy.targets.base import (
    Artifact,
    Availability,
    BuildRequest,
    LayerProbe,
    Runner,
    Target,
    calibration_record,
    options_config,
    requires,
)
from convnext_deploy.targets.coreml_convert import (
    calibrate_w8a8,
    convert,
    describe,
    input_layers,
    package_model,
    save_package,
)
from convnext_deploy.targets.coreml_proxy import (
    PROXY_LABEL,
    align_to_package,
    layer_precisions,
    load_ct,
    proxy_runner,
    quiet,
    read_program,
    save_proxy,
)
from convnext_deploy.targets.coreml_proxy import layer_probe as proxy_layer_probe

NAME = "coreml"
INSTALL_HINT = "pip install 'convnext-deploy[coreml]' (coremltools)"
NOT_BUILT_NOTE = "not executed by Core ML"
PACKAGE = "model_{precision}.mlpackage"
CONVERTS_FROM_TORCH = "coremltools ct.convert from the traced torch model (layer-scale folded), ML Program"

# iOS 16 / macOS 13 run FP16 and weight-only INT8; INT8 activations (quantize/dequantize ops) need iOS 17 / macOS 14.
DEPLOYMENT_TARGET = {"fp16": "iOS16", "w8": "iOS16", "int8": "iOS17"}
# the options each precision reads (and records in its build config)
PRECISION_OPTIONS = {
    "fp16": ("compute_precision",),
    "w8": ("compute_precision", "mode", "weight_threshold"),
    "int8": ("compute_precision", "recipe", "scheme", "activation_dtype", "weight_per_channel", "observer",
             "calib_batch", "float_layers"),
}


@dataclass(frozen=True)
class CoreMLOptions:
    compute_precision: str = "fp16"  # fp16 | fp32
    mode: str = "linear_symmetric"  # W8: linear_quantize_weights mode
    weight_threshold: int = 2048  # W8: weights with fewer elements stay FP16 (coremltools' default)
    recipe: str = "LinearQuantizer PTQ"  # W8A8: coremltools' torch-side quantizer, observers only
    scheme: str = "symmetric"
    activation_dtype: str = "quint8"  # quint8 | qint8
    weight_per_channel: bool = True
    observer: str = "min_max"
    calib_batch: int = 50
    float_layers: tuple[str, ...] = ()  # checkpoint layer names left in float (the accuracy fallback)


def _on_macos() -> bool:
    if sys.platform != "darwin":
        return False
    try:
        with quiet():
            import coremltools.libcoremlpython  # noqa: F401  (the bindings MLModel.predict needs)
    except ImportError:
        return False
    return True


def available() -> Availability:
    with quiet():
        have = requires("coremltools", hint=INSTALL_HINT)
    if not have.ok:
        return have
    if not _on_macos():
        return Availability(False, f"Core ML prediction needs macOS (this is {platform.system()}): packages are "
                                   "converted and quantized here, accuracy comes from a torch proxy, latency is "
                                   "not measured", proxy=True)
    return Availability(True)


def describe_environment() -> dict:
    env: dict = {"coremltools": None, "macos": platform.mac_ver()[0] or None}
    if requires("coremltools", hint="").ok:
        env["coremltools"] = load_ct().__version__
        import torch

        env["torch (converter source and proxy)"] = torch.__version__
    return env


def build_config(precision: str, options: CoreMLOptions | None) -> dict:
    """The settings `precision` is built with: its options' values and its minimum deployment target."""
    if precision not in PRECISION_OPTIONS:
        raise ValueError(f"coreml target offers {', '.join(PRECISION_OPTIONS)}, not {precision}")
    options = options if options is not None else CoreMLOptions()
    return {**options_config(options, PRECISION_OPTIONS[precision]),
            "minimum_deployment_target": DEPLOYMENT_TARGET[precision]}


def build(request: BuildRequest) -> Artifact:
    import torch

    from convnext_deploy.pipeline.models.convnext import weight_layers
    from convnext_deploy.pipeline.models.convnext import fold_layer_scale

    config = build_config(request.precision, request.options)
    info = dict(request.model_info)
    if not info.get("class_names") or not info.get("preprocessing"):
        raise ValueError("the Core ML target needs the checkpoint's class names and preprocessing (model_info)")
    sizes = tuple(request.input_sizes) or (info["preprocessing"]["input_size"],)
    info["sizes"] = sorted(set(sizes))
    core = fold_layer_scale(request.torch_model)  # same function; γ would otherwise become a quantized constant
    names = [n for n, _ in weight_layers(core)]
    example = torch.zeros(1, 3, sizes[-1], sizes[-1])
    package = request.out_dir / PACKAGE.format(precision=request.precision)
    meta: dict = {"build": config, "input": input_layers(info)[0], "sizes": info["sizes"]}
    with quiet():
        if request.precision == "int8":
            calibration = calibration_record(request.calibration, "W8A8")
            core = calibrate_w8a8(core, request.calibration, config)
            meta["calibration"] = calibration
        mlmodel = convert(package_model(core, info), example, info, request.precision, config, sizes)
        if request.precision == "w8":
            import coremltools.optimize as cto

            op_cfg = cto.coreml.OpLinearQuantizerConfig(mode=config["mode"], dtype="int8",
                                                        weight_threshold=int(config["weight_threshold"]))
            mlmodel = cto.coreml.linear_quantize_weights(mlmodel, cto.coreml.OptimizationConfig(global_config=op_cfg))
    describe(mlmodel, info, request.precision, config)
    save_package(mlmodel, package)

    prog, _ = read_program(package)  # read back once: proxy numbers and per-layer precision come from it
    if request.precision in ("w8", "int8"):
        align_to_package(core, prog, request.precision)
    proxy = save_proxy(core, example, request.precision, request.out_dir)

    layers = layer_precisions(prog)
    if len(layers) == len(names):  # network order on both sides: name the layers as the checkpoint does
        for row, name in zip(layers, names):
            row["module"] = name
    meta["layers"] = layers
    meta["layer_summary"] = {
        "conv_linear": len(layers),
        "int8_weights": sum(r["weight"].startswith("int8") for r in layers),
        "int8_activations": sum(r["activation"] == "int8" for r in layers),
    }
    meta["proxy_file"] = proxy.name
    meta["minimum_deployment_target"] = config["minimum_deployment_target"]
    avail = available()
    if not avail.ok:
        meta["not_executed"] = avail.reason
    return Artifact(NAME, request.precision, [package], meta, proxy=None if avail.ok else PROXY_LABEL)


def load_runner(artifact: Artifact, threads: int) -> Runner:
    """`MLModel.predict` with compute units ALL on macOS; the torch proxy (untimed) everywhere else."""
    if available().ok:
        return _coreml_runner(artifact, "ALL")
    return proxy_runner(artifact, threads)


def latency_runners(artifact: Artifact, threads: int) -> dict[str, Runner]:
    """Extra timed runners beside the default one: on macOS, the same package on the CPU alone."""
    if not available().ok:
        return {}
    return {"CPU_ONLY": _coreml_runner(artifact, "CPU_ONLY")}


def to_pixels(batch: np.ndarray, preprocessing: dict) -> np.ndarray:
    """Normalised (N, 3, H, W) float → the uint8 RGB images (N, H, W, 3) they came from (exact for images
    preprocessed by calibration.preprocess, whose pixels are uint8 before normalisation)."""
    mean = np.asarray(preprocessing["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(preprocessing["std"], np.float32).reshape(1, 3, 1, 1)
    px = np.rint((batch * std + mean) * 255.0)
    return np.clip(px, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _coreml_runner(artifact: Artifact, compute_units: str) -> Runner:
    """MLModel.predict on macOS: images in, class probabilities out (in the checkpoint's class order)."""
    from PIL import Image

    ct = load_ct()
    model = ct.models.MLModel(str(artifact.files[0]), compute_units=getattr(ct.ComputeUnit, compute_units))
    probs = model.get_spec().description.predictedProbabilitiesName
    labels = json.loads(model.user_defined_metadata["convnext_deploy.class_names"])
    preprocessing = json.loads(model.user_defined_metadata["convnext_deploy.preprocessing"])

    def run(batch: np.ndarray) -> np.ndarray:
        outs = model.predict([{"image": Image.fromarray(p, "RGB")} for p in to_pixels(batch, preprocessing)])
        outs = outs if isinstance(outs, list) else [outs]
        return np.asarray([[o[probs][c] for c in labels] for o in outs], np.float32)

    return Runner(run, f"Core ML (coremltools {ct.__version__}) compute units {compute_units}",
                  f"{platform.machine()} macOS {platform.mac_ver()[0]}", artifact.precision, 0)


def layer_probe(artifacts: dict, images: np.ndarray, threads: int, model=None, calibration=None) -> LayerProbe:
    """The W8A8 proxy rebuilt with this module's calibrate_w8a8, as build() ran it (targets.coreml_proxy)."""
    return proxy_layer_probe(artifacts, images, threads, model, calibration, calibrate=calibrate_w8a8)


TARGET = Target(
    name=NAME, hardware="Apple (Neural Engine, GPU, CPU)", precisions=("fp16", "w8", "int8"), extra="coreml",
    options=CoreMLOptions, available=available, describe_environment=describe_environment, build_config=build_config,
    build=build, load_runner=load_runner, converter=CONVERTS_FROM_TORCH, int8_recipes=(),
    extra_runners=latency_runners, layer_probe=layer_probe, not_built_note=NOT_BUILT_NOTE,
)
