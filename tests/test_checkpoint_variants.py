"""The loaders on the ConvNeXt-S/B/L/XL key layouts (official .pth, timm, Hugging Face), by shapes.

Every model here is built on torch's meta device: no weight memory for L/XL. Detection, key mapping and
architecture inference run on the meta state dicts; the file path (torch.save → read_state_dict → load_checkpoint)
runs on meta tensors too (a meta tensor is saved and read back without data). Only ConvNeXt-S is loaded once with
real tensors, end to end, with every loaded value checked.
"""
import functools
import json

import pytest
import torch

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.models.checkpoint_layouts import detect_format, rename_to_ours
from convnext_deploy.pipeline.models.checkpoints import (
    infer_architecture,
    load_checkpoint,
    load_state_dict_strict,
    read_state_dict,
    to_our_keys,
)
from convnext_deploy.pipeline.models.convnext import count_parameters, create_model
from convnext_deploy.pipeline.models.variants import VARIANTS

from checkpoint_formats import hf_config, hf_state_dict, official_state_dict, timm_state_dict

# Spelled out here, independently of the variant table (ConvNeXt paper, Table 9; facebookresearch README).
DEPTHS = (3, 3, 27, 3)
DIMS = {"s": (96, 192, 384, 768), "b": (128, 256, 512, 1024), "l": (192, 384, 768, 1536),
        "xl": (256, 512, 1024, 2048)}
PUBLISHED_PARAMS_1K = {"s": 50_223_688, "b": 88_591_464, "l": 197_767_336, "xl": 350_196_968}
HEADS = (1000, 21841, 37)  # ImageNet-1k, ImageNet-22k (fb_in22k: official, timm and HF), a fine-tuned head
LAYOUTS = ("official", "timm", "hf")
# stem 4 + downsamples 3×4 + 36 blocks × 9 (dwconv, norm, fc1, fc2: weight and bias; gamma) + final norm 2 + head 2
N_KEYS = 344


class _Fixed:
    """A model whose state_dict() hands out the same tensor objects every call, so a mapped key can be checked to
    carry the very tensor it came from: on meta tensors shapes alone do not tell a block's norm from its gamma."""

    def __init__(self, model):
        self.stages, self.depths, self.dims, self.in_chans = model.stages, model.depths, model.dims, model.in_chans
        self._sd = model.state_dict()

    def state_dict(self):
        return self._sd


@functools.lru_cache(maxsize=None)
def _meta_model(variant: str, classes: int):
    """Built once per (variant, head) and only read: meta models cost no memory, their construction some time."""
    with torch.device("meta"):
        return create_model(variant, num_classes=classes)


def _write(layout: str, model) -> dict:
    if layout == "official":
        return official_state_dict(model)
    if layout == "timm":
        return timm_state_dict(model, conv_mlp=False)  # timm's S…XL use Linear MLPs (conv_mlp only for atto…nano)
    return hf_state_dict(model)


def _marker_shapes(layout: str, variant: str, classes: int) -> dict:
    """A few keys of each published layout, as the published files spell them, with their shapes."""
    d0, _, d2, d3 = DIMS[variant]
    names = {
        "official": ("downsample_layers.0.0.weight", "downsample_layers.3.1.weight", "stages.2.26.pwconv1.weight",
                     "stages.3.2.gamma", "head.weight"),
        "timm": ("stem.0.weight", "stages.3.downsample.1.weight", "stages.2.blocks.26.mlp.fc1.weight",
                 "stages.3.blocks.2.gamma", "head.fc.weight"),
        "hf": ("convnext.embeddings.patch_embeddings.weight", "convnext.encoder.stages.3.downsampling_layer.1.weight",
               "convnext.encoder.stages.2.layers.26.pwconv1.weight",
               "convnext.encoder.stages.3.layers.2.layer_scale_parameter", "classifier.weight"),
    }[layout]
    shapes = ((d0, 3, 4, 4), (d3, d2, 2, 2), (4 * d2, d2), (d3,), (classes, d3))
    return dict(zip(names, shapes))


