"""The ONNX Runtime target on the real atto reference checkpoint and real Fashion-MNIST images."""
import numpy as np
import pytest

from convnext_deploy.pipeline.measure.accuracy import accuracy, predict_many
from convnext_deploy.targets import get_target
from convnext_deploy.targets.base import BuildRequest, CalibrationData

from conftest import copy_onnx, reference_split

ort_cpu = get_target("onnxruntime")


@pytest.fixture(scope="module")
def setup(atto_reference, atto_onnx, tmp_path_factory):
    data = reference_split(atto_reference, n_calib=200, n_eval=2000)
    eval_x, eval_y = data.load("evaluation")
    d = tmp_path_factory.mktemp("ort")
    copy_onnx(atto_onnx, d / "model.onnx")
    return data.ck, d, CalibrationData(data.calib_x, "test", data.train.name), eval_x, eval_y


def _build(setup, precision, **options):
    ck, d, calib, *_ = setup
    out = d / f"{precision}-{'-'.join(f'{k}{v}' for k, v in sorted(options.items()))}"
    out.mkdir()
    return ort_cpu.build(BuildRequest(precision, d / "model.onnx", ck.model, out, calib,
                                      options=ort_cpu.make_options(**options)))


def _predict(setup, artifacts):
    *_, x, y = setup
    runners = {k: ort_cpu.load_runner(a, 2).run for k, a in artifacts.items()}
    return predict_many(runners, ((x[i:i + 250], y[i:i + 250]) for i in range(0, len(x), 250)))


def test_table_row_and_availability():
    spec = get_target("onnxruntime")
    assert spec.module == "convnext_deploy.targets.ort_cpu" and spec.precisions == ("fp32", "int8")
    assert ort_cpu.available().ok


def test_int8_runs_integer_kernels_and_keeps_accuracy(setup):
    fp32, int8 = _build(setup, "fp32"), _build(setup, "int8")
    ops = int8.metadata["ops"]
    # every Conv (stem, 3 downsamples, 12 depthwise) and every pointwise MatMul runs as an integer kernel
    assert ops["integer_kernels"].get("QLinearConv", 0) == 16
    assert ops["integer_kernels"].get("QLinearMatMul", 0) + ops["integer_kernels"].get("MatMulIntegerToFloat", 0) == 24
    assert ops["float_conv_matmul_left"] == 0
    assert fp32.metadata["ops"]["integer_kernel_count"] == 0
    preds = _predict(setup, {"fp32": fp32, "int8": int8})
    acc = accuracy(preds["int8"], preds["fp32"])
    print(f"\natto INT8 vs FP32 on 2000 Fashion-MNIST test images: top-1 {acc['top1'] * 100:.2f}% "
          f"(drop {acc['top1_drop_pp']:+.2f} pp), agreement {acc['agreement'] * 100:.2f}%")
    assert acc["agreement"] >= 0.98 and acc["top1_drop_pp"] <= 1.0


def test_peer_default_leaves_float_convs(setup):
    """Why our recipe differs from quantize_static's defaults: they leave Conv in float on x86."""
    peer = _build(setup, "int8", recipe="quantize_static defaults")
    assert peer.metadata["ops"]["float_conv_matmul_left"] > 0


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_calibration_methods_are_selectable(setup, method):
    art = _build(setup, "int8", calibrate_method=method)
    assert art.metadata["quantization"]["calibrate_method"] == method
    preds = _predict(setup, {"int8": art})
    assert accuracy(preds["int8"])["top1"] > 0.8


@pytest.mark.parametrize("recipe", [r for r in ort_cpu.int8_recipes if r.name.endswith(("(U8S8, 7-bit weights)", "(U8U8)"))],
                         ids=lambda r: r.name)
def test_the_candidates_for_cpus_without_vnni_build_integer_graphs(setup, recipe):
    """reduce_range and U8U8: ONNX Runtime's advice where u8×s8 saturates; `--recipe auto` measures them."""
    art = _build(setup, "int8", **recipe.options)
    q = art.metadata["quantization"]
    assert all(q[k] == v for k, v in recipe.options.items())
    assert art.metadata["ops"]["float_conv_matmul_left"] == 0
    preds = _predict(setup, {"int8": art})
    assert accuracy(preds["int8"])["top1"] > 0.8


def test_an_option_the_target_lacks_is_refused_by_name():
    from convnext_deploy.pipeline.core.errors import UserError

    with pytest.raises(UserError, match="no build option 'preset'"):
        ort_cpu.make_options(preset="mixed")


def test_int8_without_calibration_is_refused(setup):
    ck, d, *_ = setup
    with pytest.raises(ValueError, match="calibration"):
        ort_cpu.build(BuildRequest("int8", d / "model.onnx", ck.model, d, calibration=None))


