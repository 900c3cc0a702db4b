"""The distance to the limit: a model's multiply-accumulates, the runtime's own GEMM peak through its runner, and
the fraction one is of the other."""
import numpy as np
import pytest

from convnext_deploy.pipeline.measure import peak
from convnext_deploy.pipeline.models.convnext import create_model
from convnext_deploy.targets import get_target
from convnext_deploy.targets.base import Artifact, gemm_onnx


def test_convnext_t_has_its_published_multiply_accumulates():
    """ConvNeXt-T at 224 px: 4.5 G (Liu et al. 2022, Table 1 FLOPs, counted as multiply-accumulates); the count is
    every Conv and Linear, each output element times its fan-in."""
    macs = peak.model_macs(create_model("t", num_classes=1000), 224)
    assert 4.4e9 < macs < 4.6e9
    atto = peak.model_macs(create_model("atto", num_classes=10), 224)
    assert atto < macs / 8 and peak.model_macs(create_model("atto", num_classes=10), 448) == pytest.approx(4 * atto, rel=0.01)


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_the_gemm_graphs_compute_a_matrix_product_through_the_runtime(target, tmp_path):
    """The peak's graphs are real products: FP32 x·W, and INT8 with x quantized to u8 (scale 1/255) and the s8
    weights dequantized (scale 1/127), as the runtime runs them."""
    import onnx
    from onnx import numpy_helper

    spec = get_target(target)
    x = np.random.default_rng(3).random((64, 64), dtype=np.float32)
    for int8 in (False, True):
        path = tmp_path / f"g{int8}.onnx"
        gemm_onnx(path, int8, 64)
        w = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        expected = (np.round(x * 255) / 255) @ (w["w_q"].astype(np.float32) / 127) if int8 else x @ w["w"]
        run = spec.load_runner(Artifact(target, "int8" if int8 else "fp32", [path], {"build": {"float_precision": "f32"}}), 2).run
        assert np.allclose(run(x), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max()), (target, int8)


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
