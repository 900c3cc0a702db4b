"""targets.image_input: artifacts that take the uint8 image (NHWC) with mean/std inside, and carry their labels and
input rule; the same top-1 as the float-tensor artifact on the evaluation set, logits within the INT8 tolerance."""
import json
import re
import tokenize

import numpy as np
import onnx
import pytest

from convnext_deploy.pipeline.measure.latency import measure
from convnext_deploy.pipeline.models.onnx_export import export_onnx
from convnext_deploy.targets import Finish, get_target, takes_image
from convnext_deploy.targets.base import BuildRequest, CalibrationData, Runner
from convnext_deploy.targets.image_input import image_feed, read_onnx_metadata

from conftest import REPO, copy_onnx, reference_split

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'convnext-deploy[onnxruntime]'")


@pytest.fixture(scope="module")
def setup(atto_reference, atto_onnx, tmp_path_factory):
    data = reference_split(atto_reference, n_calib=200, n_eval=2000)
    x, y = data.load("evaluation")
    d = tmp_path_factory.mktemp("image-input")
    copy_onnx(atto_onnx, d / "model.onnx")
    spec = Finish("image", tuple(data.ck.class_names), data.ck.preprocessing.to_dict())
    return data, d, spec, x, y


def _built_and_finished(setup, target_name: str, precision: str):
    data, d, spec, *_ = setup
    target = get_target(target_name)
    out = d / f"{target_name}-{precision}"
    (out / "built").mkdir(parents=True)
    (out / "finished").mkdir()
    calib = CalibrationData(data.calib_x, "m", "t") if precision == "int8" else None
    built = target.build(BuildRequest(precision, d / "model.onnx", data.ck.model, out / "built", calib,
                                      input_sizes=(32, 224), options=target.make_options()))
    return target, built, target.finish(built, spec, out / "finished")


def _same_predictions(target, built, finished, x, y, tolerance: float):
    a, b = target.load_runner(built, 2), target.load_runner(finished, 2)
    la, lb = a.run(x), b.run(x)
    assert (la.argmax(1) == y).sum() == (lb.argmax(1) == y).sum()  # the same top-1 on 2,000 evaluation images
    assert float(np.abs(la - lb).max()) <= tolerance * float(np.abs(la).max())
    return b


