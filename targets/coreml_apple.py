"""Core ML on Apple devices: ML Program `.mlpackage`s in FP16 (the reference), W8 (weights INT8) and W8A8.

Conversion and quantization run anywhere coremltools installs; `MLModel.predict` runs only on macOS.

- Route (coremltools 9.0 with torch 2.13, which coremltools warns it has not tested; measured to work):
  layer-scale folded into fc2 (as for ONNX) → `torch.jit.trace` → `ct.convert(convert_to="mlprogram")`.
  `torch.export` also converts the float model, but not the quantized one (below), so every precision
  takes the one traced route. The torch pin is not changed for Core ML.
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
- Accuracy here comes from a proxy, labelled "Core ML proxy (not executed by Core ML)" everywhere it appears:
  FP16: the same folded model in torch half precision (weights and activations FP16, as Core ML computes);
  W8: that model with its weights replaced by the INT8 values and scales read back *from the package*;
  W8A8: the finalized torch model the package was converted from (its weights, activation scales and zero
  points are the package's; its float ops run in FP32 where Core ML runs FP16). Tests check the read-back
  equality. No latency is reported for a proxy. On macOS the runner calls `MLModel.predict`, the label goes,
  and the shared harness times it (compute units ALL; CPU_ONLY as a second row).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

from pipeline.machine import device_label
from targets.base import Artifact, Availability, BuildRequest, CalibrationData, Runner, requires

NAME = "coreml"
INSTALL_HINT = "pip install 'convnext-deploy[coreml]' (coremltools)"
PROXY_LABEL = "Core ML proxy (not executed by Core ML)"
NOT_BUILT_NOTE = "not executed by Core ML"
PACKAGE = "model_{precision}.mlpackage"
CONVERTS_FROM_TORCH = "coremltools ct.convert from the traced torch model (layer-scale folded), ML Program"
PROXY_FILE = "proxy_{precision}.pt"  # TorchScript of the proxy; kept beside the package, not shipped with it

# iOS 16 / macOS 13 run FP16 and weight-only INT8; INT8 activations (quantize/dequantize ops) need iOS 17 / macOS 14.
DEPLOYMENT_TARGET = {"fp16": "iOS16", "w8": "iOS16", "int8": "iOS17"}
DEFAULTS = {
    "fp16": {"compute_precision": "fp16"},
    "w8": {"compute_precision": "fp16", "mode": "linear_symmetric", "weight_threshold": 2048},
    "int8": {"compute_precision": "fp16", "recipe": "LinearQuantizer PTQ", "scheme": "symmetric",
             "activation_dtype": "quint8", "weight_per_channel": True, "observer": "min_max", "calib_batch": 50,
             "float_layers": []},  # checkpoint layer names left in float (the accuracy fallback)
}


@contextlib.contextmanager
def _quiet():
    """coremltools logs, at import and on every call, lines that say nothing about this run (its macOS-only
    bindings missing on Linux, the untested-torch warning, sklearn) and draws progress bars for every pass;
    torch warns about its quantized tensors. All of it is held back, and shown only if the call fails."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    held = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(held):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        sys.stderr.write(held.getvalue()[-4000:])
        raise
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _ct():
    with _quiet():
        import coremltools as ct
    return ct


def _on_macos() -> bool:
    if sys.platform != "darwin":
        return False
    try:
        with _quiet():
            import coremltools.libcoremlpython  # noqa: F401  (the bindings MLModel.predict needs)
    except ImportError:
        return False
    return True


def available() -> Availability:
    with _quiet():
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
        env["coremltools"] = _ct().__version__
        import torch

        env["torch (converter source and proxy)"] = torch.__version__
    return env


def build_config(precision: str, options: dict) -> dict:
    if precision not in DEFAULTS:
        raise ValueError(f"coreml target offers {', '.join(DEFAULTS)}, not {precision}")
    cfg = {**DEFAULTS[precision], "minimum_deployment_target": DEPLOYMENT_TARGET[precision]}
    return {**cfg, **{k: v for k, v in options.items() if k in cfg}}


