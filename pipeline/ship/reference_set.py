"""The bundle's reference images and the outputs `validate` compares with: which evaluation images, the model's
inputs made from them, and the sets of outputs (the device's own, where the deploy had a --device, and the host's).

The same images are picked wherever they are needed: by the bundle from the run's manifest, and by the device stage
(stages/device.py) from the deploy's split, so the device's kernels compute the outputs of exactly the inputs the
bundle ships. A set of outputs is only as good as the kernels that made it: an INT8 model's outputs differ from one
INT8 path to another (x86 without VNNI saturates u8×s8 pair sums), so each set names the CPU, its INT8 path and the
runtime that made it, and `validate` compares with the set made on its own path (verify.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from convnext_deploy.pipeline.core.errors import UserError

REFERENCE_IMAGES = "reference_images"
# validate compares the model's outputs on these images with the deploy's: 200 let it see a top-1 change of 1 %
# (issue 33: 16 could not see 2 images in 500); the PNGs and the model's inputs stop at REFERENCE_BYTES (photos
# at 224 px do well before 200), never below N_REFERENCE_MIN
N_REFERENCE, N_REFERENCE_MIN, REFERENCE_BYTES = 200, 16, 32 << 20
# the device's outputs on the reference inputs, written by the deploy into its run directory (stages/report.py)
DEVICE_REFERENCE = "device_reference_outputs.npz"
PRIMARY, HOST = "outputs", "host_outputs"  # reference_outputs.npz key prefixes: the bundle's set, the host's


def evaluation_source(report: dict, class_names: list[str]):
    from convnext_deploy.calibration.fashion_mnist import FashionMNIST
    from convnext_deploy.calibration.imagefolder import ImageFolder

    source = report["data"]["evaluation"]["source"]
    if source.startswith("fashion-mnist/"):
        return FashionMNIST(source.split("/", 1)[1])
    if source.startswith("imagefolder:"):
        return ImageFolder(source.split(":", 1)[1], class_names)
    raise UserError(f"cannot read the run's evaluation source {source!r} for the bundle's reference images")


def _pick(labels: list[int], n: int) -> list[int]:
    """Positions of `n` samples, one class after another (round-robin), so the reference spans classes."""
    by_class: dict[int, list[int]] = {}
    for pos, y in enumerate(labels):
        by_class.setdefault(y, []).append(pos)
    picked, depth = [], 0
    while len(picked) < min(n, len(labels)):
        picked += [v[depth] for _, v in sorted(by_class.items()) if depth < len(v)][: n - len(picked)]
        depth += 1
    return sorted(picked)


def reference_set(src, indices, pp, out: Path, image_in: bool) -> dict:
    """Save up to `N_REFERENCE` of the evaluation images `indices` of `src` (within `REFERENCE_BYTES`) as PNG under
    `out` and return the model's inputs made from them (read back from the PNGs, so a device reading the same files
    gets the same inputs): the uint8 NHWC pixels of an image-input model (`image_in`), else the normalised float
    tensors; with labels, names and the evaluation indices they are."""
    from PIL import Image

    from convnext_deploy.calibration.preprocess import pixels, preprocess

    first = list(indices[: 50 * N_REFERENCE])  # enough to cover classes; only the picked images are decoded
    out.mkdir()
    names, inputs, labels, kept, used = [], [], [], [], 0
    for k, pos in enumerate(_pick([src.label(i) for i in first], N_REFERENCE)):
        img, y = src[first[pos]]
        if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            img = img.convert("RGB")  # PNG cannot hold it (CMYK, YCbCr); the deploy converts to RGB first anyway
        name = out / f"{k:03d}_label{y}.png"
        img.save(name, format="PNG")
        with Image.open(name) as back:
            x = pixels(back, pp) if image_in else preprocess(back, pp)
        used += name.stat().st_size + x.nbytes
        if used > REFERENCE_BYTES and len(names) >= N_REFERENCE_MIN:
            name.unlink()
            break
        inputs.append(x)
        names.append(f"{REFERENCE_IMAGES}/{name.name}")
        labels.append(y)
        kept.append(first[pos])
    return {"inputs": np.stack(inputs), "labels": np.asarray(labels, np.int64), "images": np.asarray(names),
            "indices": np.asarray(kept, np.int64)}


def reference_images(run_dir: Path, report: dict, class_names: list[str], out: Path, image_in: bool) -> dict:
    """`reference_set` of a published run: its evaluation images as its manifest lists them."""
    from convnext_deploy.pipeline.models.variants import Preprocessing

    manifest = json.loads((run_dir / "manifest.json").read_text())
    return reference_set(evaluation_source(report, class_names), manifest["evaluation"]["indices"],
                         Preprocessing.from_dict(report["model"]["preprocessing"]), out, image_in)


def inputs_sha256(inputs: np.ndarray) -> str:
    """The reference inputs' identity: dtype, shape and bytes."""
    return hashlib.sha256(f"{inputs.dtype}{inputs.shape}".encode() + np.ascontiguousarray(inputs).tobytes()).hexdigest()


def device_outputs(run_dir: Path, report: dict, ref: dict) -> dict | None:
    """The emulated device's outputs on `ref`'s inputs, as its deploy recorded them (precision → outputs), or None
    where the run had no emulated device (or was made before the device computed them). Inputs that are not the
    device's are refused: the outputs would belong to other images."""
    about = (report.get("device") or {}).get("reference")
    if not about or (report["device"].get("measured") != "emulated"):
        return None
    path = Path(run_dir) / about["file"]
    if not path.is_file():
        raise UserError(f"{path} is missing (the device's reference outputs, named in report.json); re-run the deploy")
    with np.load(path, allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    if not np.array_equal(got["indices"], ref["indices"]) or inputs_sha256(ref["inputs"]) != about["inputs_sha256"]:
        raise UserError(f"{path}: the device's reference outputs are not of the bundle's reference inputs (images or "
                        "preprocessing changed since the deploy); re-run the deploy")
    return {k[len("outputs_"):]: v for k, v in got.items() if k.startswith("outputs_")}


def set_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """How far outputs `a` are from outputs `b` on the same inputs: top-1 agreement (a count) and the largest |Δ|,
    also as a fraction of `b`'s range (as `validate` reads a bundle)."""
    diff = float(np.abs(a - b).max())
    span = float(b.max() - b.min()) or 1.0
    return {"top1_agree": int((a.argmax(1) == b.argmax(1)).sum()), "n": len(b), "max_abs_diff": diff,
            "max_abs_diff_of_range": diff / span}
