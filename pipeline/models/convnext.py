"""ConvNeXt ("A ConvNet for the 2020s", Liu et al. 2022) in plain PyTorch.

Parameter names follow timm's layout (stem, stages.i.downsample, stages.i.blocks.j, head), which is
the format the other checkpoint layouts are mapped onto in `pipeline.models.checkpoints`.
Only torch is imported here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convnext_deploy.pipeline.models.variants import Variant, get_variant

LN_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor.

    Written as permute → layer_norm → permute so ONNX export (opset ≥ 17) gives one
    LayerNormalization node instead of a decomposed mean/var chain that runs as many float ops.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """dwconv 7×7 → LayerNorm → Linear 4× → GELU → Linear → layer-scale → stochastic depth + residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: float = 1e-6, mlp_ratio: int = 4):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)  # NHWC so norm and MLP act on channels
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x * self.gamma
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class Stage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int, drop_rates: list[float], ls_init_value: float):
        super().__init__()
        # The first stage's downsampling is the stem; later stages halve resolution with norm + 2×2 conv.
        self.downsample = (
            nn.Sequential(LayerNorm2d(in_dim, eps=LN_EPS), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2))
            if in_dim != out_dim
            else nn.Identity()
        )
        self.blocks = nn.Sequential(*(Block(out_dim, r, ls_init_value) for r in drop_rates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Head(nn.Module):
    """Global average pool → LayerNorm → (dropout) → Linear."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x.mean((2, 3)))))


class ConvNeXt(nn.Module):
    def __init__(
        self,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        ls_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=LN_EPS))
        # Stochastic depth rate grows linearly with block index across the whole network.
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        stages, start, prev = [], 0, dims[0]
        for depth, dim in zip(depths, dims):
            stages.append(Stage(prev, dim, depth, rates[start:start + depth], ls_init_value))
            start, prev = start + depth, dim
        self.stages = nn.Sequential(*stages)
        self.head = Head(dims[-1], num_classes, drop_rate)
        self.apply(_init_weights)
        if head_init_scale != 1.0:
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.device.type != "meta":
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def create_model(variant: str | Variant, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ConvNeXt:
    v = variant if isinstance(variant, Variant) else get_variant(variant)
    return ConvNeXt(v.depths, v.dims, num_classes=num_classes, in_chans=in_chans, **kwargs)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv and Linear, in network order: the layers quantization acts on."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def map_by_network_order(nodes: list[str], model: nn.Module, modules: list[str], where: str) -> list[str]:
    """The names in `nodes` (a converted graph's weight layers, in network order) of the named checkpoint
    layers of `model`; the counts must agree, since order is the only link between the two."""
    names = [n for n, _ in weight_layers(model)]
    if len(nodes) != len(names):
        raise ValueError(f"cannot name layers: {len(nodes)} weight layers in the {where}, {len(names)} in the model")
    by_module = dict(zip(names, nodes))
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ValueError(f"no layer named {unknown[0]!r} in the model (e.g. {names[1]!r})")
    return [by_module[m] for m in modules]


def fold_layer_scale(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every block's γ multiplied into mlp.fc2 (γ·(Wx + b) = (γW)x + γb: same function, one
    op less; the export and every graph form start from it)."""
    import copy

    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for stage in folded.stages:
            for block in stage.blocks:
                if block.gamma is not None:
                    block.mlp.fc2.weight.mul_(block.gamma[:, None])
                    block.mlp.fc2.bias.mul_(block.gamma)
                    block.gamma = None
    return folded


def truncated(model: ConvNeXt, depths: tuple[int, ...]) -> ConvNeXt:
    """A ConvNeXt of the same widths and head holding the stem, downsampling layers, head and the first
    `depths[i]` blocks of each stage of `model`, their weights copied: every kind of layer the model has, at a
    fraction of its size (the candidates' screen, pipeline.decisions.screen)."""
    short = ConvNeXt(depths, model.dims, num_classes=model.num_classes, in_chans=model.in_chans).eval()
    own = model.state_dict()
    short.load_state_dict({k: own[k] for k in short.state_dict()})
    short.head.norm.eps = model.head.norm.eps
    return short


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
