"""The OpenVINO target on the real atto reference checkpoint and real Fashion-MNIST images."""
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.measure.accuracy import accuracy, predict_many
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.targets import get_target, openvino_cpu
from convnext_deploy.targets.base import BuildRequest, CalibrationData, LabelledData
from convnext_deploy.targets.openvino_peer import PATHS as PEER_PATHS

from conftest import REPO, copy_onnx, reference_split, session_export

ov_cpu = get_target("openvino")


@pytest.fixture(scope="module")
def setup(atto_reference, atto_onnx, tmp_path_factory):
    data = reference_split(atto_reference, n_calib=200, n_eval=1000, n_control=300)
    ctrl_x, ctrl_y = data.load("control")
    eval_x, eval_y = data.load("evaluation")
    d = tmp_path_factory.mktemp("ov")
    copy_onnx(atto_onnx, d / "model.onnx")
    return data.ck, d, CalibrationData(data.calib_x, "test", data.train.name), LabelledData(ctrl_x, ctrl_y), eval_x, eval_y


_DEFAULT_BUILDS: dict = {}  # precision → its build with the default options, made once for the module's tests


def _build(setup, precision, calibration=None, **options):
    if calibration is None and not options:
        if precision not in _DEFAULT_BUILDS:
            _DEFAULT_BUILDS[precision] = _fresh(setup, precision)
        return _DEFAULT_BUILDS[precision]
    return _fresh(setup, precision, calibration, **options)


def _fresh(setup, precision, calibration=None, **options):
    ck, d, calib, control, *_ = setup
    out = d / f"{precision}-{len(list(d.iterdir()))}"
    out.mkdir()
    return ov_cpu.build(BuildRequest(precision, d / "model.onnx", ck.model, out, calibration or calib,
                                     validation=control, options=ov_cpu.make_options(**options)))


def _accuracy(setup, artifacts):
    *_, x, y = setup
    runners = {k: ov_cpu.load_runner(a, 2) for k, a in artifacts.items()}
    preds = predict_many({k: r.run for k, r in runners.items()},
                         ((x[i:i + 250], y[i:i + 250]) for i in range(0, len(x), 250)))
    return runners, preds


def test_table_row_and_availability():
    spec = get_target("openvino")
    assert spec.module == "convnext_deploy.targets.openvino_cpu" and spec.precisions == ("fp32", "bf16", "int8")
    assert spec.options is openvino_cpu.OpenVINOOptions and spec.accuracy_control and spec.layer_probe is not None
    recipes = {r.name: r for r in spec.int8_recipes}
    assert spec.peer_default == openvino_cpu.PEER_DEFAULT and not recipes[spec.peer_default].smoothed
    for r in spec.int8_recipes:  # every recipe is a valid set of options with its own build settings or graph form
        assert ((r.form or spec.form, spec.build_config("int8", spec.make_options(**r.options)))
                != (spec.form, spec.build_config("int8", spec.make_options())))
    assert ov_cpu.available().ok


def test_build_config_is_the_effective_settings():
    ov = get_target("openvino")
    assert ov.build_config("fp32", ov.make_options()) == {"float_precision": "f32"}
    assert ov.build_config("bf16", ov.make_options(preset="performance")) == {"float_precision": "bf16"}
    peer = ov.build_config("int8", ov.make_options(recipe=openvino_cpu.PEER_DEFAULT, preset="performance"))
    assert peer == {"recipe": openvino_cpu.PEER_DEFAULT, "float_precision": "bf16"}  # the peer sets nothing else
    ours = ov.build_config("int8", ov.make_options(float_layers=["stem.0"]))
    assert ours["preset"] == "mixed" and ours["model_type"] == "transformer" and ours["float_layers"] == ["stem.0"]
    assert "accuracy_control_ranking_subset" not in ours  # shapes nothing without accuracy control
    controlled = ov.build_config("int8", ov.make_options(accuracy_control=0.005, accuracy_control_ranking_subset=100))
    assert controlled["accuracy_control"] == 0.005 and controlled["accuracy_control_ranking_subset"] == 100
    with pytest.raises(UserError, match="no build option 'calibrate_method'"):
        ov.make_options(calibrate_method="entropy")
    with pytest.raises(ValueError, match="preset"):
        ov.build_config("int8", ov.make_options(preset="fastest"))


