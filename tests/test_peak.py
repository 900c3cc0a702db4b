"""The distance to the limit: a model's multiply-accumulates, the runtime's own GEMM peak through its runner, and
the fraction one is of the other."""
import numpy as np
import pytest

from convnext_deploy.pipeline.measure import peak
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.pipeline.models.convnext import create_model
from convnext_deploy.targets import get_target
from convnext_deploy.targets.base import Artifact, gemm_onnx

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
    """The peak's graphs are real products: FP32 x·W, and INT8 with x quantized to u8 (scale 1/255) and the s8
    weights dequantized (scale 1/127), as the runtime runs them. x < 0.5 keeps every u8 at most 128, so no pair of
    u8×s8 products passes int16 (128·127·2 = 32,512): the product is exact on every INT8 path, VPMADDUBSW's too."""
    x = 0.5 * np.random.default_rng(3).random((64, 64), dtype=np.float32)
    for int8 in (False, True):
        path = tmp_path / f"g{int8}.onnx"
        gemm_onnx(path, int8, 64)
        w = _weights(path)
        expected = (np.round(x * 255) / 255) @ (w["w_q"].astype(np.float32) / 127) if int8 else x @ w["w"]
        got = _gemm_runner(target, path, int8)(x)
        assert np.allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max()), (target, int8)


def test_onnxruntime_u8s8_gemm_follows_this_cpus_int8_path(tmp_path):
    """Full-range u8 activations × full-range s8 weights: VNNI, AMX and ARM accumulate the exact products; AVX2
    without VNNI (VPMADDUBSW) saturates each pair sum at int16, and ONNX Runtime's result is then the
    pair-saturated product (tests/int8_paths.py), not x·W. The expected value is this CPU's path's, from its
    profile; tests/test_emulated_avx2.py runs this test on the saturating path where this CPU has VNNI."""
    profile = cpu_profile()
    path = tmp_path / "g.onnx"
    gemm_onnx(path, True, 64)
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


def test_the_peak_is_measured_once_per_machine_and_a_fraction_is_against_it(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(peak, "N", 256)
    spec = get_target("onnxruntime")
    logs: list[str] = []
    first = peak.runtime_peak(spec, 2, logs.append)
    again = peak.runtime_peak(spec, 2, logs.append)
    assert first == again and first["fp32"]["gmacs"] > 0 and first["int8"]["gmacs"] > 0
    assert first["threads"] == 2 and "onnxruntime" in first["runtime"]
    f = peak.fraction(4_000_000_000, 20.0, first, "int8")
    assert f["gmacs"] == pytest.approx(200.0) and f["fraction"] == pytest.approx(200.0 / first["int8"]["gmacs"], rel=1e-2)
    assert f["of"] == "int8" and peak.fraction(1, 1.0, first, "bf16") is None
