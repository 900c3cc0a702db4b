"""Image → normalised CHW float tensor, driven only by a checkpoint's `Preprocessing` record."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from convnext_deploy.pipeline.models.variants import Preprocessing

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize_size(pp: Preprocessing, input_size: int | None = None) -> int:
    """Shorter-side size before the centre crop (timm's convention: floor(size / crop_pct))."""
    size = input_size or pp.input_size
    return int(math.floor(size / pp.crop_pct))


def preprocess(img: Image.Image, pp: Preprocessing, input_size: int | None = None) -> np.ndarray:
    """Grey/RGBA → RGB, resize shorter side, centre crop, scale to [0, 1], normalise; returns CHW float32.

    `input_size` overrides the checkpoint's size (a deployment resolution) keeping its crop ratio.
    """
    size = input_size or pp.input_size
    if pp.interpolation not in _INTERPOLATION:
        raise ValueError(f"unsupported interpolation {pp.interpolation!r}; use one of {sorted(_INTERPOLATION)}")
    img = img.convert("RGB")
    short = resize_size(pp, size)
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(short, round(h * short / w))
    else:
        new_w, new_h = max(short, round(w * short / h)), short
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _INTERPOLATION[pp.interpolation])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
