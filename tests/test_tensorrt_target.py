"""TensorRT: everything that runs without a GPU is tested here (the Q/DQ ONNX, its proxy numerics, the skip
path and its report); the engine tests are marked `gpu` and skip with the reason when TensorRT or a CUDA
device is missing."""
import json
import time

import numpy as np
import onnx
import pytest

from convnext_deploy.calibration.batches import load_array
from convnext_deploy.pipeline.measure.accuracy import accuracy, predict_many
from convnext_deploy.pipeline.measure.latency import measure
from convnext_deploy.targets import get_target, trt_gpu
from convnext_deploy.targets.base import Artifact, BuildRequest, CalibrationData, Runner

from conftest import copy_onnx, reference_split

trt = get_target("tensorrt")
AVAIL = trt.available()
needs_gpu = pytest.mark.skipif(not AVAIL.ok, reason=f"TensorRT engine cannot be built here: {AVAIL.reason}")


@pytest.fixture(scope="module")
def setup(atto_reference, atto_onnx, tmp_path_factory):
    data = reference_split(atto_reference, n_calib=500, n_eval=None)
    ck, train, test, split, calib_x = data.ck, data.train, data.test, data.split, data.calib_x
    d = tmp_path_factory.mktemp("trt")
    copy_onnx(atto_onnx, d / "model.onnx")
    arts = {}
    for precision in ("fp32", "int8"):
        (d / precision).mkdir()
        arts[precision] = trt.build(BuildRequest(precision, d / "model.onnx", ck.model, d / precision,
                                                 CalibrationData(calib_x, "m", train.name), input_sizes=(32, 224),
                                                 options=trt.make_options()))
    return ck, arts, test, split


def test_table_row():
    assert trt.module == "convnext_deploy.targets.trt_gpu" and trt.precisions == ("fp32", "int8") and trt.options is trt_gpu.TensorRTOptions
    assert trt.not_built_note == "engine not built" and trt.int8_recipes == () and not trt.accuracy_control
    assert trt.layer_probe is trt_gpu.layer_probe
    assert trt.build_config("fp32", trt.make_options(calibrate_method="entropy")) == \
        {"max_batch": 32, "opt_batch": 1, "workspace_mib": 4096}  # the calibration shapes no float engine
    assert trt.build_config("int8", trt.make_options(float_layers=["stem.0"]))["float_layers"] == ["stem.0"]
    with pytest.raises(ValueError, match="calibration method"):
        trt.build_config("int8", trt.make_options(calibrate_method="kl"))


def test_latency_harness_uses_the_device_clock_of_a_runner_that_has_one():
    """An engine runner's `device_ms` (CUDA events around the engine) is what the harness times; a runner
    without one is timed by the host's clock around `run`."""
    calls = {"run": 0, "device_ms": 0}

    def slow(batch):
        calls["run"] += 1
        time.sleep(0.002)
        return np.zeros((len(batch), 10), np.float32)

    def device_ms(batch):
        calls["device_ms"] += 1
        slow(batch)
        return 0.25

    engine = Runner(slow, "fake engine", "fake GPU", "int8", 1, device_ms=device_ms)
    host = Runner(slow, "fake", "cpu", "fp32", 1)
    lat = measure({"engine": engine, "host": host}, batch=2, input_size=32, runs=10, warmup=2, rounds=2)
    assert lat["engine"].p50_ms == lat["engine"].p99_ms == pytest.approx(0.25)
    assert lat["engine"].images_per_s == pytest.approx(2 * 1e3 / 0.25)
    assert lat["host"].p50_ms >= 2.0
    assert calls["device_ms"] == 2 + 10 + 2  # warm-up, timed and each round's re-warm call: all on the device clock


def test_availability_says_exactly_what_is_missing():
    if AVAIL.ok:
        pytest.skip("TensorRT and a CUDA device are present")
    assert AVAIL.proxy and ("tensorrt is not installed" in AVAIL.reason or "no CUDA device" in AVAIL.reason)
    assert "convnext-deploy[tensorrt]" in AVAIL.reason or "NVIDIA GPU" in AVAIL.reason