def test_ir_holds_quantized_weights_and_runs_int8_kernels(setup):
    import openvino as ov

    fp32, int8 = _build(setup, "fp32"), _build(setup, "int8")
    assert [f.suffix for f in int8.files] == [".xml", ".bin"]
    model = ov.Core().read_model(str(int8.files[0]))
    ops = [op.get_type_name() for op in model.get_ops()]
    assert ops.count("FakeQuantize") >= 16
    int8_weights = [op for op in model.get_ops() if op.get_type_name() == "Constant"
                    and op.get_element_type() == ov.Type.i8]
    assert len(int8_weights) >= 40  # every Conv and pointwise MatMul weight is stored as int8
    runners, preds = _accuracy(setup, {"fp32": fp32, "int8": int8})
    # read back from the plugin: every layer the IR quantizes (a FakeQuantize on its input) runs in int8
    ints, total = map(int, re.search(r"(\d+)/(\d+) compute layers in int8", runners["int8"].precision).groups())
    assert total >= ints >= int8.metadata["quantized_layers"] > 0
    acc = accuracy(preds["int8"], preds["fp32"])
    print(f"\nOpenVINO atto INT8 vs FP32 (1000 test images): drop {acc['top1_drop_pp']:+.2f} pp, "
          f"agreement {acc['agreement'] * 100:.2f}%; {runners['int8'].precision}")
    assert acc["agreement"] >= 0.98


def test_a_runner_holds_one_compiled_model_whatever_shapes_it_runs(setup, monkeypatch):
    """Each compiled shape holds its own packed weights (ConvNeXt-B FP32: four shapes were 2 GiB a runner): a runner
    keeps the one it last ran, and a batch's logits do not depend on which shapes ran before."""
    import gc
    import weakref

    import numpy as np
    import openvino as ov

    alive = []
    compile_model = ov.Core.compile_model

    def recording(self, *args, **kwargs):
        compiled = compile_model(self, *args, **kwargs)
        alive.append(weakref.ref(compiled))
        return compiled

    monkeypatch.setattr(ov.Core, "compile_model", recording)
    runner = ov_cpu.load_runner(_build(setup, "fp32"), 2)
    *_, x, _ = setup
    first = runner.run(x[:5])
    for batch in (4, 1, 5):
        out = runner.run(x[:batch])
        gc.collect()
        assert sum(r() is not None for r in alive) == 1, f"compiled models held after batch {batch}"
        np.testing.assert_allclose(out, first[:batch], rtol=1e-5, atol=1e-5)
    assert len(alive) >= 4  # the probe, then one per change of shape


def test_profile_from_performance_counters(setup):
    """PERF_COUNT per executed node: integer kernels only in the INT8 IR; compute layers in execution order (at
    small sizes the plugin may fuse some MatMuls into a snippet Subgraph: then fewer than the model's 41, and the
    latency-aware step says it cannot pair them)."""
    fp32, int8 = _build(setup, "fp32"), _build(setup, "int8")
    ref, q = ov_cpu.profile(fp32, 2, 224, runs=5), ov_cpu.profile(int8, 2, 224, runs=5)
    print(f"\nOpenVINO compute layers at 224 px: fp32 {len(ref['layers'])}, int8 {len(q['layers'])} (model: 41)")
    for p in (ref, q):
        assert p["total_ms"] > 0 and sum(p["by_kind_ms"].values()) == pytest.approx(p["total_ms"])
        assert 0 < len(p["layers"]) <= 41 and all(r["ms"] > 0 for r in p["layers"])
    assert ref["by_kind_ms"]["integer kernels"] == 0 and q["by_kind_ms"]["integer kernels"] > 0
    assert any("I8" in r["op"].upper() for r in q["layers"]) and not any("I8" in r["op"].upper() for r in ref["layers"])


def test_executed_precision_is_read_back_not_assumed(setup):
    fp32, bf16 = _build(setup, "fp32"), _build(setup, "bf16")
    runners, preds = _accuracy(setup, {"fp32": fp32, "bf16": bf16})
    assert "Convolution f32" in runners["fp32"].precision and "bf16" not in runners["fp32"].precision
    if cpu_profile()["bf16_native"]:
        assert "Convolution bf16" in runners["bf16"].precision and "FullyConnected bf16" in runners["bf16"].precision
    else:  # without native BF16 the plugin runs f32 (its hint reads back float32), and the runner says so
        executed = runners["bf16"].precision  # under emulated AVX2: "bf16: ... (Convolution f32 16, FullyConnected
        assert "Convolution f32" in executed and "FullyConnected f32" in executed  # f32 25) ...; hint float32"
        assert "Convolution bf16" not in executed and "FullyConnected bf16" not in executed
    print(f"\nexecuted: {runners['fp32'].precision} | {runners['bf16'].precision}")
    assert accuracy(preds["bf16"], preds["fp32"])["agreement"] >= 0.99


