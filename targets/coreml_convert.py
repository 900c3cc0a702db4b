"""The Core ML target's conversion, torch side: the model a package is converted from (normalisation, network,
softmax), the W8A8 calibration with coremltools' torch quantizer, `ct.convert` and the package's own metadata.

Belongs to targets.coreml_apple, which alone calls it (the reasons for each choice are in its module doc).
coremltools is imported inside the functions.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from convnext_deploy.targets.base import CalibrationData
from convnext_deploy.targets.coreml_proxy import load_ct, quiet


def input_layers(info: dict):
    """(ImageType kwargs, torch prefix module or None): exact normalisation either way (module doc of
    targets.coreml_apple)."""
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


def package_model(core, info: dict):
    """What is converted: [normalisation] → the (quantized) network → softmax. The proxy is `core` alone:
    it takes normalised input and its logits rank classes exactly as the probabilities do."""
    import torch

    _, prefix = input_layers(info)

    class Packaged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prefix = prefix if prefix is not None else torch.nn.Identity()
            self.core = core

        def forward(self, x):
            return torch.softmax(self.core(self.prefix(x)), dim=1)

    return Packaged().eval()


def calibrate_w8a8(model, calibration: CalibrationData, config: dict):
    """coremltools' torch-side quantizer used for post-training calibration: observers only, no training. `model`
    is changed (the caller's own copy)."""
    import torch
    from coremltools.optimize.torch.quantization import (
        LinearQuantizer,
        LinearQuantizerConfig,
        ModuleLinearQuantizerConfig,
    )

    dtype = {"quint8": torch.quint8, "qint8": torch.qint8}[config["activation_dtype"]]
    qcfg = LinearQuantizerConfig(global_config=ModuleLinearQuantizerConfig(
        quantization_scheme=config["scheme"], activation_dtype=dtype, weight_dtype=torch.qint8,
        weight_per_channel=config["weight_per_channel"], activation_observer=config["observer"],
        weight_observer=config["observer"],
        milestones=[0, 0, 2 ** 31 - 1, 0]),  # observe and fake-quantize from the start; never freeze observers early
        module_name_configs={name: None for name in config.get("float_layers") or []})  # None: left in float
    quantizer = LinearQuantizer(model, qcfg)
    example = torch.from_numpy(calibration.images[:2])
    # in place: every caller passes a copy of its own (fold_layer_scale), and a copy at each step held three
    # ConvNeXt-B at once
    prepared = quantizer.prepare(example_inputs=(example,), inplace=True)
    prepared.eval()
    quantizer.step()
    with torch.no_grad():
        for batch in calibration.batches(int(config["calib_batch"])):
            prepared(torch.from_numpy(batch))
    return quantizer.finalize(inplace=True).eval()


def convert(packaged, example, info: dict, precision: str, config: dict, sizes: tuple[int, ...]):
    """The traced package model converted to an ML Program: an RGB image input at every size, a classifier out."""
    import torch

    ct = load_ct()
    image_kw, _ = input_layers(info)
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


def describe(mlmodel, info: dict, precision: str, config: dict) -> None:
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


def save_package(mlmodel, dst: Path) -> None:
    """Published whole or not at all (pipeline.core.cache.publish_dir). coremltools insists on the .mlpackage
    suffix, which the temporary directory lacks: the package is saved inside it and its contents moved up."""
    from convnext_deploy.pipeline.core.cache import publish_dir

    def write(tmp: Path) -> None:
        inner = tmp / dst.name
        with quiet():
            mlmodel.save(str(inner))
        for part in inner.iterdir():
            os.replace(part, tmp / part.name)
        inner.rmdir()

    publish_dir(dst, write)