def test_qdq_graph_follows_tensorrt_rules(setup):
    _, arts, *_ = setup
    q = arts["int8"].metadata["qdq"]
    # every Conv (16) and pointwise MatMul (24) + the head Gemm/MatMul is fed by DequantizeLinear on both inputs
    assert len(q["quantized"]) == 41 and q["float_conv_matmul"] == []
    assert q["nonzero_zero_points"] == 0  # symmetric INT8 only
    model = onnx.load(str(arts["int8"].files[0]))
    out_ch = {}
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8:
            out_ch[n.output[0]] = (list(inits[n.input[0]].dims), int(np.prod(inits[n.input[1]].dims) or 1),
                                   next((a.i for a in n.attribute if a.name == "axis"), 1))
    conv_mm = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    per_channel = 0
    for n in conv_mm:
        dims, scales, axis = out_ch[n.input[1]]
        expected = dims[0] if n.op_type == "Conv" else dims[1] if n.op_type == "MatMul" else dims[0]
        assert scales in (expected, 1), f"{n.name}: {scales} scales for {expected} output channels"
        per_channel += scales == expected
        assert len(n.input) < 3 or n.input[2] in inits  # biases stay float: TensorRT folds them into the kernel
    assert per_channel >= 40  # per output channel everywhere the quantizer offers it
    # no Q/DQ around GELU or Add: dequantized tensors feed Conv/MatMul/Gemm, and the Transpose from each Conv to its
    # LayerNorm (stem + 12 blocks of atto: ModelOpt's Conv → LayerNorm placement, INT8-out Conv kernels in TensorRT)
    assert set(q["dq_consumers"]) <= {"Conv", "MatMul", "Gemm", "Transpose"}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ln_qdq = 0
    for ln in (n for n in model.graph.node if n.op_type == "LayerNormalization"):
        t = producer[ln.input[0]]
        assert t.op_type in ("Transpose", "ReduceMean")
        if t.op_type == "Transpose" and producer[t.input[0]].op_type == "DequantizeLinear":
            qn = producer[producer[t.input[0]].input[0]]
            assert qn.op_type == "QuantizeLinear" and producer[qn.input[0]].op_type == "Conv"
            ln_qdq += 1
    assert ln_qdq == 13
    for n in model.graph.node:  # every other reader of a quantized tensor reads it in float (the residual Adds)
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            assert {c.op_type for c in consumers[n.output[0]]} <= {"Conv", "MatMul", "Gemm", "Transpose"}


def test_the_onnx_handed_to_tensorrt_is_strongly_typed_fp16_with_int8_qdq(setup):
    """TensorRT 11 takes every type from the ONNX: float parts FP16 (scales too, so each DequantizeLinear gives
    FP16), INT8 Q/DQ with zero point 0, the graph's input and output FP32; the fp32 artifact stays FP32."""
    from onnx import TensorProto, numpy_helper

    from convnext_deploy.targets.trt_onnx import QDQ_FP32_FILE, float_types

    _, arts, *_ = setup
    model = onnx.load(str(arts["int8"].files[0]))
    g = model.graph
    assert [f.name for f in arts["int8"].files[:2]] == ["model_int8.onnx", QDQ_FP32_FILE]
    assert float_types(model)["fp32"] == [] and float_types(model)["fp16"] > 100
    assert TensorProto.FLOAT not in {i.data_type for i in g.initializer}
    assert [(v.name, v.type.tensor_type.elem_type) for v in (*g.input, *g.output)] == \
        [("input", TensorProto.FLOAT), ("logits", TensorProto.FLOAT)]
    inits = {i.name: i for i in g.initializer}
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 100
    for n in qdq:
        assert inits[n.input[1]].data_type == TensorProto.FLOAT16, n.name
        zp = inits[n.input[2]]  # an absent zero point would mean UINT8
        assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any(), n.name
    assert all(a.i == 1 for n in g.node if n.op_type == "LayerNormalization" for a in n.attribute
               if a.name == "stash_type")  # FP32 statistics
    assert arts["int8"].metadata["onnx_types"]["float"] == "fp16"
    assert TensorProto.FLOAT16 not in {i.data_type for i in onnx.load(str(arts["fp32"].files[0])).graph.initializer}


