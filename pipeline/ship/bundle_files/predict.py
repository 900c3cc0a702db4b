#!/usr/bin/env python3
"""Classify images with the model in this bundle, read and cropped exactly as convnext-deploy validated it.

    python predict.py IMAGE [IMAGE ...] [--json] [--precision int8] [--top 5]

Needs only numpy, Pillow and the bundle's runtime (preprocessing.json names it: onnxruntime, openvino, or
coremltools on macOS); not convnext-deploy, not torch. The model file carries its own labels and input rule (ONNX
metadata_props, OpenVINO rt_info, Core ML metadata, keys `convnext_deploy.*`); preprocessing.json says which file is
which model.

The model takes the image itself: an image of any size and mode (grey, 16-bit grey, RGB, RGBA, palette, CMYK) is
converted to RGB (grey becomes three equal channels; 16-bit grey is first scaled to 8 bits by its top byte; alpha is
dropped), its shorter side resized to floor(input_size / crop_pct) px with the recorded filter and centre-cropped to
input_size; those uint8 pixels (batch, height, width, RGB) go in, and mean/std are applied inside the model (a Core
ML package takes the cropped PIL image). The rule is convnext-deploy's calibration/preprocess.py, line for line: the
same top-1 as the deploy's own evaluation.

Prints one line per image: the top-5 class names with their probabilities (softmax of the logits; a Core ML
classifier gives probabilities itself). --json prints one JSON object per line instead.
Exit codes: 0 every image classified; 2 an image (or a bundle file) could not be read: one line each on stderr,
the other images are still classified; 3 the runtime is not installed here (or Core ML off macOS).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow < 9.1 has the filters on Image itself
INTERPOLATION = {"nearest": _RESAMPLING.NEAREST, "bilinear": _RESAMPLING.BILINEAR,
                 "bicubic": _RESAMPLING.BICUBIC, "lanczos": _RESAMPLING.LANCZOS}
EXIT_OK, EXIT_BAD_INPUT, EXIT_NO_RUNTIME = 0, 2, 3


class BundleError(Exception):
    """One line for the user, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


def load_bundle(bundle: Path = HERE) -> dict:
    """preprocessing.json: the runtime, the model files and the default precision."""
    try:
        return json.loads((bundle / "preprocessing.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read the bundle's preprocessing.json in {bundle} ({e}); "
                          "keep predict.py inside its bundle") from None


def resize_crop(img: Image.Image, pp: dict) -> Image.Image:
    """RGB, shorter side resized, centre crop: the input_size × input_size RGB image the model sees."""
    size = int(pp["input_size"])
    if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grey: convert would clip it at 255
        img = Image.fromarray(np.clip(np.asarray(img).astype(np.int64) >> 8, 0, 255).astype(np.uint8))
    img = img.convert("RGB")
    short = int(math.floor(size / float(pp["crop_pct"])))
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(short, round(h * short / w))
    else:
        new_w, new_h = max(short, round(w * short / h)), short
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), INTERPOLATION[pp["interpolation"]])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_input(img: Image.Image, pp: dict) -> np.ndarray:
    """The uint8 pixels (height, width, RGB) of one image, as the model takes them."""
    return np.asarray(resize_crop(img, pp), dtype=np.uint8)


def _batch(images: list, pp: dict) -> np.ndarray:
    return np.stack([to_input(im, pp) for im in images])