@pytest.mark.slow  # ~3.5 min: NNCF's restorer re-validates after every layer it returns to float (make test-all)
def test_accuracy_control_reverts_layers_when_max_drop_is_tight(setup):
    """Calibrating on images scaled to 30% of their range clips activations (about 4.6 pp lost); a 0.5 pp
    bound then makes NNCF return layers to float, and the reverted layers are listed."""
    ck, d, calib, control, *_ = setup
    crushed = CalibrationData(calib.images * 0.3, "crushed", "scaled")
    plain = _build(setup, "int8", calibration=crushed)
    controlled = _build(setup, "int8", calibration=crushed, accuracy_control=0.005,
                        accuracy_control_ranking_subset=100)
    assert plain.metadata["reverted_to_float"] == []
    reverted = controlled.metadata["reverted_to_float"]
    assert reverted, "accuracy control reverted nothing"
    assert controlled.metadata["quantized_layers"] == plain.metadata["quantized_layers"] - len(reverted)
    _, preds = _accuracy(setup, {"fp32": _build(setup, "fp32"), "plain": plain, "controlled": controlled})
    drop_plain = accuracy(preds["plain"], preds["fp32"])["top1_drop_pp"]
    drop_ctrl = accuracy(preds["controlled"], preds["fp32"])["top1_drop_pp"]
    print(f"\naccuracy control: reverted {len(reverted)} layers {reverted[:4]}…; drop {drop_plain:+.2f} pp → {drop_ctrl:+.2f} pp")
    assert drop_plain > 1.0 and drop_ctrl < drop_plain - 1.0


def test_missing_openvino_says_which_extra_and_the_rest_still_works():
    block = "import sys; sys.modules['openvino'] = None; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", block, "deploy", "--target", "openvino", "--variant", "atto"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "openvino is not installed: pip install 'convnext-deploy[openvino]'" in p.stderr
    p = subprocess.run([sys.executable, "-c", block, "variants"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "ConvNeXt-T" in p.stdout


def test_the_users_own_paths_convert_the_torch_module_and_run_int8(setup, tmp_path):
    """The bench's peers: ov.convert_model of the torch module, nncf.quantize defaults (and TRANSFORMER), compiled
    by the target's own load_runner; each is a real INT8 model of the same network, not our IR under another name."""
    import openvino as ov

    ck, _, calib, *_ = setup
    paths = ov_cpu.user_paths(BuildRequest("int8", None, ck.model, tmp_path, calib))
    assert set(paths) == {label for label, _ in PEER_PATHS}
    for label, art in paths.items():
        assert art.metadata["converted_from"].startswith("torch") and all(f.exists() for f in art.files)
        ops = {op.get_type_name() for op in ov.Core().read_model(str(art.files[0])).get_ops()}
        assert "FakeQuantize" in ops, label  # quantized by NNCF, not a float model
    runners, preds = _accuracy(setup, {"fp32": _build(setup, "fp32"), **paths})
    for label in paths:
        ints, total = map(int, re.search(r"(\d+)/(\d+) compute layers in int8", runners[label].precision).groups())
        assert ints >= total // 2, runners[label].precision  # the integer kernels really run
        acc = accuracy(preds[label], preds["fp32"])
        assert acc["agreement"] >= 0.97, (label, acc)


def test_the_channels_first_form_becomes_mvn_and_quantizes_like_the_default(setup, atto_reference, cli_env, tmp_path):
    """The channels-first graph form: OpenVINO's converter fuses every channel norm written as mean/variance into
    one MVN op, no Transpose is left, and our INT8 recipe on it runs integer kernels and keeps the predictions."""
    import openvino as ov

    ck, d, calib, *_ = setup
    copy_onnx(session_export(atto_reference, cli_env, "channels_first"), tmp_path / "cf.onnx")
    ops = Counter(op.get_type_name() for op in ov.convert_model(str(tmp_path / "cf.onnx")).get_ops())
    assert ops["MVN"] == 17 and ops["Transpose"] == 0 and ops["ReduceMean"] == 1  # the head's average pool
    out = tmp_path / "int8"
    out.mkdir()
    int8 = ov_cpu.build(BuildRequest("int8", tmp_path / "cf.onnx", ck.model, out, calib, options=ov_cpu.make_options()))
    runners, preds = _accuracy(setup, {"fp32": _build(setup, "fp32"), "int8 channels-first": int8})
    ints, total = map(int, re.search(r"(\d+)/(\d+) compute layers in int8", runners["int8 channels-first"].precision).groups())
    assert ints >= total // 2, runners["int8 channels-first"].precision
    assert accuracy(preds["int8 channels-first"], preds["fp32"])["agreement"] >= 0.97


def test_the_throughput_mode_gives_each_image_its_logits(setup):
    """OpenVINO's THROUGHPUT hint with an async queue: every image once, in order, the latency runner's logits."""
    import numpy as np

    *_, x, _ = setup
    art = _build(setup, "fp32")
    got = ov_cpu.stream_runner(art, 2, x.shape[-1])(x[:9])
    assert np.allclose(got, ov_cpu.load_runner(art, 2).run(x[:9]), atol=1e-4)