def test_profile_says_where_the_time_goes(setup):
    """ONNX Runtime's profiler: per-node kernel times, split into integer kernels, Q/DQ and float ops."""
    from convnext_deploy.targets import ort_cpu as module

    fp32, int8 = _build(setup, "fp32", float_layers=()), _build(setup, "int8", float_layers=())
    ref, q = module.profile(fp32, 2, 64, runs=5), module.profile(int8, 2, 64, runs=5)
    for p in (ref, q):
        assert p["total_ms"] > 0 and sum(p["by_kind_ms"].values()) == pytest.approx(p["total_ms"])
        assert sum(p["by_op_ms"].values()) == pytest.approx(p["total_ms"]) and len(p["top_nodes"]) == 10
        assert p["top_nodes"][0]["ms"] >= p["top_nodes"][-1]["ms"]
    assert ref["by_kind_ms"]["integer kernels"] == 0 and q["by_kind_ms"]["integer kernels"] > 0
    assert {"QLinearConv", "MatMulIntegerToFloat"} <= set(q["by_op_ms"])
    # one kernel per weight layer, in network order, in both graphs (the latency-aware step pairs them)
    assert len(ref["layers"]) == len(q["layers"]) == 41
    assert q["layers"][0]["op"] == "QLinearConv" and ref["layers"][-1]["op"] in ("Gemm", "FusedGemm")
    assert all(r["ms"] > 0 and 0 <= r["input_quantize_ms"] <= r["ms"] for r in q["layers"])


def test_the_users_own_paths_are_optimums_static_configs(setup, tmp_path):
    """The bench's peers for ONNX Runtime: Optimum's avx512_vnni and avx2 static settings on our FP32 ONNX: Q/DQ on
    the MatMuls (and Adds) only, so every convolution stays float; s8 weights for VNNI, u8 for AVX2; per-channel."""
    import onnx

    from convnext_deploy.targets.ort_peer import PATHS

    ck, d, calib, *_ = setup
    paths = ort_cpu.user_paths(BuildRequest("int8", d / "model.onnx", ck.model, tmp_path, calib))
    assert list(paths) == [label for label, _ in PATHS]
    for (label, weight_type), art in zip(PATHS, paths.values()):
        g = onnx.load(str(art.files[0])).graph
        producers = {o: n for n in g.node for o in n.output}
        inits = {i.name: i for i in g.initializer}
        int8_weights = {n.op_type for n in g.node if n.op_type in ("Conv", "MatMul") and len(n.input) > 1
                        and producers.get(n.input[1]) is not None and producers[n.input[1]].op_type == "DequantizeLinear"}
        assert int8_weights == {"MatMul"}, label  # every convolution keeps float weights
        weight_zero_points = [inits[n.input[2]] for n in g.node if n.op_type == "DequantizeLinear"
                              and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
        assert weight_zero_points and all(len(z.dims) == 1 for z in weight_zero_points)  # per channel
        dtype = {"QInt8": onnx.TensorProto.INT8, "QUInt8": onnx.TensorProto.UINT8}[weight_type]
        assert {z.data_type for z in weight_zero_points} == {dtype}, label
    (tmp_path / "fp32").mkdir()
    fp32 = ort_cpu.build(BuildRequest("fp32", d / "model.onnx", ck.model, tmp_path / "fp32"))
    preds = _predict(setup, {"fp32": fp32, **paths})
    for label in paths:
        assert accuracy(preds[label], preds["fp32"])["agreement"] >= 0.97, label


def test_parallel_sessions_classify_a_stream_like_one_session(setup, tmp_path):
    """ONNX Runtime's throughput mode: sessions side by side, each image once and in order, the same logits as the
    latency runner."""
    import numpy as np

    from convnext_deploy.pipeline.measure.throughput import throughput

    ck, d, _, x, _ = setup
    art = ort_cpu.build(BuildRequest("fp32", d / "model.onnx", ck.model, tmp_path))
    run_many = ort_cpu.stream_runner(art, 2, x.shape[-1])
    got = run_many(x[:7])  # an odd count: the sessions take unequal shares
    assert np.allclose(got, ort_cpu.load_runner(art, 2).run(x[:7]), atol=1e-4)
    figures = throughput({"streams": run_many}, x.shape[-1], seconds=0.2)
    assert figures["streams"]["images_per_s"] > 0 and figures["streams"]["rounds"] >= 3


def test_the_lean_calibrator_measures_the_librarys_ranges_holding_the_weights_once(setup, tmp_path):
    """quantize_static's calibrator under `lean_calibration`: a session in the order that frees tensors soonest and
    no copy of the augmented graph, the same ranges to the bit; the library's own session factory is back after."""
    import contextlib

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import CalibraterBase, create_calibrator

    from convnext_deploy.targets.ort_tools import CalibrationReader, lean_calibration, pre_process

    _, d, calib, *_ = setup
    pre = tmp_path / "pre.onnx"
    pre_process(d / "model.onnx", pre)
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    library = CalibraterBase.create_inference_session

    def calibrated(lean: bool):
        with lean_calibration() if lean else contextlib.nullcontext():
            c = create_calibrator(pre, augmented_model_path=str(tmp_path / f"augmented-{lean}.onnx"),
                                  calibrate_method=CalibrationMethod.MinMax)
        c.collect_data(CalibrationReader(calib, name))
        return c, c.compute_data()

    (lean, lean_ranges), (own, own_ranges) = calibrated(True), calibrated(False)
    assert CalibraterBase.create_inference_session is library
    order = {c: c.infer_session.get_session_options().execution_order for c in (lean, own)}
    assert order[lean] == ort.ExecutionOrder.PRIORITY_BASED != order[own]
    assert lean.model is None and own.model is not None
    assert set(lean_ranges.data) == set(own_ranges.data) and len(own_ranges.data) > 50
    for tensor, r in own_ranges.data.items():
        assert all(np.array_equal(a, b) for a, b in zip(lean_ranges.data[tensor].range_value, r.range_value)), tensor
