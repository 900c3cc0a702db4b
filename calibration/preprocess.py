"""Image → the cropped uint8 pixels, and the normalised CHW float tensor made from them, driven only by a checkpoint's
`Preprocessing` record."""
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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB with Pillow's convert, after a 16-bit grey image (PNG/TIFF mode I;16, or I as older
    Pillow opens 16-bit PNGs) is scaled to 8 bits by its top byte: convert clips such values at 255, which turns
    nearly every pixel white."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        img = Image.fromarray(np.clip(np.asarray(img).astype(np.int64) >> 8, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def pixels(img: Image.Image, pp: Preprocessing, input_size: int | None = None) -> np.ndarray:
    """Any mode → RGB (`to_rgb`), resize shorter side, centre crop; returns the HWC uint8 pixels (what an
    image-input artifact takes, and what every float input is made from).

    `input_size` overrides the checkpoint's size (a deployment resolution) keeping its crop ratio.
    """
    size = input_size or pp.input_size
    if pp.interpolation not in _INTERPOLATION:
        raise ValueError(f"unsupported interpolation {pp.interpolation!r}; use one of {sorted(_INTERPOLATION)}")
    img = to_rgb(img)
    short = resize_size(pp, size)
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(short, round(h * short / w))
    else:
        new_w, new_h = max(short, round(w * short / h)), short
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _INTERPOLATION[pp.interpolation])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def preprocess(img: Image.Image, pp: Preprocessing, input_size: int | None = None) -> np.ndarray:
    """`pixels`, scaled to [0, 1] and normalised with the checkpoint's mean/std; returns CHW float32."""
    x = pixels(img, pp, input_size).astype(np.float32) / 255.0
    x = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
