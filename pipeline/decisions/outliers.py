"""Per-channel activation outliers in ConvNeXt, and the SmoothQuant-style migration that tames them.

ImageNet-trained ConvNeXts carry a few LayerNorm channels with weights tens of times larger than the rest.
A per-tensor INT8 activation scale is set by those channels, and every other channel of the pointwise layer
that reads the norm's output is left with a handful of levels. Every LayerNorm in ConvNeXt feeds one
weight layer directly (block norm → mlp.fc1, downsample norm → 2×2 conv, head norm → fc), so the
per-channel factor can be moved out of the activation and into that layer's input columns exactly:

    LN(x)·γ + β  → (LN(x)·γ + β) / s     and     W[:, c] → W[:, c] · s_c
    s_c = max|a_c|^α / max|W[:, c]|^(1−α)     (a: the norm's output on calibration images; Xiao et al. 2023)

The FP32 function is unchanged up to float rounding, and every target gets the same migrated weights
(ONNX export, Core ML conversion), so the method needs no per-runtime support.

`inject_outliers` builds the failure on purpose, for tests and the benchmark: it scales a few channels
of every norm by k and divides the matching input columns of the next layer by k, so the FP32 function
is again unchanged while the activations gain k× outliers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from convnext_deploy.pipeline.models.convnext import LayerNorm2d
from convnext_deploy.targets.base import inference_batch


def norm_pairs(model: nn.Module) -> list[tuple[str, nn.LayerNorm, str, nn.Module]]:
    """(norm name, norm, layer name, layer) for every LayerNorm whose output feeds exactly one weight layer."""
    pairs = []
    for si, stage in enumerate(model.stages):
        if isinstance(stage.downsample, nn.Sequential):
            pairs.append((f"stages.{si}.downsample.0", stage.downsample[0], f"stages.{si}.downsample.1", stage.downsample[1]))
        for bi, block in enumerate(stage.blocks):
            p = f"stages.{si}.blocks.{bi}"
            pairs.append((f"{p}.norm", block.norm, f"{p}.mlp.fc1", block.mlp.fc1))
    pairs.append(("head.norm", model.head.norm, "head.fc", model.head.fc))
    return pairs


def _input_columns(layer: nn.Module) -> torch.Tensor:
    """|W| reduced to one value per input channel (Linear: (out, in); 2×2 conv: (out, in, kh, kw))."""
    w = layer.weight.detach().abs()
    return w.amax(dim=0) if w.ndim == 2 else w.amax(dim=(0, 2, 3))


def _scale_columns(layer: nn.Module, s: torch.Tensor) -> None:
    shape = (1, -1) if layer.weight.ndim == 2 else (1, -1, 1, 1)
    layer.weight.mul_(s.view(shape))


def norm_output_ranges(model: nn.Module, images: np.ndarray, batch: int | None = None) -> dict[str, torch.Tensor]:
    """max |output| per channel of every paired LayerNorm, over the images (calibration images only), in batches
    bounded by pixels (default): 64 images at 384 px held 4.7 GiB of ConvNeXt-B's activations in eager torch."""
    batch = batch or inference_batch(images.shape[-1], cap=64)
    ranges: dict[str, torch.Tensor] = {}
    hooks = []
    for name, norm, _, _ in norm_pairs(model):
        def hook(m, _i, out, name=name):
            # LayerNorm2d (downsample) writes NCHW; the block and head norms write channels last
            r = out.detach().abs().amax(dim=(0, 2, 3)) if isinstance(m, LayerNorm2d) else \
                out.detach().abs().reshape(-1, out.shape[-1]).amax(dim=0)
            ranges[name] = r if name not in ranges else torch.maximum(ranges[name], r)
        hooks.append(norm.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                model(torch.from_numpy(images[i:i + batch]))
    finally:
        for h in hooks:
            h.remove()
    return ranges


@dataclass
class OutlierStats:
    """How outlier-heavy a model's norm outputs are: the largest channel range over the median one."""

    worst_ratio: float
    worst_layer: str
    ratios: dict[str, float]

    def to_dict(self) -> dict:
        return {"worst_ratio": self.worst_ratio, "worst_layer": self.worst_layer,
                "ratios": {k: round(v, 2) for k, v in self.ratios.items()}}


def outlier_stats(model: nn.Module, images: np.ndarray) -> OutlierStats:
    return stats_of(norm_output_ranges(model.eval(), images))


def stats_of(ranges: dict[str, torch.Tensor]) -> OutlierStats:
    ratios = {n: float(r.max() / r.median().clamp_min(1e-12)) for n, r in ranges.items()}
    worst = max(ratios, key=ratios.get)
    return OutlierStats(ratios[worst], worst, ratios)


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose tensors migration leaves alone (the depthwise convolutions, fc2, the stem, about half
    the weights) are `model`'s own, not copies: the smoothed model is held beside the checkpoint's to the end of a
    deploy (ConvNeXt-XL: 1.3 GiB each). Only the norms and the layers they feed get tensors of their own."""
    changed = {id(t) for _, norm, _, layer in norm_pairs(model) for t in (norm.weight, norm.bias, layer.weight)}
    shared = {id(p): p for p in model.parameters() if id(p) not in changed}
    return copy.deepcopy(model, memo=shared).eval()


def migrate(model: nn.Module, images: np.ndarray, alpha: float = 0.5,
            ranges: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict]:
    """A copy of `model` with the activation outliers of every norm moved into the next layer's weights.
    Returns it and a summary (per-layer largest factor, and the norms' output ranges before and after: the norm's
    affine is divided by s per channel, so its output range is divided by s exactly, with no second pass over the
    images). `images`: calibration images (preprocessed); `ranges`: their norm output ranges, if already known."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"smoothing alpha must be in (0, 1), got {alpha}")
    out = sharing_copy(model)
    ranges = ranges if ranges is not None else norm_output_ranges(out, images)
    after: dict[str, torch.Tensor] = {}
    factors = {}
    with torch.no_grad():
        for name, norm, lname, layer in norm_pairs(out):
            a = ranges[name].clamp_min(1e-5)
            w = _input_columns(layer).clamp_min(1e-5)
            s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(1e-5)
            s = s / s.median()  # only the relative factors matter; keep the norm's overall scale where it was
            norm.weight.div_(s)
            norm.bias.div_(s)
            _scale_columns(layer, s)
            factors[lname] = float(s.max())
            after[name] = ranges[name] / s
    return out, {"alpha": alpha, "layers": len(factors), "max_factor": max(factors.values()),
                 "images": len(images), "ranges_before": ranges, "ranges_after": after}


def inject_outliers(model: nn.Module, k: float = 30.0, channels: int = 2, seed: int = 0) -> nn.Module:
    """A copy of `model` with `channels` channels of every paired norm scaled by k and the next layer's
    matching input columns divided by k: the same FP32 function, with k× activation outliers."""
    out = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, norm, _, layer in norm_pairs(out):
            c = norm.weight.numel()
            idx = torch.randperm(c, generator=g)[:min(channels, c)]
            s = torch.ones(c)
            s[idx] = k
            norm.weight.mul_(s)
            norm.bias.mul_(s)
            _scale_columns(layer, 1.0 / s)
    return out


def save_outlier_checkpoint(source, dst, k: float = 30.0, channels: int = 2):
    """`source` (a LoadedCheckpoint) with injected outliers, saved as a checkpoint of the same task: the
    reference task's accuracy and metadata carry over because the FP32 function is unchanged."""
    from convnext_deploy.pipeline.models.checkpoints import save_checkpoint

    model = inject_outliers(source.model, k, channels)
    meta = source.metadata
    recipe = {**{k_: v for k_, v in (meta.get("recipe") or {}).items() if k_ != "history"},
              "outliers_injected": {"k": k, "channels_per_norm": channels, "from": source.sha256}}
    return save_checkpoint(model, dst, variant=source.variant, class_names=source.class_names,
                           preprocessing=source.preprocessing, recipe=recipe, dataset=meta.get("dataset"),
                           accuracy=meta.get("accuracy"))