def test_the_fp16_engine_onnx_computes_the_fp32_export(setup, tmp_path):
    """The fp16 engine's ONNX is the export with its float parts in FP16: on ONNX Runtime it gives the export's
    logits to FP16 precision."""
    from convnext_deploy.targets.ort_tools import runner
    from convnext_deploy.targets.trt_onnx import float_types

    ck, arts, test, split = setup
    art = trt.build(BuildRequest("fp16", arts["fp32"].files[0], ck.model, tmp_path, None, input_sizes=(32, 224),
                                 options=trt.make_options()))
    assert float_types(onnx.load(str(art.files[0])))["fp32"] == [] and art.metadata["onnx_types"]["io"] == "fp32"
    x, _ = load_array(test, split.evaluation.indices[:256], ck.preprocessing)
    half, full = (runner(a.files[0], 2, p, optimize=False).run(x) for a, p in ((art, "fp16"), (arts["fp32"], "fp32")))
    assert np.abs(half - full).max() < 0.05 * np.abs(full).max() and (half.argmax(1) == full.argmax(1)).mean() >= 0.99


def test_proxy_accuracy_matches_fp32_on_the_reference_task(setup):
    """The ONNX TensorRT parses (FP16 float parts, INT8 Q/DQ), run by ONNX Runtime: within 0.3 pp of FP32 on 5,000
    test images (15 images)."""
    ck, arts, test, split = setup
    runners = {p: trt.load_runner(a, 2) for p, a in arts.items()}
    assert all(r.proxy == trt_gpu.PROXY_LABEL and not r.timed and r.device_ms is None for r in runners.values())
    assert "fp16" in runners["int8"].precision
    x, y = load_array(test, split.evaluation.indices[:5000], ck.preprocessing)
    preds = predict_many({p: r.run for p, r in runners.items()},
                         ((x[i:i + 500], y[i:i + 500]) for i in range(0, len(x), 500)))
    acc, ref = accuracy(preds["int8"], preds["fp32"]), accuracy(preds["fp32"])
    print(f"\n{trt_gpu.PROXY_LABEL}: atto FP32 top-1 {ref['top1'] * 100:.2f}%, INT8 (FP16 float parts) "
          f"{acc['top1'] * 100:.2f}% on {len(x):,} test images, drop {acc['top1_drop_pp']:+.2f} pp, agreement "
          f"{acc['agreement'] * 100:.2f}%")
    assert acc["top1_drop_pp"] <= 0.3 and acc["agreement"] >= 0.98


def test_layer_probe_is_the_qdq_graph_as_written(setup):
    """The sensitivity probe runs the quantizer's FP32 Q/DQ graph as written (the FP16 one could not take a floated
    layer's FP32 weights); with every layer in float it is the FP32 export."""
    from convnext_deploy.pipeline.decisions.sensitivity import run_probe

    ck, arts, test, split = setup
    x, _ = load_array(test, split.evaluation.indices[:32], ck.preprocessing)
    probe = trt.layer_probe(arts, x, 2, model=ck.model)
    assert probe.kind == "proxy" and probe.runtime == trt_gpu.PROXY_LABEL
    assert probe.layers == arts["int8"].metadata["qdq"]["quantized"]
    result = run_probe(probe, log=lambda m: None)
    assert result["float_graph_max_abs_diff"] < 1e-3 and len(result["layers"]) == 41


@pytest.mark.skipif(AVAIL.ok, reason="the skip path runs only where the engine cannot be built")
def test_deploy_skip_path_exits_3_with_an_honest_report(tensorrt_deployed):
    for allow, name in ((False, "strict"), (True, "allow")):
        out, p = tensorrt_deployed[name]
        assert p.returncode == 3, p.stdout + p.stderr
        assert "engine not built" in p.stderr and "Traceback" not in p.stderr
        r = json.loads((out / "report.json").read_text())
        assert r["engine_built"] is False and r["notes"][0].startswith("engine not built: ")
        assert r["latency"] == [] and any("latency not measured" in n for n in r["notes"])
        assert all(a["kind"] == "proxy" for k, a in r["accuracy"].items() if k != "torch_fp32")
        assert r["accuracy"]["int8"]["proxy"] == trt_gpu.PROXY_LABEL
        status = {v["gate"]: v["status"] for v in r["gates"]["verdicts"]}
        assert status["min_int8_speedup"] == "not measured"
        assert status["max_top1_drop_pp"] == ("pass" if allow else "proxy not allowed")
        md = (out / "report.md").read_text()
        assert "engine not built" in md and "Q/DQ ONNX on ONNX Runtime CPU (proxy for the TensorRT engine)" in md
        assert {f.name for f in (out / "artifacts").iterdir()} == \
            {"model_fp32.onnx", "model_int8.onnx", "model_int8_qdq_fp32.onnx"}