# ---------------------------------------------------------------- torch side

def _input_layers(info: dict):
    """(ImageType kwargs, torch prefix module or None): exact normalisation either way (see module doc)."""
    import torch

    pp = info["preprocessing"]
    mean, std = np.asarray(pp["mean"], np.float64), np.asarray(pp["std"], np.float64)
    if np.allclose(std, std[0]):
        return {"scale": float(1.0 / (255.0 * std[0])), "bias": [float(-m / std[0]) for m in mean]}, None

    class Normalize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    return {"scale": 1.0 / 255.0, "bias": [0.0, 0.0, 0.0]}, Normalize()


def _package_model(core, info: dict):
    """What is converted: [normalisation] → the (quantized) network → softmax. The proxy is `core` alone:
    it takes normalised input and its logits rank classes exactly as the probabilities do."""
    import torch

    _, prefix = _input_layers(info)

    class Packaged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prefix = prefix if prefix is not None else torch.nn.Identity()
            self.core = core

        def forward(self, x):
            return torch.softmax(self.core(self.prefix(x)), dim=1)

    return Packaged().eval()


def calibrate_w8a8(model, calibration: CalibrationData, config: dict):
    """coremltools' torch-side quantizer used for post-training calibration: observers only, no training."""
    import torch
    from coremltools.optimize.torch.quantization import (LinearQuantizer, LinearQuantizerConfig,
                                                         ModuleLinearQuantizerConfig)

    dtype = {"quint8": torch.quint8, "qint8": torch.qint8}[config["activation_dtype"]]
    qcfg = LinearQuantizerConfig(global_config=ModuleLinearQuantizerConfig(
        quantization_scheme=config["scheme"], activation_dtype=dtype, weight_dtype=torch.qint8,
        weight_per_channel=config["weight_per_channel"], activation_observer=config["observer"],
        weight_observer=config["observer"],
        milestones=[0, 0, 2 ** 31 - 1, 0]),  # observe and fake-quantize from the start; never freeze observers early
        module_name_configs={name: None for name in config.get("float_layers") or []})  # None: left in float
    quantizer = LinearQuantizer(model, qcfg)
    example = torch.from_numpy(calibration.images[:2])
    prepared = quantizer.prepare(example_inputs=(example,), inplace=False)
    prepared.eval()
    quantizer.step()
    with torch.no_grad():
        for batch in calibration.batches(int(config["calib_batch"])):
            prepared(torch.from_numpy(batch))
    return quantizer.finalize(inplace=False).eval()


def _convert(packaged, example, info: dict, precision: str, config: dict, sizes: tuple[int, ...]):
    import torch

    ct = _ct()
    image_kw, _ = _input_layers(info)
    shapes = [(1, 3, s, s) for s in sorted(set(sizes))]
    default = (1, 3, sizes[-1], sizes[-1])
    shape = shapes[0] if len(shapes) == 1 else ct.EnumeratedShapes(shapes=shapes, default=default)
    with torch.no_grad():
        traced = torch.jit.trace(packaged, example)
    return ct.convert(
        traced,
        inputs=[ct.ImageType(name="image", shape=shape, color_layout=ct.colorlayout.RGB, **image_kw)],
        classifier_config=ct.ClassifierConfig(list(info["class_names"])),
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if config["compute_precision"] == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, config["minimum_deployment_target"]),
    )


