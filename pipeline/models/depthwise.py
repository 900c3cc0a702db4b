"""The 7×7 depthwise convolution for training: the same forward, a weight gradient that is fast on every x86 ISA.

oneDNN computes a depthwise convolution's weight gradient in PyTorch 2.13 with a GEMM fallback (`x64:gemm:jit`)
on AVX2 and, on every ISA, spends its time on taps that only ever see padding: at the reference's 32 px the last
stages' maps are 2×2 and 1×1, where 40 or 48 of the 49 taps never meet a pixel. Measured per step of atto (batch
256, channels-last) with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` on a Zen 5: 158 ms in oneDNN vs 10 ms
here; with AVX-512: 61 ms vs 10 ms. The gradient is the correlation of each (image, channel) plane of the input
with the same plane of the output gradient, a depthwise convolution over batch × channels whose padding is trimmed
to the taps that reach the map; the other taps' gradient is exactly zero, as in oneDNN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Depthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pad: int):
        ctx.save_for_backward(x, weight)
        ctx.pad = pad
        return F.conv2d(x, weight, bias, padding=pad, groups=x.shape[1])

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        pad, channels = ctx.pad, x.shape[1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(gy, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0],
                                                     channels, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            gw = weight_grad(x, gy, pad)
        if ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None


def weight_grad(x: torch.Tensor, gy: torch.Tensor, pad: int) -> torch.Tensor:
    """d loss / d weight of a stride-1, 'same'-padded depthwise convolution: (C, 1, 2·pad+1, 2·pad+1)."""
    n, c, h, w = x.shape
    ph, pw = min(pad, h - 1), min(pad, w - 1)  # taps further out than the map never meet a pixel
    planes = x.transpose(0, 1).reshape(1, c * n, h, w)
    kernels = gy.transpose(0, 1).reshape(c * n, 1, h, w)
    g = F.conv2d(planes, kernels, padding=(ph, pw), groups=c * n).view(c, n, 2 * ph + 1, 2 * pw + 1).sum(1)
    return F.pad(g, (pad - pw, pad - pw, pad - ph, pad - ph)).unsqueeze(1)


class TrainingDepthwise(nn.Conv2d):
    """An `nn.Conv2d` with groups = channels, stride 1, odd square kernel and 'same' padding, holding the same
    `weight` and `bias` (so the same state-dict keys); only a training forward with gradients takes `_Depthwise`."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> TrainingDepthwise:
        k = conv.kernel_size[0]
        if not (conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2)
                and k % 2 == 1 and conv.padding_mode == "zeros"):
            raise ValueError(f"not a stride-1, same-padded depthwise convolution: {conv}")
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # the same Parameters, hooks and settings
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return _Depthwise.apply(x, self.weight, self.bias, self.padding[0])
        return super().forward(x)


def for_training(model: nn.Module) -> nn.Module:
    """`model` with every depthwise convolution a `TrainingDepthwise` (in place; parameters unchanged)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Conv2d and child.groups > 1 and child.groups == child.in_channels:
                setattr(module, child_name, TrainingDepthwise.of(child))
    return model