def test_pixels_come_back_exactly_from_the_normalised_batch():
    record = Finish("image", ("a",), {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": 8,
                                      "crop_pct": 1.0, "interpolation": "bicubic"}).record()
    u = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mean, std = np.asarray(record["mean"], np.float32), np.asarray(record["std"], np.float32)
    x = ((u.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)  # calibration.preprocess's arithmetic
    np.testing.assert_array_equal(image_feed(record)(x), u)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_runtime_artifact_takes_uint8_nhwc_and_carries_labels(setup, precision):
    data, _, _, x, y = setup
    target, built, finished = _built_and_finished(setup, "onnxruntime", precision)
    assert takes_image(finished) and not takes_image(built)
    proto = onnx.load(str(finished.files[0]))
    (inp,) = proto.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[3].dim_value == 3 and all(d.dim_param for d in dims[:3])  # batch, height, width stay dynamic
    first = [n for n in proto.graph.node if inp.name in n.input]
    assert [n.op_type for n in first] == ["Cast"]  # TensorRT takes uint8 only into a cast
    ops = {n.name for n in proto.graph.node}
    if precision == "fp32":  # exact in the unpadded stem's weights: no extra op runs per pixel
        assert "image_scale" not in ops and finished.metadata["input"]["normalisation"].startswith("folded")
    else:  # before the stem's input QuantizeLinear
        assert {"image_scale", "image_shift"} <= ops
    meta = read_onnx_metadata(finished.files[0])
    assert meta["labels"] == list(data.ck.class_names)
    assert meta["preprocessing"]["layout"] == "NHWC" and meta["preprocessing"]["input_size"] == 32
    runner = _same_predictions(target, built, finished, x, y, 1e-5 if precision == "fp32" else 3e-2)
    pixels = runner.feed(x[:4])
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(runner.native(pixels), runner.run(x[:4]), atol=1e-6)


def test_openvino_ir_takes_uint8_nhwc_and_carries_labels_in_rt_info(setup):
    pytest.importorskip("openvino", reason="openvino is not installed: pip install 'convnext-deploy[openvino]'")
    import openvino as ov

    data, _, _, x, y = setup
    target, built, finished = _built_and_finished(setup, "openvino", "int8")
    model = ov.Core().read_model(str(finished.files[0]))
    assert model.inputs[0].get_element_type() == ov.Type.u8
    assert str(model.inputs[0].get_partial_shape()[3]) == "3"
    labels = json.loads(model.get_rt_info(["convnext_deploy", "labels"]).astype(str))
    rule = json.loads(model.get_rt_info(["convnext_deploy", "preprocessing"]).astype(str))
    assert labels == list(data.ck.class_names) and rule["dtype"] == "uint8"
    _same_predictions(target, built, finished, x, y, 3e-2)


def test_tensorrt_onnx_is_finished_alike(setup):
    _, _, _, x, y = setup
    target, built, finished = _built_and_finished(setup, "tensorrt", "int8")
    assert {f.name for f in finished.files} == {f.name for f in built.files if f.suffix == ".onnx"}
    for f in finished.files:
        inp = onnx.load(str(f)).graph.input[0]
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    _same_predictions(target, built, finished, x, y, 3e-2)


def test_latency_is_timed_on_the_native_input_converted_outside_the_clock():
    seen, fed = [], []

    def native(batch):
        seen.append(batch.dtype)
        return np.zeros((len(batch), 2), np.float32)

    def feed(x):
        fed.append(1)
        return np.zeros((len(x), 4, 4, 3), np.uint8)

    runner = Runner(lambda x: native(feed(x)), "test", "cpu", "fp32", 1, feed=feed, native=native)
    measure({"r": runner}, batch=1, input_size=4, runs=6, warmup=2, rounds=2)
    assert set(seen) == {np.dtype(np.uint8)} and len(fed) == 1  # one conversion, every timed call on uint8


def test_bundle_script_has_no_normalisation_code():
    """predict.py reads, resizes and crops; mean/std live in the model (its docstring may say so)."""
    path = REPO / "pipeline" / "ship" / "bundle_files" / "predict.py"
    with open(path, "rb") as f:
        tokens = list(tokenize.tokenize(f.readline))
    docstring = next(t for t in tokens if t.type == tokenize.STRING)
    code = [t.string for t in tokens if t.type in (tokenize.NAME, tokenize.STRING) and t is not docstring]
    assert not [c for c in code if re.search(r"\b(mean|std)\b", c)]


@pytest.mark.slow
@pytest.mark.parametrize("target_name", ["onnxruntime", "openvino"])
def test_convnext_t_artifacts_take_the_image_alike(tmp_path, target_name):
    """ConvNeXt-T (random weights: the surgery depends on the stem, not the values) at 224 px: uint8 pixels into the
    finished artifact give the float artifact's logits on the same images (FP32 to float rounding, INT8 exactly)."""
    pytest.importorskip(target_name)
    from convnext_deploy.pipeline.models.convnext import create_model
    from convnext_deploy.pipeline.models.variants import get_variant

    from conftest import randomized

    model, pp = randomized(create_model("t", num_classes=10)), get_variant("t").preprocessing
    export_onnx(model, tmp_path / "model.onnx")
    u = np.random.default_rng(0).integers(0, 256, (40, 224, 224, 3), dtype=np.uint8)
    x = ((u / 255.0 - np.asarray(pp.mean)) / np.asarray(pp.std)).astype(np.float32).transpose(0, 3, 1, 2).copy()
    spec, target = Finish("image", tuple(map(str, range(10))), pp.to_dict()), get_target(target_name)
    for precision in ("fp32", "int8"):
        (tmp_path / precision).mkdir()
        (tmp_path / f"{precision}-finished").mkdir()
        calib = CalibrationData(x[:32], "m", "t") if precision == "int8" else None
        built = target.build(BuildRequest(precision, tmp_path / "model.onnx", model, tmp_path / precision, calib,
                                          input_sizes=(224,), options=target.make_options()))
        finished = target.finish(built, spec, tmp_path / f"{precision}-finished")
        a, b = target.load_runner(built, 2).run(x[32:]), target.load_runner(finished, 2).native(u[32:])
        assert float(np.abs(a - b).max()) <= 1e-5 * float(np.abs(a).max())
        assert (a.argmax(1) == b.argmax(1)).all()