def _describe(mlmodel, info: dict, precision: str, config: dict) -> None:
    """The package's own metadata: what it is, where it came from, how good the checkpoint was, where the report is."""
    ref = info.get("reference_accuracy") or {}
    mlmodel.author = "convnext-deploy 0.1.0"
    mlmodel.license = info.get("license") or "see the checkpoint's licence"
    mlmodel.version = (info.get("checkpoint_sha256") or "")[:12]
    mlmodel.short_description = (f"{info.get('name', 'ConvNeXt')} image classifier, {len(info['class_names'])} classes, "
                                 f"{precision.upper()} ({'W8A8' if precision == 'int8' else precision.upper()})")
    md = mlmodel.user_defined_metadata
    md["convnext_deploy.variant"] = str(info.get("variant", ""))
    md["convnext_deploy.precision"] = precision
    md["convnext_deploy.minimum_deployment_target"] = config["minimum_deployment_target"]
    md["convnext_deploy.checkpoint_sha256"] = str(info.get("checkpoint_sha256", ""))
    md["convnext_deploy.preprocessing"] = json.dumps(info["preprocessing"])
    md["convnext_deploy.class_names"] = json.dumps(list(info["class_names"]))
    if ref.get("top1") is not None:
        md["convnext_deploy.checkpoint_top1"] = f"{ref['top1']:.4f} on {ref.get('dataset', 'its test split')} (FP32 checkpoint)"
    md["convnext_deploy.report"] = "report.html / report.json of the deploy that built this package (accuracy of this package)"
    mlmodel.input_description["image"] = f"RGB image, {', '.join(str(s) for s in info.get('sizes', ()))} px square"


def _save_package(mlmodel, dst: Path) -> None:
    tmp = dst.with_name(f".tmp-{dst.name}")  # coremltools insists on the .mlpackage suffix
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet():
        mlmodel.save(str(tmp))
    os.replace(tmp, dst)


# ---------------------------------------------------------------- reading a package back

def read_program(package: Path):
    """The MIL program stored in a package (weights from its blob file): what a device will load."""
    ct = _ct()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    with _quiet():
        ml = ct.models.MLModel(str(package), skip_model_load=True)
        spec = ml.get_spec()
        return milproto_load(spec, spec.specificationVersion, str(ml.weights_dir)), spec


def _dequantized(op) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(float weight, int values, scales, dtype) of a constexpr weight-dequantization op."""
    if op.op_type == "constexpr_affine_dequantize":
        q, scale, zp, axis = op.quantized_data.val, op.scale.val, op.zero_point.val, op.axis.val
        shape = [1] * q.ndim
        if np.ndim(scale):
            shape[axis] = -1
        w = (q.astype(np.float32) - np.reshape(zp, shape).astype(np.float32)) * np.reshape(scale, shape).astype(np.float32)
        return w, q, np.asarray(scale), str(q.dtype)
    if op.op_type == "constexpr_blockwise_shift_scale":  # iOS 18 form
        q, scale = op.data.val, op.scale.val
        offset = op.offset.val if op.offset is not None else 0
        reps = [a // b for a, b in zip(q.shape, scale.shape)]
        w = (q.astype(np.float32) - np.kron(np.asarray(offset, np.float32), np.ones(reps)))
        w = w * np.kron(scale.astype(np.float32), np.ones(reps, np.float32))
        return w, q, np.asarray(scale), str(q.dtype)
    raise ValueError(f"{op.op_type} is not a weight dequantization op")


def layer_precisions(prog) -> list[dict]:
    """Per conv/linear layer of a package's program, in network order: weight storage and whether its input
    activation is INT8 (fed by a `dequantize` op)."""
    rows = []
    for op in prog.functions["main"].operations:
        if op.op_type not in ("conv", "linear"):
            continue
        w_op, x_op = op.weight.op, op.x.op
        if w_op is not None and w_op.op_type.startswith("constexpr_"):
            _, _, scale, dtype = _dequantized(w_op)
            weight = f"{dtype} ({'per-channel' if np.size(scale) > 1 else 'per-tensor'})"
        else:
            from coremltools.converters.mil.mil import types

            weight = types.builtin_to_string(op.weight.dtype)
        act = "int8" if (x_op is not None and x_op.op_type == "dequantize") else "float"
        rows.append({"layer": op.name, "op": op.op_type, "weight": weight, "activation": act,
                     "shape": list(op.weight.shape)})
    return rows


def _stored_weights(prog) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(float weight, INT8 scales or None) of every conv/linear in network order, as the package stores them."""
    out = []
    for op in prog.functions["main"].operations:
        if op.op_type in ("conv", "linear"):
            w_op = op.weight.op
            if w_op is not None and w_op.op_type.startswith("constexpr_"):
                w, _, scale, _ = _dequantized(w_op)
                out.append((w, scale))
            else:
                out.append((np.asarray(op.weight.val, np.float32), None))
    return out


