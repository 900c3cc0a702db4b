"""The distance to the limit: a model's multiply-accumulates, the runtime's own peak through its runner (the fastest of
a GEMM and a 1×1 convolution that executed in the precision, as the runtime reads back), and the fraction one is of
the other."""
import numpy as np
import pytest

from convnext_deploy.pipeline.measure import peak
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.pipeline.models.convnext import create_model
from convnext_deploy.targets import get_target
from convnext_deploy.targets.base import Artifact, peak_onnx

from int8_paths import pair_saturated_matmul


def test_convnext_t_has_its_published_multiply_accumulates():
    """ConvNeXt-T at 224 px: 4.5 G (Liu et al. 2022, Table 1 FLOPs, counted as multiply-accumulates); the count is
    every Conv and Linear, each output element times its fan-in."""
    macs = peak.model_macs(create_model("t", num_classes=1000), 224)
    assert 4.4e9 < macs < 4.6e9
    atto = peak.model_macs(create_model("atto", num_classes=10), 224)
    assert atto < macs / 8 and peak.model_macs(create_model("atto", num_classes=10), 448) == pytest.approx(4 * atto, rel=0.01)


def _gemm_runner(target: str, path, int8: bool):
    spec = get_target(target)
    art = Artifact(target, "int8" if int8 else "fp32", [path], {"build": {"float_precision": "f32"}})
    return spec.load_runner(art, 2).run


def _weights(path) -> dict:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_the_gemm_graphs_compute_a_matrix_product_through_the_runtime(target, tmp_path):
    """The peak's graphs are real products, in both forms: FP32 x·W, and INT8 with x quantized to u8 (scale 1/255)
    and the s8 weights dequantized (scale 1/127), as the runtime runs them. x < 0.5 keeps every u8 at most 128, so no
    pair of u8×s8 products passes int16 (128·127·2 = 32,512): the product is exact on every INT8 path, VPMADDUBSW's
    too. The 1×1 convolution's INT8 output is quantized (Q → DQ), so it holds within half its output step."""
    rng = np.random.default_rng(3)
    for form in ("gemm", "conv1x1"):
        for int8 in (False, True):
            path = tmp_path / f"{form}{int8}.onnx"
            shape = peak_onnx(path, form, int8, 64)
            x = 0.5 * rng.random(shape, dtype=np.float32)
            w = _weights(path)
            weight = (w["w_q"].astype(np.float32) / 127 if int8 else w["w"]).reshape(64, 64)
            xs = np.round(x * 255) / 255 if int8 else x
            # a 1×1 convolution is W (out, in) times the pixels' channel vectors
            expected = xs @ weight if form == "gemm" else (weight @ xs.reshape(64, -1)).reshape(shape)
            step = float(w["y_scale"]) / 2 if int8 and form == "conv1x1" else 0.0
            got = _gemm_runner(target, path, int8)(x)
            assert got.shape == expected.shape
            atol = 1e-3 * np.abs(expected).max() + step
            assert np.allclose(got, expected, rtol=1e-3, atol=atol), (target, form, int8)