def _expected_params(variant: str, classes: int) -> int:
    """The published 1k count with the head resized: a Linear(d3, classes) has classes × (d3 + 1) parameters."""
    return PUBLISHED_PARAMS_1K[variant] + (classes - 1000) * (DIMS[variant][3] + 1)


CASES = [pytest.param(v, lay, n, id=f"{v}-{lay}-{n}") for v in DIMS for lay in LAYOUTS for n in HEADS]


@pytest.mark.parametrize("variant,layout,classes", CASES)
def test_layout_maps_onto_our_keys_by_shapes(variant, layout, classes):
    model = _Fixed(_meta_model(variant, classes))
    ours = model.state_dict()
    assert all(t.is_meta for t in ours.values())  # nothing allocated
    foreign = _write(layout, model)
    assert len(foreign) == N_KEYS
    for key, shape in _marker_shapes(layout, variant, classes).items():
        assert tuple(foreign[key].shape) == shape, key

    assert detect_format(foreign) == layout
    renamed = rename_to_ours(foreign, layout)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    wrong = [k for k in ours if renamed[k] is not ours[k]]
    assert not wrong, f"keys mapped onto another tensor of the same shape: {wrong[:5]}"
    via_filter, fmt = to_our_keys(foreign)
    assert fmt == layout and via_filter.keys() == renamed.keys()

    arch = infer_architecture(renamed)
    assert (arch.depths, arch.dims, arch.num_classes, arch.in_chans) == (DEPTHS, DIMS[variant], classes, 3)
    assert arch.variant is VARIANTS[variant]
    params = sum(t.numel() for t in renamed.values())
    assert params == _expected_params(variant, classes)
    if classes == 1000:
        assert params == VARIANTS[variant].params_1k == PUBLISHED_PARAMS_1K[variant]


def _save_meta(layout: str, model, classes: int, directory):
    """A checkpoint file of meta tensors (a few KB whatever the variant) as the layout's users have it on disk."""
    sd = _write(layout, model)
    if layout == "official":
        path = directory / "convnext_x_224_ema.pth"
        torch.save({"model": sd, "epoch": 299}, path)  # the official training checkpoint wrapper
        return path
    if layout == "timm":
        path = directory / "pytorch_model.pth"
        torch.save(sd, path)
        return path
    torch.save(sd, directory / "pytorch_model.bin")
    names = [f"class {i}" for i in range(classes)]
    (directory / "config.json").write_text(json.dumps(hf_config(model, names, layer_norm_eps=1e-12)))
    return directory


@pytest.mark.parametrize("variant,layout,classes", CASES)
def test_load_checkpoint_by_shapes(variant, layout, classes, tmp_path):
    """The one entry point, file read included, on meta tensors: the model it builds is on meta as well."""
    path = _save_meta(layout, _meta_model(variant, classes), classes, tmp_path)
    assert path.stat().st_size < 1_000_000 or path.is_dir()
    with torch.device("meta"):
        ck = load_checkpoint(path, variant)
    assert ck.source_format == layout and ck.variant is VARIANTS[variant] and ck.num_classes == classes
    assert all(p.is_meta for p in ck.model.parameters())
    assert (ck.model.depths, ck.model.dims) == (DEPTHS, DIMS[variant])
    assert tuple(ck.model.head.fc.weight.shape) == (classes, DIMS[variant][3])
    assert count_parameters(ck.model) == _expected_params(variant, classes)
    assert len(ck.class_names) == classes
    if layout == "hf":
        assert ck.class_names[-1] == f"class {classes - 1}" and ck.model.head.norm.eps == 1e-12
    elif classes == 1000:
        assert ck.class_names[0] == "tench, Tinca tinca" and "ImageNet-1k" in ck.labels_note
    elif classes == 21841:
        assert ck.class_names[-1] == "21840" and "ImageNet-22k" in ck.labels_note
    else:
        assert ck.class_names == tuple(str(i) for i in range(classes)) and ck.labels_note == ""


