"""Equivalent graph forms of one ConvNeXt: the same weights and function, written so that a runtime's kernels and
fusions see different op sequences. Which form runs fastest depends on the runtime and the CPU, so the recipe
choice measures them (a target's INT8 candidates name the form they start from).

- `channels_last` (the model as defined, what every export gave until now): dwconv → Transpose → LayerNorm →
  MatMul → GELU → MatMul → Transpose → Add. ONNX Runtime fuses the LayerNorm into one kernel; the Transposes
  and the MatMuls' reshapes stay.
- `channels_first`: no Transpose in the blocks. The pointwise layers are 1×1 convolutions and every LayerNorm
  over channels is written as mean and variance over the channel axis of the NCHW tensor, the pattern OpenVINO's
  converter fuses into one MVN op; a runtime without that fusion runs it as several float ops (ONNX Runtime).

`to_form` returns a copy with layer-scale folded into the second pointwise layer (γ·(Wx + b) = (γW)x + γb, as the
export does) and the module names kept (`stages.i.blocks.j.mlp.fc1` stays the first pointwise layer), so the
checkpoint's layer names still address the same weights in network order.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from convnext_deploy.pipeline.models.convnext import Block, LayerNorm2d, fold_layer_scale

DEFAULT_FORM = "channels_last"
FORMS = ("channels_last", "channels_first")


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor as mean and variance (the MVN pattern)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone()[:, None, None])
        self.bias = nn.Parameter(norm.bias.detach().clone()[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(1, keepdim=True)
        var = (centred * centred).mean(1, keepdim=True)
        return centred / torch.sqrt(var + self.eps) * self.weight + self.bias


def _pointwise(linear: nn.Linear) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features, linear.out_features, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        conv.bias.copy_(linear.bias)
    return conv


class ChannelsFirstBlock(nn.Module):
    """A `Block` in NCHW throughout: dwconv 7×7 → channel norm → 1×1 conv 4× → GELU → 1×1 conv (γ folded) → + x."""

    def __init__(self, block: Block):
        super().__init__()
        assert block.gamma is None, "fold the layer-scale first (fold_layer_scale)"
        self.conv_dw = copy.deepcopy(block.conv_dw)
        self.norm = ChannelNorm(block.norm)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = _pointwise(block.mlp.fc1), nn.GELU(), _pointwise(block.mlp.fc2)
        self.gamma = None  # folded into fc2: the export's own folding finds nothing left to fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(self.conv_dw(x)))


def to_form(model: nn.Module, form: str) -> nn.Module:
    """`model` in `form` (same function, same layer names in network order); the model itself when it is the
    default form."""
    if form == DEFAULT_FORM:
        return model
    if form != "channels_first":
        raise ValueError(f"unknown graph form {form!r}: use one of {', '.join(FORMS)}")
    out = fold_layer_scale(model)  # a copy
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Block):
                setattr(parent, name, ChannelsFirstBlock(child))
            elif isinstance(child, LayerNorm2d):
                setattr(parent, name, ChannelNorm(child))
    return out.eval()
