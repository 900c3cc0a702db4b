"""Core ML: conversion, W8 and W8A8 quantization and the torch proxy are tested here on Linux; prediction with
`MLModel.predict` needs macOS and its tests are marked `macos` and skip with the reason elsewhere."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from convnext_deploy.pipeline.measure.accuracy import accuracy, predict_many
from convnext_deploy.targets import coreml_apple, coreml_proxy, get_target
from convnext_deploy.targets.base import Artifact

from conftest import reference_split

pytest.importorskip("coremltools", reason="coremltools is not installed: pip install 'convnext-deploy[coreml]'")
coreml = get_target("coreml")
AVAIL = coreml.available()
needs_macos = pytest.mark.skipif(not AVAIL.ok, reason=f"Core ML prediction cannot run here: {AVAIL.reason}")


@pytest.fixture(scope="module")
def built(atto_reference, coreml_deployed):
    """The packages the session's Core ML deploy built (conftest coreml_deployed: FP16, W8 and W8A8 of the atto
    reference, input sizes 32 and 224), read from the build folders its log names, and 2,000 evaluation images (the
    0.3 pp gate is 6 of them, enough to hold the proxy to it)."""
    _, p = coreml_deployed
    folders = dict(re.findall(r"^coreml (\w+): (?:built|cached) \((.+)\)$", p.stdout, re.MULTILINE))
    assert set(folders) == {"fp16", "w8", "int8"}, p.stdout
    arts = {precision: Artifact.load_metadata(Path(folder)) for precision, folder in folders.items()}
    data = reference_split(atto_reference, n_calib=10, n_eval=2000)
    x, y = data.load("evaluation")
    return data.ck, arts, x, y


def test_declared_entry_and_build_config_per_precision():
    assert coreml.precisions == ("fp16", "w8", "int8") and coreml.reference == "fp16"
    assert coreml.converter and coreml.layer_probe and coreml.extra_runners and coreml.int8_recipes == ()
    assert coreml.module == "convnext_deploy.targets.coreml_apple"
    opts = coreml.make_options(float_layers=["stem.0"], weight_threshold=4096)
    assert coreml.build_config("fp16", opts) == {"compute_precision": "fp16", "minimum_deployment_target": "iOS16"}
    assert coreml.build_config("w8", opts) == {"compute_precision": "fp16", "mode": "linear_symmetric",
                                               "weight_threshold": 4096, "minimum_deployment_target": "iOS16"}
    int8 = coreml.build_config("int8", opts)
    assert int8["float_layers"] == ["stem.0"] and int8["minimum_deployment_target"] == "iOS17"
    assert "weight_threshold" not in int8 and int8["activation_dtype"] == "quint8"
    with pytest.raises(ValueError, match="fp16, w8, int8"):
        coreml.build_config("fp32", opts)


def test_availability_names_macos():
    if AVAIL.ok:
        pytest.skip("this is macOS with Core ML")
    assert AVAIL.proxy and "needs macOS" in AVAIL.reason


def test_packages_load_back_with_their_spec(built):
    import coremltools as ct

    ck, arts, *_ = built
    for precision, art in arts.items():
        (package,) = art.files
        assert package.suffix == ".mlpackage" and package.is_dir()
        ml = ct.models.MLModel(str(package), skip_model_load=True)
        spec = ml.get_spec()
        # iOS 16 is specification version 7, iOS 17 is 8 (activation quantize/dequantize ops)
        assert spec.specificationVersion == {"fp16": 7, "w8": 7, "int8": 8}[precision]
        (inp,) = spec.description.input
        assert inp.name == "image" and inp.type.WhichOneof("Type") == "imageType"
        sizes = {(s.height, s.width) for s in inp.type.imageType.enumeratedSizes.sizes}
        assert sizes == {(32, 32), (224, 224)}
        assert spec.description.predictedProbabilitiesName and spec.description.predictedFeatureName
        md = ml.user_defined_metadata
        assert json.loads(md["convnext_deploy.class_names"]) == list(ck.class_names)
        assert md["convnext_deploy.variant"] == "atto" and md["convnext_deploy.precision"] == precision
        assert md["convnext_deploy.checkpoint_sha256"] == ck.sha256
        assert md["convnext_deploy.checkpoint_top1"].startswith(f"{ck.metadata['accuracy']['top1']:.4f} on ")
        assert ml.author.startswith("convnext-deploy") and "Apache-2.0" in ml.license
        # scale/bias pre-processing reproduces (x/255 − mean)/std exactly (std is the same on every channel here)
        pre = art.metadata["input"]
        assert pre["scale"] == pytest.approx(1 / (255 * ck.preprocessing.std[0]))
        assert pre["bias"] == pytest.approx([-m / s for m, s in zip(ck.preprocessing.mean, ck.preprocessing.std)])


def test_quantized_packages_hold_int8_weights_and_activations(built):
    _, arts, *_ = built
    s = {p: a.metadata["layer_summary"] for p, a in arts.items()}
    assert s["fp16"] == {"conv_linear": 41, "int8_weights": 0, "int8_activations": 0}
    # W8: every weight of ≥ 2048 elements; atto's stem (1920) and first-stage depthwise (1960) stay FP16
    assert s["w8"] == {"conv_linear": 41, "int8_weights": 38, "int8_activations": 0}
    assert s["int8"] == {"conv_linear": 41, "int8_weights": 41, "int8_activations": 41}
    layers = arts["int8"].metadata["layers"]
    assert all(r["weight"] == "int8 (per-channel)" for r in layers)
    assert layers[0]["module"] == "stem.0" and layers[-1]["module"] == "head.fc"
    # layer-scale is folded into fc2 before quantization: no quantized 1-D constant multiplies the residual branch
    prog, _ = coreml_proxy.read_program(arts["int8"].files[0])
    ops = [op for op in prog.functions["main"].operations]
    consts = [op for op in ops if op.op_type.startswith("constexpr_")]
    assert all(c.outputs[0].child_ops[0].op_type in ("conv", "linear") for c in consts)
    assert sum(op.op_type == "quantize" for op in ops) >= 41
    muls = [op for op in ops if op.op_type == "mul"]  # only the image input's scale; no γ multiply left
    assert len(muls) == 1 and muls[0].x.name == "image"
    # the package's own image preprocessing, read from its program (not from our record of it), is the deploy's
    # normalisation: pixel × 1/(255·std) + (−mean/std), per channel
    pp = built[0].preprocessing
    (add,) = muls[0].outputs[0].child_ops
    assert add.op_type == "add"
    scale = np.broadcast_to(np.asarray(muls[0].y.val, np.float64).reshape(-1), (3,))
    bias = np.broadcast_to(np.asarray(add.y.val, np.float64).reshape(-1), (3,))
    np.testing.assert_allclose(scale, [1 / (255 * s) for s in pp.std], rtol=1e-3)
    np.testing.assert_allclose(bias, [-m / s for m, s in zip(pp.mean, pp.std)], rtol=1e-3)


def test_proxies_read_back_what_the_package_holds(built):
    """The proxy's numbers are the package's: weights equal the package's dequantized INT8 weights, activation
    scales equal the package's quantize scales (stored in FP16 there)."""
    _, arts, *_ = built
    for precision in ("w8", "int8"):
        art = arts[precision]
        package_w = coreml_proxy.package_weights(art.files[0])
        proxy = torch.jit.load(str(art.files[0].parent / art.metadata["proxy_file"]))
        state = proxy.state_dict()
        proxy_w = []
        for k, v in state.items():
            if k.endswith(".weight") and v.dim() in (2, 4):
                w = v.float()
                scale = state.get(k + "_scale")
                if scale is not None:  # W8A8: the reference module fake-quantizes its float weight with these
                    shape = [-1] + [1] * (w.dim() - 1)
                    w = torch.clamp(torch.round(w / scale.view(shape)), -128, 127) * scale.view(shape)
                proxy_w.append(w.numpy())
        assert [w.shape for w in proxy_w] == [w.shape for w in package_w]
        for a, b in zip(proxy_w, package_w):
            # W8 runs in FP16: its proxy holds the package's weights rounded to FP16, as Core ML computes them
            np.testing.assert_allclose(a, b.astype(np.float16) if precision == "w8" else b, rtol=1e-6, atol=0)
    act = coreml_proxy.package_activation_scales(arts["int8"].files[0])
    state = torch.jit.load(str(arts["int8"].files[0].parent / arts["int8"].metadata["proxy_file"])).state_dict()
    proxy_scales = np.array(sorted({v.item() for k, v in state.items() if k.rsplit("_", 1)[0].endswith("_scale")}))
    package_scales = np.array(sorted({s for s, _ in act}))
    nearest = lambda a, b: np.abs(a[:, None] / b[None, :] - 1).min(axis=1)  # noqa: E731
    assert len(act) >= 80 and nearest(package_scales, proxy_scales).max() < 2e-3  # FP16 relative scales
    assert nearest(proxy_scales, package_scales).max() < 2e-3  # and no proxy scale is missing from the package