@pytest.mark.gpu
@needs_gpu
def test_engine_builds_and_matches_its_proxy(setup, tmp_path):
    ck, arts, test, split = setup
    assert any(f.suffix == ".engine" for f in arts["int8"].files)
    engine = trt.load_runner(arts["int8"], 1)
    assert engine.proxy is None and engine.device_ms is not None
    proxy = trt_gpu.load_runner(Artifact(trt_gpu.NAME, "int8", arts["int8"].files[:1], arts["int8"].metadata), 2)
    assert proxy.proxy == trt_gpu.PROXY_LABEL
    x, y = load_array(test, split.evaluation.indices[:2000], ck.preprocessing)
    preds = predict_many({"engine": engine.run, "proxy": proxy.run},
                         ((x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)))
    # the engine computes what its Q/DQ graph says: same accuracy as the proxy within FP16/INT8 kernel rounding
    acc, ref = accuracy(preds["engine"], preds["proxy"]), accuracy(preds["proxy"])
    print(f"\nTensorRT INT8 engine: top-1 {acc['top1'] * 100:.2f}% (proxy {ref['top1'] * 100:.2f}%), "
          f"agreement with the proxy {acc['agreement'] * 100:.2f}% on {len(x)} test images")
    assert acc["agreement"] >= 0.98 and abs(acc["top1_drop_pp"]) <= 0.5
    assert engine.device_ms(x[:1]) > 0  # the engine's own GPU time
    settings = json.loads(next(f for f in arts["int8"].files if f.suffix == ".json").read_text())
    assert settings["network"] == "strongly typed" and settings["profile"]["max"][2] == 224


def test_fp16_conversion_regrids_weight_channels_whose_scale_fp16_cannot_state(tmp_path):
    """A channel of tiny weights (a layer-scale γ near 0 folded in) has a per-channel scale below FP16's normal
    range: it is moved onto the grid of its scale rounded up to FP16, every weight within half a step, none
    clipped; the converted graph runs on ONNX Runtime and computes what the FP32 Q/DQ graph computes."""
    from onnx import TensorProto, helper, numpy_helper

    from convnext_deploy.targets.ort_tools import runner
    from convnext_deploy.targets.trt_onnx import to_fp16

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    w_scale = np.array([0.01, 0.002, 3e-7, 2e-8], np.float32)  # the last two: subnormal, and 0, in FP16
    arrays = {"w_q": w, "w_scale": w_scale, "w_zp": np.zeros(4, np.int8), "x_scale": np.array(0.02, np.float32),
              "x_zp": np.array(0, np.int8), "b": rng.normal(size=4).astype(np.float32)}
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "q.onnx"))
    summary = to_fp16(tmp_path / "q.onnx", tmp_path / "h.onnx")
    assert summary["weight_channels_regridded"] == 2
    h = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "h.onnx")).graph.initializer}
    assert h["w_scale"].dtype == np.float16 and (h["w_scale"] > 0).all()
    assert (h["w_scale"][:2] == w_scale[:2].astype(np.float16)).all() and (h["w_q"][:2] == w[:2]).all()
    before = w.astype(np.float32) * w_scale[:, None, None, None]
    after = h["w_q"].astype(np.float32) * h["w_scale"].astype(np.float32)[:, None, None, None]
    step = h["w_scale"].astype(np.float32)[2:, None, None, None]
    assert (np.abs(after[2:] - before[2:]) <= step / 2 + 1e-12).all()
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    y32, y16 = (runner(tmp_path / f, 1, "t", optimize=False).run(x) for f in ("q.onnx", "h.onnx"))
    assert y16.dtype == np.float32 and np.abs(y16 - y32).max() < 2e-2 * np.abs(y32).max()