def test_onnxruntime_u8s8_gemm_follows_this_cpus_int8_path(tmp_path):
    """Full-range u8 activations × full-range s8 weights: VNNI, AMX and ARM accumulate the exact products; AVX2
    without VNNI (VPMADDUBSW) saturates each pair sum at int16, and ONNX Runtime's result is then the
    pair-saturated product (tests/int8_paths.py), not x·W. The expected value is this CPU's path's, from its
    profile; tests/test_emulated_avx2.py runs this test on the saturating path where this CPU has VNNI."""
    profile = cpu_profile()
    path = tmp_path / "g.onnx"
    peak_onnx(path, "gemm", True, 64)
    w_q = _weights(path)["w_q"]
    x = np.random.default_rng(5).uniform(0.8, 1.0, (64, 64)).astype(np.float32)
    x_q = np.round(x * 255).astype(np.uint8)
    exact, saturated = x_q.astype(np.int64) @ w_q.astype(np.int64), pair_saturated_matmul(x_q, w_q)
    assert np.abs(exact - saturated).max() > 1000  # the inputs do saturate where pairs can
    got = _gemm_runner("onnxruntime", path, True)(x).astype(np.float64) * 255 * 127  # back to integer units
    expected, other = (saturated, exact) if profile["u8s8_saturates"] else (exact, saturated)
    print(f"\n{profile['int8_path']}: max |ORT - expected| {np.abs(got - expected).max():.3g}, "
          f"max |ORT - other path| {np.abs(got - other).max():.3g} (integer units)")
    assert np.abs(got - expected).max() < 1.0, profile["int8_path"]
    assert np.abs(got - other).max() > 1000, profile["int8_path"]


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_the_peak_is_each_forms_rate_in_the_precision_it_executed_once_per_machine(target, monkeypatch, tmp_path):
    """Both forms are measured in each precision with what the runtime says executed them (OpenVINO: each compute
    layer's precision and kernel; ONNX Runtime: the integer kernels of its fused graph); the peak is the fastest
    form that ran in the precision, measured once (cached), and a rate is a fraction of it."""
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(peak, "N", 256)
    spec = get_target(target)
    logs: list[str] = []
    first = peak.runtime_peak(spec, 2, logs.append)
    again = peak.runtime_peak(spec, 2, logs.append)
    assert first == again and first["threads"] == 2 and target in first["runtime"] and not first["absent"]
    for precision in ("fp32", "int8"):
        forms = first["forms"][precision]
        assert set(forms) == {"gemm", "conv1x1"} and all(f["gmacs"] > 0 and f["executed"] for f in forms.values())
        assert all(("reason" in f) == (f["ran"] != precision) for f in forms.values()), forms
        best = max((f for f in forms.values() if f["ran"] == precision), key=lambda f: f["gmacs"])
        assert first[precision] == {"gmacs": best["gmacs"], "ms": best["ms"], "form": best["form"]}
    if cpu_profile()["path"] in ("amx", "vnni", "avx2"):  # both runtimes have x86 integer kernels for both forms
        integer = {"onnxruntime": ("MatMulIntegerToFloat", "QLinearConv"),
                   "openvino": ("FullyConnected u8", "Convolution u8")}[target]
        for form, kernel in zip(("gemm", "conv1x1"), integer):
            ran = first["forms"]["int8"][form]
            assert ran["ran"] == "int8" and kernel in ran["executed"], ran
    f = peak.fraction(first["int8"]["gmacs"] * 0.5e7, 10.0, first, "int8")  # MACs over 10 ms: half the peak
    assert f["gmacs"] == pytest.approx(first["int8"]["gmacs"] / 2, abs=0.1)
    assert f["fraction"] == pytest.approx(0.5, abs=1e-3)
    assert f["of"] == "int8" and f["peak_form"] == first["int8"]["form"]
    assert peak.fraction(1, 1.0, first, "bf16") is None
    above = peak.fraction(first["int8"]["gmacs"] * 2e7, 10.0, first, "int8")  # twice the peak: the peak is wrong
    assert above["bad_peak"] and above["fraction"] is None


def _float_conv(monkeypatch, forms: tuple[str, ...]) -> None:
    """The INT8 graph of `forms` written as a 1×1 convolution with a float output (no Q → DQ after it): ONNX Runtime
    fuses no QLinearConv then and runs a float Conv on the dequantized weights, a real INT8 graph run in float."""
    import onnx

    def write(path, form, int8, n):
        shape = peak_onnx(path, "conv1x1" if int8 and form in forms else form, int8, n)
        if int8 and form in forms:
            model = onnx.load(str(path))
            nodes = [nd for nd in model.graph.node if nd.output[0] not in ("y_q", "y")]
            nodes[-1].output[0] = "y"
            del model.graph.node[:]
            model.graph.node.extend(nodes)
            onnx.save(model, str(path))
        return shape

    monkeypatch.setattr(peak, "peak_onnx", write)


def test_a_form_the_runtime_ran_in_float_is_never_the_int8_peak(monkeypatch, tmp_path):
    """Read back, not assumed: ONNX Runtime runs the float-output convolution's INT8 graph as a float Conv, so the
    form is recorded with what ran it and the INT8 peak is the GEMM's; with no form run in INT8, there is no INT8
    peak, only the reason, and a model's INT8 rate says so instead of a fraction."""
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(peak, "N", 256)
    spec = get_target("onnxruntime")
    _float_conv(monkeypatch, ("conv1x1",))
    one = peak.runtime_peak(spec, 2, lambda m: None)
    conv = one["forms"]["int8"]["conv1x1"]
    assert conv["ran"] == "fp32" and "executed in fp32, not INT8" in conv["reason"] and "Conv ×1" in conv["executed"]
    assert one["int8"]["form"] == "GEMM" and one["int8"]["gmacs"] == one["forms"]["int8"]["gemm"]["gmacs"]
    _float_conv(monkeypatch, ("gemm", "conv1x1"))
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", str(tmp_path / "both"))  # the graphs changed, not the code
    none = peak.runtime_peak(spec, 2, lambda m: None)
    assert "int8" not in none and none["absent"]["int8"].startswith("no form executed in INT8: the GEMM")
    assert "fp32" in none and peak.fraction(10**9, 10.0, none, "int8")["no_peak"] == none["absent"]["int8"]