def package_weights(package: Path) -> list[np.ndarray]:
    """Dequantized weights of every conv/linear in network order (FP16 constants as stored)."""
    return [w for w, _ in _stored_weights(read_program(package)[0])]


def package_activation_scales(package: Path) -> list[tuple[float, int]]:
    """(scale, zero point) of every activation `quantize` op in the package, in the units of the float tensor.

    The converter rewrites add(dequantize(a), dequantize(b)) → quantize into relative scales (the dequantizes
    get s_a/s_b and 1, the quantize s_out/s_b); the effective scale multiplies the unit s_b back in."""
    prog, _ = read_program(package)
    out = []
    for op in prog.functions["main"].operations:
        if op.op_type != "quantize":
            continue
        zp = op.zero_point.val if op.zero_point is not None else 0
        scale = float(np.asarray(op.scale.val))
        src = op.inputs["input"].op
        if src is not None and src.op_type == "add":
            dq = src.inputs["y"].op
            if dq is not None and dq.op_type == "dequantize" and dq.inputs["input"].op is not None \
                    and dq.inputs["input"].op.op_type == "quantize":
                unit = float(np.asarray(dq.inputs["input"].op.scale.val)) / float(np.asarray(dq.scale.val))
                scale *= unit
        out.append((scale, int(np.asarray(zp))))
    return out


def _align_proxy_to_package(core, prog, precision: str) -> None:
    """Give the proxy the package's own numbers. The converter casts weights to FP16 before quantizing and
    stores scales in FP16, so ~3% of INT8 weights land one step away from torch's own rounding (measured on
    atto); the proxy therefore takes the weights (and W8A8 scales) read back from the package."""
    import re

    import torch

    from pipeline.model import weight_layers

    stored = _stored_weights(prog)
    modules = [m for _, m in weight_layers(core)]
    if [w.shape for w, _ in stored] != [tuple(m.weight.shape) for m in modules]:
        raise RuntimeError(f"the {precision} package's layers do not line up with the torch model's; cannot build its proxy")
    with torch.no_grad():
        for m, (w, scale) in zip(modules, stored):
            m.weight.copy_(torch.from_numpy(w))
            if scale is not None and hasattr(m, "weight_scale"):  # W8A8 reference module fake-quantizes with it
                m.weight_scale.copy_(torch.from_numpy(np.asarray(scale, np.float32)).reshape(m.weight_scale.shape))
        for name, buf in core.named_buffers():
            if re.search(r"_scale_\d+$", name):  # activation scales, FP16 in the package
                buf.copy_(buf.to(torch.float16).to(buf.dtype))


# ---------------------------------------------------------------- the target protocol

