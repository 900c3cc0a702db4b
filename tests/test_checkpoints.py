import json
import os

import pytest
import torch
from safetensors.torch import save_file

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.models import hub
from convnext_deploy.pipeline.models.checkpoint_layouts import detect_format
from convnext_deploy.pipeline.models.checkpoints import load_checkpoint, save_checkpoint
from convnext_deploy.pipeline.models.convnext import create_model
from convnext_deploy.pipeline.models.variants import Preprocessing, get_variant

from checkpoint_formats import hf_config, hf_state_dict, official_state_dict, timm_state_dict
from conftest import randomized

X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def atto():
    return randomized(create_model("atto", num_classes=10))


def _same_logits(model, loaded):
    with torch.no_grad():
        assert torch.equal(model(X), loaded(X))


def test_official_pth(atto, tmp_path):
    path = tmp_path / "convnext_atto_1k_224_ema.pth"
    torch.save({"model": official_state_dict(atto), "epoch": 299}, path)
    ck = load_checkpoint(path, "atto")
    assert ck.source_format == "official" and ck.num_classes == 10
    _same_logits(atto, ck.model)


def test_timm_conv_mlp_pth_and_safetensors(atto, tmp_path):
    sd = timm_state_dict(atto, conv_mlp=True)
    assert sd["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4
    torch.save(sd, tmp_path / "convnext_atto_d2.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    for name in ("convnext_atto_d2.pth", "model.safetensors"):
        ck = load_checkpoint(tmp_path / name)
        assert ck.source_format == "timm" and ck.variant.name == "atto"
        _same_logits(atto, ck.model)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hugging_face_directory(atto, tmp_path, weights):
    names = [f"class_{i}" for i in range(10)]
    sd = hf_state_dict(atto)
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / weights))
    else:
        torch.save(sd, tmp_path / weights)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(atto, names)))
    ck = load_checkpoint(tmp_path)
    assert ck.source_format == "hf" and ck.class_names == tuple(names)
    _same_logits(atto, ck.model)


def test_hugging_face_final_norm_eps_comes_from_config(atto, tmp_path):
    torch.save(hf_state_dict(atto), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(atto, list("abcdefghij"), layer_norm_eps=1e-12)))
    ck = load_checkpoint(tmp_path)
    assert ck.model.head.norm.eps == 1e-12 and ck.model.stem[1].eps == 1e-6


def test_ours_round_trip_with_sidecar(atto, tmp_path):
    pp = Preprocessing(32, 1.0, "bicubic", (0.3,) * 3, (0.35,) * 3)
    names = [f"c{i}" for i in range(10)]
    path = save_checkpoint(atto, tmp_path / "m", variant=get_variant("atto"), class_names=names, preprocessing=pp,
                           accuracy={"top1": 0.5})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["variant"] == "atto" and len(meta["sha256"]) == 64
    ck = load_checkpoint(path, "atto")
    assert ck.source_format == "ours" and ck.preprocessing == pp and ck.class_names == tuple(names)
    assert ck.sha256 == meta["sha256"]
    _same_logits(atto, ck.model)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_sidecar_hash_mismatch_is_refused(atto, tmp_path):
    path = save_checkpoint(atto, tmp_path / "m", variant=get_variant("atto"), class_names=[str(i) for i in range(10)],
                           preprocessing=Preprocessing())
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match the sha256"):
        load_checkpoint(path)


def test_detect_format_markers(atto):
    assert detect_format(official_state_dict(atto)) == "official"
    assert detect_format(timm_state_dict(atto, False)) == "timm"
    assert detect_format(hf_state_dict(atto)) == "hf"
    assert detect_format({"fc.weight": torch.zeros(1)}) == "unknown"


def test_every_bad_key_is_listed_in_one_error(atto, tmp_path):
    sd = official_state_dict(atto)
    del sd["stages.2.3.gamma"]
    sd["stages.0.0.extra.weight"] = torch.zeros(3)
    sd["stages.1.0.pwconv1.bias"] = torch.zeros(7)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing 1: stages.2.blocks.3.gamma" in msg
    assert "unexpected 1: stages.0.blocks.0.extra.weight" in msg
    assert "wrong shape 1: stages.1.blocks.0.mlp.fc1.bias (7,) != (320,)" in msg


def test_other_variant_is_named(tmp_path):
    # A real ConvNeXt-S shaped checkpoint (uninitialised values: only shapes matter here).
    with torch.device("meta"):
        s = create_model("s", num_classes=1000)
    sd = {k: torch.empty(v.shape) for k, v in s.state_dict().items()}
    save_file(sd, str(tmp_path / "s.safetensors"))
    with pytest.raises(UserError, match="this is a ConvNeXt-S checkpoint, you asked for ConvNeXt-T"):
        load_checkpoint(tmp_path / "s.safetensors", "t")