@pytest.fixture(scope="module")
def proxy_logits(built):
    """Each package's proxy runner and its logits on the 2,000 evaluation images, computed once for the tests below."""
    _, arts, x, _ = built
    runners = {p: coreml.load_runner(a, 2) for p, a in arts.items()}
    return runners, {p: np.concatenate([r.run(x[i:i + 500]) for i in range(0, len(x), 500)]) for p, r in runners.items()}


def test_fp16_proxy_matches_torch_fp32_before_quantization(built, proxy_logits):
    ck, _, x, _ = built
    with torch.no_grad():
        ref = ck.model(torch.from_numpy(x)).numpy()
    out = proxy_logits[1]["fp16"]
    assert len(out) == len(ref) == 2000
    assert np.abs(out - ref).max() < 0.05 and (out.argmax(1) == ref.argmax(1)).mean() >= 0.999


def test_w8a8_proxy_accuracy_on_the_reference_task(built, proxy_logits):
    *_, x, y = built
    runners, logits = proxy_logits
    assert all(r.proxy == coreml_proxy.PROXY_LABEL and not r.timed for r in runners.values())
    preds = predict_many({p: (lambda _, out=out: out) for p, out in logits.items()}, [(x, y)])
    for p in ("w8", "int8"):
        acc = accuracy(preds[p], preds["fp16"])
        print(f"\n{coreml_proxy.PROXY_LABEL}: atto {p} top-1 {acc['top1'] * 100:.2f}% on {acc['n']} test images, "
              f"drop {acc['top1_drop_pp']:+.2f} pp vs FP16, agreement {acc['agreement'] * 100:.2f}%")
        assert acc["top1_drop_pp"] <= 0.3 and acc["agreement"] >= 0.98


