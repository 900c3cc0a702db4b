"""Checkpoint layouts: which published layout a state dict is in, and its keys renamed onto our model's.

Layouts users actually have:
- official  facebookresearch/ConvNeXt `.pth`: {"model": sd}, `downsample_layers.*`, `stages.i.j.dwconv`, `head`
- timm      `stem.*`, `stages.i.downsample.*`, `stages.i.blocks.j.conv_dw`, `mlp.fc1`, `gamma`, `head.fc`
            (atto…nano use 1×1-conv MLPs there: 4-D fc weights, reshaped here)
- hf        Hugging Face `ConvNextForImageClassification`: `convnext.embeddings.*`,
            `convnext.encoder.stages.*.layers.*`, `layer_scale_parameter`, `classifier`
Pure key mapping on the tensors as read (pipeline.models.checkpoints reads the files and reports what does not fit),
so only the standard library is imported here.
"""
from __future__ import annotations

import re

# (pattern, replacement) pairs, applied in order, that rename a foreign key to ours.
_OFFICIAL_RULES = [
    (r"^downsample_layers\.0\.0\.", "stem.0."),
    (r"^downsample_layers\.0\.1\.", "stem.1."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),  # .norm.*, .gamma
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
_HF_RULES = [
    (r"^convnext\.embeddings\.patch_embeddings\.", "stem.0."),
    (r"^convnext\.embeddings\.layernorm\.", "stem.1."),
    (r"^convnext\.encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.gamma"),
    (r"^convnext\.layernorm\.", "head.norm."),
    (r"^classifier\.", "head.fc."),
]


# ours → official: how the facebookresearch code names our keys (writing a checkpoint as a user has one)
_TO_OFFICIAL_RULES = [
    (r"^stem\.(\d)\.", r"downsample_layers.0.\1."),
    (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.(weight|bias)$", r"head.\1"),
]


def to_official(sd: dict) -> dict:
    """Our state dict in the official layout's names (what `torch.save({"model": ...})` of their code holds)."""
    return _rename(sd, _TO_OFFICIAL_RULES)


def detect_format(sd: dict) -> str:
    """Name the layout by its marker keys: 'official', 'timm', 'hf' or 'unknown'."""
    keys = sd.keys()
    if any(k.startswith("downsample_layers.") for k in keys) and any(".dwconv." in k for k in keys):
        return "official"
    if any(k.startswith(("convnext.embeddings.", "convnext.encoder.")) for k in keys):
        return "hf"
    if any(k.startswith("stem.") for k in keys) and any(".conv_dw." in k for k in keys):
        return "timm"
    return "unknown"


def _rename(sd: dict, rules) -> dict:
    """Each key renamed by the first rule that matches it: the rules run from specific to general."""
    out = {}
    for k, v in sd.items():
        new = k
        for pat, rep in rules:
            new, n = re.subn(pat, rep, new)
            if n:
                break
        out[new] = v
    return out


def rename_to_ours(sd: dict, fmt: str) -> dict:
    """A state dict in the known layout `fmt` with our parameter names (timm's are ours already)."""
    if fmt == "official":
        sd = _rename(sd, _OFFICIAL_RULES)
    elif fmt == "hf":
        sd = _rename(sd, _HF_RULES)
    # 1×1-conv MLP weights (timm's conv_mlp variants) are the same numbers as Linear weights.
    return {k: (v.flatten(1) if re.search(r"\.mlp\.fc[12]\.weight$", k) and v.ndim == 4 else v) for k, v in sd.items()}