def test_head_with_other_class_count_sets_num_classes(tmp_path):
    model = randomized(create_model("femto", num_classes=37))
    torch.save({"model": official_state_dict(model)}, tmp_path / "f.pth")
    ck = load_checkpoint(tmp_path / "f.pth")
    assert ck.variant.name == "femto" and ck.num_classes == 37 and len(ck.class_names) == 37
    _same_logits(model, ck.model)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARKER']}",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch, atto):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    sd = official_state_dict(atto)
    torch.save({"model": sd, "evil": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["missing", "truncated", "not_a_checkpoint", "suffix", "unknown_layout"])
def test_unreadable_files_get_one_clear_line(tmp_path, atto, case):
    if case == "missing":
        path, match = tmp_path / "nope.pth", "checkpoint not found"
    elif case == "truncated":
        torch.save(official_state_dict(atto), tmp_path / "t.pth")
        data = (tmp_path / "t.pth").read_bytes()
        (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
        path, match = tmp_path / "t.pth", "cannot read"
    elif case == "not_a_checkpoint":
        (tmp_path / "x.safetensors").write_bytes(b"hello world, not tensors")
        path, match = tmp_path / "x.safetensors", "cannot read"
    elif case == "suffix":
        (tmp_path / "x.onnx").write_bytes(b"")
        path, match = tmp_path / "x.onnx", "unsupported checkpoint file"
    else:
        torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "r.pth")
        path, match = tmp_path / "r.pth", "not a ConvNeXt checkpoint"
    with pytest.raises(UserError, match=match) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


class _FakeResponse:
    def __init__(self, data: bytes):
        import io

        self._f = io.BytesIO(data)

    def read(self, *a):
        return self._f.read(*a)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_download_by_name_up_to_the_network(tmp_path, monkeypatch):
    """Everything but the socket: the URL asked for, the cache layout, the atomic write and the load."""
    model = randomized(create_model("atto", num_classes=1000))
    buf = tmp_path / "served.pth"
    torch.save(timm_state_dict(model, conv_mlp=True), buf)
    asked = []

    def fake_open(url):
        asked.append(url)
        return _FakeResponse(buf.read_bytes())

    monkeypatch.setattr(hub, "_open_url", fake_open)
    ck = hub.load_published("convnext_atto.d2_in1k", root=tmp_path / "cache")
    assert asked == ["https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/"
                     "convnext_atto_d2-01bb0f51.pth"]
    _same_logits(model, ck.model)
    hub.load_published("convnext_atto.d2_in1k", root=tmp_path / "cache")
    assert len(asked) == 1  # cached


def test_published_table_points_at_official_urls():
    assert hub.PUBLISHED["convnext_tiny.fb_in1k"].files[0][1] == \
        "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth"
    hf = hub.PUBLISHED["facebook/convnext-tiny-224"]
    assert [u for _, u in hf.files] == ["https://huggingface.co/facebook/convnext-tiny-224/resolve/main/pytorch_model.bin",
                                        "https://huggingface.co/facebook/convnext-tiny-224/resolve/main/config.json"]
    with pytest.raises(UserError, match="unknown published checkpoint"):
        hub.download("convnext_huge", root=None)


def test_a_checkpoint_fine_tuned_at_384_is_read_at_384(atto, tmp_path):
    """The official and timm 384 checkpoints name their size; Hugging Face configs carry it as image_size. Their
    accuracy and calibration are at 384, the image resized whole (crop 1.0), not centre-cropped at 224."""
    path = tmp_path / "convnext_atto_22k_1k_384.pth"
    torch.save({"model": official_state_dict(atto)}, path)
    pp = load_checkpoint(path, "atto").preprocessing
    assert (pp.input_size, pp.crop_pct) == (384, 1.0)
    plain = tmp_path / "convnext_atto_1k_224_ema.pth"
    torch.save({"model": official_state_dict(atto)}, plain)
    assert load_checkpoint(plain, "atto").preprocessing == get_variant("atto").preprocessing
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save(hf_state_dict(atto), hf / "pytorch_model.bin")
    (hf / "config.json").write_text(json.dumps({**hf_config(atto, [str(i) for i in range(10)]), "image_size": 384}))
    assert load_checkpoint(hf, "atto").preprocessing.input_size == 384