def test_pixels_round_trip_exactly(built):
    ck, _, x, _ = built
    px = coreml_apple.to_pixels(x[:50], ck.preprocessing.to_dict())
    back = (px.transpose(0, 3, 1, 2) / 255.0 - np.float32(ck.preprocessing.mean[0])) / np.float32(ck.preprocessing.std[0])
    np.testing.assert_allclose(back, x[:50], atol=1e-5)


@pytest.mark.skipif(AVAIL.ok, reason="the proxy path runs only where Core ML cannot predict")
def test_deploy_without_macos_exits_3_with_an_honest_report(coreml_deployed):
    out, p = coreml_deployed  # exit 3 asserted by the fixture
    assert "not executed by Core ML" in p.stderr and "Traceback" not in p.stderr
    r = json.loads((out / "report.json").read_text())
    assert r["notes"][0].startswith("not executed by Core ML: Core ML prediction needs macOS")
    assert r["latency"] == [] and "converter" in r["export"] and r["target"]["reference"] == "fp16"
    assert all(r["accuracy"][k]["proxy"] == coreml_proxy.PROXY_LABEL for k in ("fp16", "w8", "int8"))
    assert {f.name for f in (out / "artifacts").iterdir()} == {f"model_{p}.mlpackage" for p in ("fp16", "w8", "int8")}
    sizes = {a["precision"]: a["size_bytes"] for a in r["artifacts"]}
    assert sizes["int8"] < 0.6 * sizes["fp16"] and sizes["w8"] < 0.6 * sizes["fp16"]
    md = (out / "report.md").read_text()
    assert "Core ML proxy (not executed by Core ML)" in md and "Latency: **not measured**" in md
    assert "Per-layer precision" in md and "int8 (per-channel)" in md


@pytest.mark.macos
@needs_macos
def test_predict_on_macos_agrees_with_the_proxy(built):
    ck, arts, x, y = built
    for precision, art in arts.items():
        real, proxy = coreml.load_runner(art, 2), coreml_proxy.proxy_runner(art, 2)
        assert real.proxy is None and real.timed
        preds = predict_many({"coreml": real.run, "proxy": proxy.run},
                             ((x[i:i + 100], y[i:i + 100]) for i in range(0, 1000, 100)))
        assert accuracy(preds["coreml"], preds["proxy"])["agreement"] >= 0.98, precision
        assert set(coreml.extra_runners(art, 2)) == {"CPU_ONLY"}