def build(request: BuildRequest) -> Artifact:
    import torch

    from pipeline.export import fold_layer_scale
    from pipeline.model import weight_layers

    config = build_config(request.precision, request.options)
    info = dict(request.model_info)
    if not info.get("class_names") or not info.get("preprocessing"):
        raise ValueError("the Core ML target needs the checkpoint's class names and preprocessing (model_info)")
    sizes = tuple(request.input_sizes) or (info["preprocessing"]["input_size"],)
    info["sizes"] = sorted(set(sizes))
    core = fold_layer_scale(request.torch_model)  # same function; γ would otherwise become a quantized constant
    names = [n for n, _ in weight_layers(core)]
    example = torch.zeros(1, 3, sizes[-1], sizes[-1])
    out = request.out_dir
    package = out / PACKAGE.format(precision=request.precision)
    meta: dict = {"build": config, "input": _input_layers(info)[0], "sizes": info["sizes"]}
    with _quiet():
        if request.precision == "int8":
            if request.calibration is None or len(request.calibration.images) == 0:
                raise ValueError("W8A8 needs calibration data")
            core = calibrate_w8a8(core, request.calibration, config)
            meta["calibration"] = {"images": len(request.calibration.images),
                                   "manifest_sha256": request.calibration.manifest_sha256}
        mlmodel = _convert(_package_model(core, info), example, info, request.precision, config, sizes)
        if request.precision == "w8":
            import coremltools.optimize as cto

            op_cfg = cto.coreml.OpLinearQuantizerConfig(mode=config["mode"], dtype="int8",
                                                        weight_threshold=int(config["weight_threshold"]))
            mlmodel = cto.coreml.linear_quantize_weights(mlmodel, cto.coreml.OptimizationConfig(global_config=op_cfg))
    _describe(mlmodel, info, request.precision, config)
    _save_package(mlmodel, package)

    # The proxy: TorchScript of exactly what the accuracy figures are computed with.
    prog, _ = read_program(package)  # read back once: proxy numbers and per-layer precision come from it
    if request.precision in ("w8", "int8"):
        _align_proxy_to_package(core, prog, request.precision)
    with torch.no_grad(), _quiet():
        if request.precision in ("fp16", "w8"):
            traced = torch.jit.trace(core.half(), example.half())
        else:
            traced = torch.jit.trace(core, example)
    proxy = out / PROXY_FILE.format(precision=request.precision)
    traced.save(str(proxy.with_suffix(".tmp")))
    os.replace(proxy.with_suffix(".tmp"), proxy)

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


_EXECUTED = {
    "fp16": "fp16 (torch half: FP16 weights and activations)",
    "w8": "int8 weights read back from the package, dequantized; FP16 compute",
    "int8": "W8A8 fake-quantized with the package's weights and activation scales; float ops in FP32 (Core ML: FP16)",
}


def load_runner(artifact: Artifact, threads: int, compute_units: str = "ALL") -> Runner:
    if available().ok:
        return _coreml_runner(artifact, compute_units)
    return proxy_runner(artifact, threads)


def proxy_runner(artifact: Artifact, threads: int) -> Runner:
    import torch

    torch.set_num_threads(threads)
    path = artifact.files[0].parent / artifact.metadata["proxy_file"]
    with _quiet():  # torch marks TorchScript loading deprecated; it is the one format the traced proxy saves in
        module = torch.jit.load(str(path)).eval()
    half = artifact.precision in ("fp16", "w8")

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.no_grad(), _quiet():
            y = module(x.half() if half else x)
        return y.float().numpy()

    return Runner(run, f"torch {torch.__version__} CPU", device_label(threads),
                  _EXECUTED[artifact.precision], threads, proxy=PROXY_LABEL, timed=False)


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

    ct = _ct()
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


def _floated(q, float_core, paths: set[str]):
    """A copy of the finalized W8A8 model with the named layers reading their activation before its
    quantize/dequantize and holding the FP32 weights (the package's float layers would be FP16)."""
    import copy

    import torch

    m = copy.deepcopy(q)
    for node in list(m.graph.nodes):
        if node.op == "call_module" and node.target in paths:
            dq = node.args[0]
            if getattr(dq, "op", None) == "call_method" and dq.target == "dequantize" \
                    and getattr(dq.args[0], "target", None) is torch.quantize_per_tensor:
                node.replace_input_with(dq, dq.args[0].args[0])
            sub = m.get_submodule(node.target)
            inner = f"{node.target}.linear" if hasattr(sub, "linear") else node.target  # Linear+GELU fused
            parent, _, leaf = inner.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, copy.deepcopy(float_core.get_submodule(node.target)))
    m.recompile()
    return m


