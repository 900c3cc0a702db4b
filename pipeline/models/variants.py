"""The ConvNeXt family as one table: depths, widths, preprocessing and published accuracy.

Every other file reads sizes, preprocessing constants and published figures from here (or from a
checkpoint's own metadata), so nothing is typed twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from convnext_deploy.pipeline.core.errors import UserError

# ImageNet statistics used by every published ConvNeXt checkpoint.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the tensor a checkpoint was trained on."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )


@dataclass(frozen=True)
class Variant:
    name: str
    long_name: str
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    params_1k: int  # published parameter count with the 1000-class head
    # Published ImageNet-1k top-1 at 224 (None where no 1k-only figure exists), with its source.
    imagenet_top1: float | None
    imagenet_note: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    aliases: tuple[str, ...] = ()


_PAPER = "ConvNeXt paper / facebookresearch README, ImageNet-1k only, 224px"
_TIMM = "timm-trained (no paper figure); see timm's results tables for its ImageNet-1k top-1"

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("atto", "ConvNeXt-Atto", (2, 2, 6, 2), (40, 80, 160, 320), 3_695_520, None, _TIMM),
        Variant("femto", "ConvNeXt-Femto", (2, 2, 6, 2), (48, 96, 192, 384), 5_217_784, None, _TIMM),
        Variant("pico", "ConvNeXt-Pico", (2, 2, 6, 2), (64, 128, 256, 512), 9_045_672, None, _TIMM),
        Variant("nano", "ConvNeXt-Nano", (2, 2, 8, 2), (80, 160, 320, 640), 15_593_560, None, _TIMM,
                Preprocessing(crop_pct=0.95)),
        Variant("t", "ConvNeXt-T", (3, 3, 9, 3), (96, 192, 384, 768), 28_589_128, 82.1, _PAPER,
                aliases=("tiny",)),
        Variant("s", "ConvNeXt-S", (3, 3, 27, 3), (96, 192, 384, 768), 50_223_688, 83.1, _PAPER,
                aliases=("small",)),
        Variant("b", "ConvNeXt-B", (3, 3, 27, 3), (128, 256, 512, 1024), 88_591_464, 83.8, _PAPER,
                aliases=("base",)),
        Variant("l", "ConvNeXt-L", (3, 3, 27, 3), (192, 384, 768, 1536), 197_767_336, 84.3, _PAPER,
                aliases=("large",)),
        Variant("xl", "ConvNeXt-XL", (3, 3, 27, 3), (256, 512, 1024, 2048), 350_196_968, None,
                "no ImageNet-1k-only figure is published: XL exists only as ImageNet-22k pre-trained "
                "(87.0 top-1 at 224 after 22k pre-training and 1k fine-tuning)",
                aliases=("xlarge",)),
    )
}


def get_variant(name: str) -> Variant:
    key = name.strip().lower()
    for v in VARIANTS.values():
        if key == v.name or key in v.aliases or key == v.long_name.lower():
            return v
    raise UserError(
        f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)} "
        "(see `convnext-deploy variants`)"
    )


def variant_from_dims(depths: tuple[int, ...], dims: tuple[int, ...]) -> Variant | None:
    for v in VARIANTS.values():
        if tuple(depths) == v.depths and tuple(dims) == v.dims:
            return v
    return None
