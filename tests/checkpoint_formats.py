"""Write our model's weights in the exact key layouts of the three foreign sources, spelled out by hand
(independently of the mapping rules under test), as the official code, timm and transformers name them."""
from __future__ import annotations

import torch


def _blocks(model):
    for i, stage in enumerate(model.stages):
        for j, _ in enumerate(stage.blocks):
            yield i, j


def official_state_dict(model) -> dict:
    """facebookresearch/ConvNeXt models/convnext.py names."""
    sd = model.state_dict()
    out = {
        "downsample_layers.0.0.weight": sd["stem.0.weight"], "downsample_layers.0.0.bias": sd["stem.0.bias"],
        "downsample_layers.0.1.weight": sd["stem.1.weight"], "downsample_layers.0.1.bias": sd["stem.1.bias"],
        "norm.weight": sd["head.norm.weight"], "norm.bias": sd["head.norm.bias"],
        "head.weight": sd["head.fc.weight"], "head.bias": sd["head.fc.bias"],
    }
    for i in range(1, 4):
        for k in (0, 1):
            for t in ("weight", "bias"):
                out[f"downsample_layers.{i}.{k}.{t}"] = sd[f"stages.{i}.downsample.{k}.{t}"]
    for i, j in _blocks(model):
        b = f"stages.{i}.blocks.{j}."
        o = f"stages.{i}.{j}."
        for t in ("weight", "bias"):
            out[o + "dwconv." + t] = sd[b + "conv_dw." + t]
            out[o + "norm." + t] = sd[b + "norm." + t]
            out[o + "pwconv1." + t] = sd[b + "mlp.fc1." + t]
            out[o + "pwconv2." + t] = sd[b + "mlp.fc2." + t]
        out[o + "gamma"] = sd[b + "gamma"]
    return out


def timm_state_dict(model, conv_mlp: bool) -> dict:
    """timm names; with conv_mlp (timm's atto…nano) the MLP weights are 1×1 conv kernels."""
    out = dict(model.state_dict())
    if conv_mlp:
        out = {k: (v[:, :, None, None] if k.endswith(("mlp.fc1.weight", "mlp.fc2.weight")) else v) for k, v in out.items()}
    return out


def hf_state_dict(model) -> dict:
    """transformers ConvNextForImageClassification names."""
    sd = model.state_dict()
    out = {
        "convnext.embeddings.patch_embeddings.weight": sd["stem.0.weight"],
        "convnext.embeddings.patch_embeddings.bias": sd["stem.0.bias"],
        "convnext.embeddings.layernorm.weight": sd["stem.1.weight"],
        "convnext.embeddings.layernorm.bias": sd["stem.1.bias"],
        "convnext.layernorm.weight": sd["head.norm.weight"], "convnext.layernorm.bias": sd["head.norm.bias"],
        "classifier.weight": sd["head.fc.weight"], "classifier.bias": sd["head.fc.bias"],
    }
    for i in range(1, 4):
        for k in (0, 1):
            for t in ("weight", "bias"):
                out[f"convnext.encoder.stages.{i}.downsampling_layer.{k}.{t}"] = sd[f"stages.{i}.downsample.{k}.{t}"]
    for i, j in _blocks(model):
        b = f"stages.{i}.blocks.{j}."
        o = f"convnext.encoder.stages.{i}.layers.{j}."
        for t in ("weight", "bias"):
            out[o + "dwconv." + t] = sd[b + "conv_dw." + t]
            out[o + "layernorm." + t] = sd[b + "norm." + t]
            out[o + "pwconv1." + t] = sd[b + "mlp.fc1." + t]
            out[o + "pwconv2." + t] = sd[b + "mlp.fc2." + t]
        out[o + "layer_scale_parameter"] = sd[b + "gamma"]
    return out


def hf_config(model, class_names, layer_norm_eps=1e-6) -> dict:
    return {
        "architectures": ["ConvNextForImageClassification"], "model_type": "convnext",
        "depths": list(model.depths), "hidden_sizes": list(model.dims), "num_channels": model.in_chans,
        "layer_norm_eps": layer_norm_eps, "id2label": {str(i): n for i, n in enumerate(class_names)},
        "label2id": {n: i for i, n in enumerate(class_names)},
    }


def clone(sd: dict) -> dict:
    return {k: v.clone() for k, v in sd.items()}


def save_torch(sd_or_obj, path) -> None:
    torch.save(sd_or_obj, path)