def sensitivity(artifacts: dict, images: np.ndarray, threads: int, log, model=None, calibration=None, **_) -> dict:
    """Per layer of the W8A8 proxy (the finalized model with the package's weights and scales, rebuilt from the
    same calibration and checked against the saved proxy): SQNR of its output against the proxy with every
    layer's input activation and weights in float, and the agreement (and logit SQNR) regained with it alone in
    float. Norm and residual quantizers stay, as they are separate ops in the package."""
    import torch

    from pipeline.export import fold_layer_scale
    from targets.qdq import sqnr_db

    if model is None or calibration is None:
        raise ValueError("Core ML sensitivity rebuilds the W8A8 proxy: it needs the model and its calibration data")
    art = artifacts["int8"]
    torch.set_num_threads(threads)
    float_core = fold_layer_scale(model)
    with _quiet():
        q = calibrate_w8a8(fold_layer_scale(model), calibration, art.metadata["build"])
        _align_proxy_to_package(q, read_program(art.files[0])[0], "int8")
    saved = proxy_runner(art, threads).run(images[:32])
    with torch.no_grad(), _quiet():
        rebuilt_diff = float(np.abs(q(torch.from_numpy(images[:32])).numpy() - saved).max())
    # the quantized conv/linear modules (a fused Linear+GELU holds its reference Linear as `.linear`)
    paths = [n.target for n in q.graph.nodes if n.op == "call_module"
             and any(hasattr(q.get_submodule(n.target), a) for a in ("weight_scale", "linear"))]

    def run(m, hooks: list[str] = ()) -> list[np.ndarray]:
        got: dict[str, list] = {p: [] for p in hooks}
        handles = [m.get_submodule(p).register_forward_hook(lambda _m, _i, o, p=p: got[p].append(o.detach().numpy()))
                   for p in hooks]
        with torch.no_grad(), _quiet():
            logits = np.concatenate([m(torch.from_numpy(images[i:i + 64])).numpy() for i in range(0, len(images), 64)])
        for h in handles:
            h.remove()
        return [logits] + [np.concatenate(got[p]) for p in hooks]

    f_outs = run(_floated(q, float_core, set(paths)), paths)
    q_outs = run(q, paths)
    ref_top1 = f_outs[0].argmax(1)
    base_agree = float((q_outs[0].argmax(1) == ref_top1).mean())
    base_sqnr = sqnr_db(f_outs[0], q_outs[0])
    rows = []
    for i, p in enumerate(paths):
        alone = run(_floated(q, float_core, {p}))[0]
        rows.append({"layer": p, "module": p, "op": type(float_core.get_submodule(p)).__name__.lower(),
                     "weight": "int8 (package)", "sqnr_db": sqnr_db(f_outs[i + 1], q_outs[i + 1]),
                     "agreement_regained_pp": (float((alone.argmax(1) == ref_top1).mean()) - base_agree) * 100.0,
                     "logit_sqnr_gain_db": sqnr_db(f_outs[0], alone) - base_sqnr})
        log(f"sensitivity {i + 1}/{len(paths)} {p}: SQNR {rows[-1]['sqnr_db']:.1f} dB, float alone "
            f"{rows[-1]['agreement_regained_pp']:+.2f} pp, logits {rows[-1]['logit_sqnr_gain_db']:+.2f} dB")
    return {"layers": rows, "images": len(images), "int8_agreement": base_agree, "logit_sqnr_db": base_sqnr,
            "float_graph_max_abs_diff": None, "rebuilt_proxy_max_abs_diff": rebuilt_diff,
            "runtime": PROXY_LABEL, "kind": "proxy",
            "float_reference": "the proxy with every conv/linear input and weight in float (norm/add quantizers kept)"}
