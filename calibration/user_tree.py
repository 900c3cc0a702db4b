"""Fashion-MNIST written out the way a team's own ImageNet-style data arrives: an evaluation tree of wnid folders
(ImageNet val's layout, 1,000-class index order) and a flat folder of calibration images, as RGB JPEGs at 256 px.
The two are drawn from different splits (test: evaluation, train: calibration), so they never share an image.

The ten classes go to the ImageNet-1k classes closest to them (a T-shirt is ImageNet's "jersey, T-shirt"), so a
1,000-class checkpoint's head is read at its own indices. Used where a large variant is deployed as a user would
(`make bench-scale`, the slow B test): the images and labels are real, the pixels grey made colour.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from convnext_deploy.calibration.fashion_mnist import FashionMNIST

WNIDS = ("n03595614", "n03594734", "n04370456", "n03866082", "n04479046",  # T-shirt/top, trouser, pullover, dress, coat
         "n04133789", "n02963159", "n04120489", "n04026417", "n03124043")  # sandal, shirt, sneaker, bag, ankle boot
SIZE = 256  # ImageNet-sized: resized to 256 and centre-cropped to 224 by the checkpoint's preprocessing


def photo(grey: np.ndarray) -> Image.Image:
    """A 28×28 grey image as a 256×256 RGB one: the garment tinted, the background not black."""
    g = np.asarray(Image.fromarray(grey).resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255
    rgb = np.stack([0.15 + 0.8 * g, 0.2 + 0.6 * g, 0.35 + 0.4 * g], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def write_tree(out: Path, n_eval: int, n_calib: int) -> tuple[Path, Path]:
    """(evaluation tree, calibration folder) under `out`: the first `n_eval` test images in their classes' wnid
    folders, the first `n_calib` train images in one flat folder. Written once: an existing pair is reused."""
    evals, calib = out / "val", out / "calibration"
    done = out / ".complete"
    if done.exists() and done.read_text() == f"{n_eval} {n_calib}":
        return evals, calib
    test, train = FashionMNIST("test"), FashionMNIST("train")
    for i in range(n_eval):
        folder = evals / WNIDS[test.label(i)]
        folder.mkdir(parents=True, exist_ok=True)
        photo(test.images[i]).save(folder / f"val_{i:05d}.JPEG", quality=90)
    calib.mkdir(parents=True, exist_ok=True)
    for i in range(n_calib):
        photo(train.images[i]).save(calib / f"train_{i:05d}.JPEG", quality=90)
    done.write_text(f"{n_eval} {n_calib}")
    return evals, calib