def test_wrong_variant_and_incomplete_xl_are_refused_by_shapes(tmp_path):
    model = _meta_model("xl", 21841)
    path = _save_meta("official", model, 21841, tmp_path)
    with torch.device("meta"), pytest.raises(UserError, match="this is a ConvNeXt-XL checkpoint, you asked for "
                                                                "ConvNeXt-L"):
        load_checkpoint(path, "l")
    sd = official_state_dict(model)
    for key in [k for k in sd if k.startswith("stages.2.26.")]:
        del sd[key]
    torch.save({"model": sd}, tmp_path / "cut.pth")
    with torch.device("meta"), pytest.raises(UserError, match=r"depths \(3, 3, 26, 3\) / dims \(256, 512, 1024, 2048\) "
                                                               "match no ConvNeXt variant"):
        load_checkpoint(tmp_path / "cut.pth")
    sd = official_state_dict(model)
    sd["stages.1.2.pwconv3.weight"] = sd.pop("stages.1.2.pwconv2.weight")
    sd["head.bias"] = torch.empty(1000, device="meta")
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with torch.device("meta"), pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "bad.pth", "xl")
    assert "missing 1: stages.1.blocks.2.mlp.fc2.weight" in str(e.value)
    assert "unexpected 1: stages.1.blocks.2.pwconv3.weight" in str(e.value)
    assert "wrong shape 1: head.fc.bias (1000,) != (21841,)" in str(e.value)


def _patterns(shapes: list) -> tuple[torch.Tensor, list]:
    """Distinct values for every key (offset by its index) and position in it (0, 1, 2, …; exact in float32 below
    2**24): a swapped key or a reordered tensor shows. Returns the 0, 1, 2, … base and the tensors."""
    base = torch.arange(max(s.numel() for s in shapes), dtype=torch.float32)
    return base, [base[:s.numel()].add(i).view(s) for i, s in enumerate(shapes)]


def test_small_official_pth_loads_every_value(tmp_path):
    """ConvNeXt-S (50M parameters, 200 MB) once with real tensors: torch.save of the official layout, read back by
    read_state_dict, mapped, loaded by load_state_dict_strict; every loaded tensor equals the one written under the
    official name. (load_checkpoint itself runs above by shapes: with real tensors it would only add create_model's
    random initialisation of 50M weights, seconds here, that the load then overwrites.)"""
    with torch.device("meta"):
        model = create_model("s", num_classes=1000)  # its own: real tensors are assigned into it
    keys = list(model.state_dict())
    base, values = _patterns([v.shape for v in model.state_dict().values()])
    model.load_state_dict(dict(zip(keys, values)), assign=True)
    path = tmp_path / "convnext_small_1k_224_ema.pth"
    torch.save({"model": official_state_dict(model)}, path)
    del model, values  # the source's 200 MB go before the loader's
    assert path.stat().st_size > 4 * PUBLISHED_PARAMS_1K["s"]

    raw, meta = read_state_dict(path)
    assert meta["path"] == str(path) and not any(t.is_meta for t in raw.values())
    sd, fmt = to_our_keys(raw)
    del raw
    arch = infer_architecture(sd)
    assert fmt == "official" and arch.variant is VARIANTS["s"] and arch.num_classes == 1000
    with torch.device("meta"):
        # real memory, and no random initialisation for the load to overwrite
        target = create_model("s", num_classes=1000).to_empty(device="cpu")
    load_state_dict_strict(target, sd, str(path))
    del sd
    assert count_parameters(target) == 50_223_688
    loaded = target.state_dict()
    assert list(loaded) == keys
    # in place (the loaded copy is ours to spoil): no second 200 MB
    wrong = [k for i, k in enumerate(keys) if not torch.equal(loaded[k].view(-1).sub_(i), base[:loaded[k].numel()])]
    assert not wrong, f"loaded values differ from the file's: {wrong[:5]}"