def _inside(meta: dict, where: str) -> tuple[dict, list[str]]:
    """(input rule, labels) from the model file's `convnext_deploy.*` metadata."""
    try:
        return json.loads(meta["preprocessing"]), json.loads(meta["labels"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"the model file {where} carries no convnext_deploy labels/preprocessing ({e}); "
                          "it is not a model this bundle's deploy wrote") from None


# ------------------------------------------------ one function per runtime: (images → scores, input rule, labels)

def onnxruntime_scores(path: Path, model: dict):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as the deploy measured it
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    pp, labels = _inside({k.split(".", 1)[-1]: v for k, v in meta.items() if k.startswith("convnext_deploy.")},
                         path.name)
    name = sess.get_inputs()[0].name
    return (lambda images: sess.run(None, {name: _batch(images, pp)})[0]), pp, labels


def openvino_scores(path: Path, model: dict):
    import openvino as ov

    core = ov.Core()
    network = core.read_model(str(path))
    meta = {k: network.get_rt_info(["convnext_deploy", k]).astype(str)
            for k in ("preprocessing", "labels") if network.has_rt_info(["convnext_deploy", k])}
    pp, labels = _inside(meta, path.name)
    compiled: dict = {}

    def run(images):
        x = _batch(images, pp)
        if x.shape not in compiled:  # a static shape per batch, compiled with the deploy's precision hint
            m = network.clone()
            m.reshape({m.inputs[0]: list(x.shape)})
            compiled[x.shape] = core.compile_model(m, "CPU", dict(model.get("config") or {}))
        c = compiled[x.shape]
        return c(x)[c.output(0)]

    return run, pp, labels


def coreml_predictor(mlmodel, pp: dict, labels: list[str]):
    """A Core ML classifier (MLModel or anything with its predict/get_spec): images → probabilities in the
    order of `labels` (the package's own dictionary is keyed by class name)."""
    spec = mlmodel.get_spec()
    probs, name = spec.description.predictedProbabilitiesName, spec.description.input[0].name

    def run(images):
        rows = []
        for im in images:
            out = mlmodel.predict({name: resize_crop(im, pp)})
            rows.append([float(out[probs][c]) for c in labels])
        return np.asarray(rows, np.float64)

    return run


def coreml_scores(path: Path, model: dict):
    if sys.platform != "darwin":
        raise BundleError(f"Core ML prediction needs macOS (coremltools' MLModel.predict); this is {sys.platform}",
                          EXIT_NO_RUNTIME)
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(path))
    md = mlmodel.user_defined_metadata
    pp, labels = _inside({"preprocessing": md.get("convnext_deploy.preprocessing"),
                          "labels": md.get("convnext_deploy.class_names")}, path.name)
    return coreml_predictor(mlmodel, pp, labels), pp, labels


RUNTIMES = {"onnxruntime": (onnxruntime_scores, "onnxruntime"), "openvino": (openvino_scores, "openvino"),
            "coreml": (coreml_scores, "coremltools")}


def load_model(bundle: Path, index: dict, precision: str | None = None):
    """(images → scores (N, classes), the model's input rule, its labels) for the bundle's model of `precision`
    (default: the one the gates passed)."""
    runtime = index["runtime"]
    precision = precision or index["default_model"]
    if precision not in index["models"]:
        raise BundleError(f"this bundle has no {precision} model (it has: {', '.join(index['models'])})")
    if runtime not in RUNTIMES:
        raise BundleError(f"predict.py does not run {runtime} models", EXIT_NO_RUNTIME)
    make, package = RUNTIMES[runtime]
    model = index["models"][precision]
    try:
        return make(bundle / model["file"], model)
    except ImportError as e:
        raise BundleError(f"this bundle runs on {runtime}, which is not installed here ({e}): "
                          f"pip install {package} numpy pillow", EXIT_NO_RUNTIME) from None


def softmax(scores: np.ndarray) -> np.ndarray:
    z = scores.astype(np.float64) - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(scores: np.ndarray, labels: list[str], k: int, kind: str) -> list[list[dict]]:
    """Ranked as the deploy ranks (a stable sort of the scores, best first), with probabilities."""
    probs = scores.astype(np.float64) if kind == "probabilities" else softmax(scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[{"index": int(i), "label": labels[i], "probability": float(p[i])} for i in row]
            for row, p in zip(order, probs)]


def _open(path: str) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with this bundle's model (top-5 classes).")
    ap.add_argument("images", nargs="+", help="image files (any size; grey or colour)")
    ap.add_argument("--json", action="store_true", help="one JSON object per image and line")
    ap.add_argument("--precision", help="the bundle's model to run (default: the one its gates passed)")
    ap.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
    ap.add_argument("--batch", type=int, default=8, help="images per call of the runtime (default 8)")
    args = ap.parse_args(argv)
    code = EXIT_OK
    try:
        pp = load_bundle()
        predict, _, labels = load_model(HERE, pp, args.precision)
    except BundleError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return e.code
    kind = pp["output"]["kind"]
    readable = []
    for path in args.images:
        try:
            readable.append((path, _open(path)))
        except (OSError, SyntaxError, ValueError) as e:
            print(f"predict.py: error: cannot read image {path} ({e}); skipped", file=sys.stderr)
            code = EXIT_BAD_INPUT
    for i in range(0, len(readable), max(1, args.batch)):
        chunk = readable[i:i + max(1, args.batch)]
        scores = np.asarray(predict([im for _, im in chunk]))
        for (path, _), top in zip(chunk, top_k(scores, labels, max(1, args.top), kind)):
            if args.json:
                print(json.dumps({"image": path, "top": top, "precision": args.precision or pp["default_model"],
                                  "runtime": pp["runtime"]}))
            else:
                print(f"{path}: " + ", ".join(f"{t['label']} {t['probability']:.4f}" for t in top))
    return code


if __name__ == "__main__":
    sys.exit(main())
