"""The bundle a deploy writes (pipeline/ship/bundle.py) and its standalone predict.py.

ONNX Runtime: the session's shared deploy (`deployed`). OpenVINO and Core ML: one small deploy each (module fixtures,
the session's build cache)."""
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from convnext_deploy.calibration.fashion_mnist import CLASS_NAMES, FashionMNIST
from convnext_deploy.calibration.preprocess import pixels, preprocess
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.targets import get_target

from bundle_helpers import (
    all_files,
    deploy_runner,
    error_line,
    images,  # noqa: F401  (the module's image-folder fixture)
    listed_files,
    load_module,
    numbers_of,
    predict_top1,
    run_predict,
    runner_top1,
    sha256sum_check,
)
from conftest import PINNED_RECIPE, REPO, run_cli


def test_a_passing_deploy_writes_a_bundle_that_sha256sum_verifies(deployed):
    out, p, _ = deployed
    bundle = out / "bundle"
    assert f"bundle: {bundle}" in p.stdout
    assert {"model_int8.onnx", "labels.txt", "preprocessing.json", "MODEL_CARD.md", "report.json", "predict.py",
            "reference_outputs.npz", "SHA256SUMS"} <= {f.name for f in bundle.iterdir()}
    assert not (bundle / "model_fp32.onnx").exists()  # only the INT8 the gates passed, unless asked
    check = sha256sum_check(bundle)
    assert check.returncode == 0, check.stdout + check.stderr
    assert listed_files(bundle) == all_files(bundle)  # every other file, nothing left out
    assert (bundle / "model_int8.onnx").read_bytes() == (out / "artifacts" / "model_int8.onnx").read_bytes()
    assert (bundle / "predict.py").read_bytes() == (REPO / "pipeline" / "ship" / "bundle_files" / "predict.py").read_bytes()
    assert (bundle / "labels.txt").read_text().splitlines() == list(CLASS_NAMES)
    r = json.loads((out / "report.json").read_text())
    assert json.loads((bundle / "report.json").read_text()) == r
    pp = json.loads((bundle / "preprocessing.json").read_text())
    assert {k: pp[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std")} == r["model"]["preprocessing"]
    assert pp["layout"] == "NHWC" and pp["dtype"] == "uint8" and pp["runtime"] == "onnxruntime"  # the image itself
    assert pp["input"]["type"] == "image" and pp["input"]["shape"] == ["batch", 32, 32, 3]
    assert pp["input"]["name"] == "input" and pp["output"] == {**pp["output"], "name": "logits", "kind": "logits"}
    assert "convert('RGB')" in pp["colour_mode"] and pp["models"]["int8"]["file"] == "model_int8.onnx"


def test_the_reference_outputs_are_the_deployed_artifacts(deployed):
    out, _, _ = deployed
    ref = np.load(out / "bundle" / "reference_outputs.npz", allow_pickle=False)
    runner, pp = deploy_runner(out)
    files = [out / "bundle" / str(f) for f in ref["images"]]
    assert len(files) == 200 and len(set(ref["labels"].tolist())) == 10  # the reference spans the classes
    x = np.stack([pixels(Image.open(f), pp) for f in files])  # the model's own input: the cropped uint8 pixels
    np.testing.assert_array_equal(x, ref["inputs"])
    np.testing.assert_array_equal(runner.native(x), ref["outputs_int8"])
    floats = np.stack([preprocess(Image.open(f), pp) for f in files])  # the deploy's batches give the same pixels
    np.testing.assert_array_equal(runner.run(floats), ref["outputs_int8"])
    test = FashionMNIST("test")
    for i, y, f in zip(ref["indices"], ref["labels"], files):  # evaluation images, as the source holds them
        assert test[int(i)][1] == y
        np.testing.assert_array_equal(np.asarray(Image.open(f)), np.asarray(test[int(i)][0]))
    assert str(ref["output_kind"]) == "logits"


def test_the_model_card_shows_only_figures_of_the_report(deployed):
    out, _, _ = deployed
    card = (out / "bundle" / "MODEL_CARD.md").read_text()
    r = json.loads((out / "report.json").read_text())
    assert "**Gates: PASSED**" in card and "proxy" not in card.split("## Files")[0].lower()
    assert "- Input: uint8 RGB pixels, NHWC" in card and "mean/std and the layout change are inside the model" in card
    assert r["model"]["checkpoint_sha256"] in card and r["model"]["variant"] in card
    assert f"{r['accuracy']['int8']['top1'] * 100:.2f}%" in card and r["accuracy"]["int8"]["runtime"] in card
    assert r["int8_numerics"]["int8_path"] in card and r["machine"]["cpu"] in card
    for v in r["gates"]["verdicts"]:
        assert v["gate"] in card
    p50 = [e for e in r["latency"] if e["precision"] == "int8" and e["batch"] == 1 and e["input_size"] == 224][0]
    assert f"| int8 | 224 | 1 | {p50['p50_ms']:.2f} |" in card
    known = numbers_of(r)
    figures = re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", card)
    assert figures and [f for f in figures if f not in known] == []


def test_predict_py_alone_gives_the_deploys_top1(deployed, images):
    """Only onnxruntime, numpy and Pillow: the same top-1 as the deploy's runner on every image."""
    out, _, _ = deployed
    bundle = out / "bundle"
    ours = predict_top1(bundle, "onnxruntime", images.files)
    theirs = runner_top1(out, images.files)
    assert ours.tolist() == theirs.tolist()
    labels = np.asarray([int(f.parent.name) for f in images.files[:images.n]])
    assert 0.8 < (ours[:images.n] == labels).mean() <= 1.0
    p = run_predict(bundle, "onnxruntime", *images.files[:2], "missing.png")  # the human form; a bad path: one line
    assert p.returncode == 2 and "cannot read image missing.png" in p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{images.files[0]}: {CLASS_NAMES[ours[0]]} 0.")
    assert len(lines[0].split(", ")) == 5



def test_bundle_command_on_a_run_adds_fp32_and_refuses_a_failed_run(deployed, cli_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(deployed[0], run, ignore=shutil.ignore_patterns("bundle"))
    p = run_cli(["bundle", str(run), "--with-fp32"], cli_env, code=0)
    bundle = run / "bundle"
    assert f"bundle: {bundle} (int8, fp32;" in p.stdout
    assert sha256sum_check(bundle).returncode == 0 and listed_files(bundle) == all_files(bundle)
    pp = json.loads((bundle / "preprocessing.json").read_text())
    assert set(pp["models"]) == {"int8", "fp32"} and pp["default_model"] == "int8"
    ref = np.load(bundle / "reference_outputs.npz")
    assert ref["outputs_fp32"].shape == ref["outputs_int8"].shape
    assert "| model_fp32.onnx | fp32 |" in (bundle / "MODEL_CARD.md").read_text()
    q = run_cli(["validate", str(bundle), "--runs", "0"], cli_env, code=0)
    assert "reference outputs fp32: 200 images" in q.stdout and "reference outputs int8: 200 images" in q.stdout
    fp32 = run_predict(bundle, "onnxruntime", "--precision", "fp32", "--json", *sorted((bundle / "reference_images").iterdir()))
    assert [json.loads(line)["top"][0]["index"] for line in fp32.stdout.splitlines()] == ref["outputs_fp32"].argmax(1).tolist()

    r = json.loads((run / "report.json").read_text())
    r["gates"]["passed"] = False
    r["gates"]["verdicts"][0]["status"] = "fail"
    (run / "report.json").write_text(json.dumps(r))
    line = error_line(run_cli(["bundle", str(run)], cli_env, code=2))
    assert f"gates not met ({r['gates']['verdicts'][0]['gate']} fail)" in line and "only an artifact that passed" in line
    line = error_line(run_cli(["bundle", str(tmp_path / "nowhere")], cli_env, code=2))
    assert "is not a deploy's report directory (no report.json)" in line


def test_a_deploy_that_misses_a_gate_writes_no_bundle(deployed):
    from convnext_deploy.pipeline.ship.bundle import after_deploy

    r = json.loads((deployed[0] / "report.json").read_text())
    r["gates"]["passed"] = False
    r["gates"]["verdicts"][1]["status"] = "fail"
    said = []
    assert after_deploy(Path("/nonexistent"), r, {"int8": None}, CLASS_NAMES, said.append) is None
    assert said == [f"bundle: none written: gates not met ({r['gates']['verdicts'][1]['gate']} fail); "
                    "a failed artifact is never bundled"]


# ---------------------------------------------------------------- OpenVINO

GATES_LOOSE = "[defaults]\nmax_top1_drop_pp = 5\n"


@pytest.fixture(scope="module")
def openvino_run(atto_reference, cli_env, tmp_path_factory):
    pytest.importorskip("openvino", reason="openvino is not installed: pip install 'convnext-deploy[openvino]'")
    d = tmp_path_factory.mktemp("ov")
    (d / "gates.toml").write_text(GATES_LOOSE)
    # --calib 300: the smoothed export of the session's ONNX Runtime deploy (`deployed`), shared through the cache
    run_cli(["deploy", "--target", "openvino", "--variant", "atto", "--calib", "300", "--eval", "200", "--control", "0",
             *PINNED_RECIPE, "--runs", "3", "--gates", str(d / "gates.toml"), "--out", str(d / "run")],
            cli_env, code=0)
    return d / "run"


def test_openvino_bundle_predict_and_validate(openvino_run, images, cli_env, tmp_path):
    bundle = openvino_run / "bundle"
    assert {"model_int8.xml", "model_int8.bin", "predict.py"} <= {f.name for f in bundle.iterdir()}
    assert sha256sum_check(bundle).returncode == 0 and listed_files(bundle) == all_files(bundle)
    pp = json.loads((bundle / "preprocessing.json").read_text())
    r = json.loads((openvino_run / "report.json").read_text())
    # the bundle tells the device the precision that executed when the reference outputs were made (f32 where this
    # CPU has no BF16, whatever the build asked for), not the build's request
    asked = next(a for a in r["artifacts"] if a["precision"] == "int8")["metadata"]["build"]["float_precision"]
    ran = pp["reference_made_by"]["int8"]["precision_executed"].rsplit("hint ", 1)[1]
    told = pp["models"]["int8"]["config"]["INFERENCE_PRECISION_HINT"]
    assert told == {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[ran]
    assert told == (asked if cpu_profile()["bf16_native"] or asked == "f32" else "f32")
    assert predict_top1(bundle, "openvino", images.files).tolist() == runner_top1(openvino_run, images.files).tolist()
    p = run_cli(["validate", str(bundle), "--images", str(images.root), "--runs", "3"], cli_env, code=0)
    assert "reference outputs int8: 200 images" in p.stdout and "openvino" in p.stdout and "validate: PASS" in p.stdout
    assert "top-1 int8: here" in p.stdout and "| card " in p.stdout
    broken = shutil.copytree(bundle, tmp_path / "bundle")
    data = bytearray((broken / "model_int8.bin").read_bytes())
    data[100] ^= 0x80
    (broken / "model_int8.bin").write_bytes(bytes(data))
    assert str(broken / "model_int8.bin") in error_line(run_cli(["validate", str(broken)], cli_env, code=2))


# ---------------------------------------------------------------- Core ML (built here, predicted on macOS only)

@pytest.fixture(scope="module")
def coreml_run(coreml_deployed):
    return coreml_deployed[0]


def test_coreml_bundle_is_built_and_says_it_is_proxy_measured(coreml_run, cli_env):
    import coremltools as ct

    bundle = coreml_run / "bundle"
    assert (bundle / "model_int8.mlpackage").is_dir() and (bundle / "predict.py").is_file()
    assert sha256sum_check(bundle).returncode == 0 and listed_files(bundle) == all_files(bundle)
    assert any(f.startswith("model_int8.mlpackage/") for f in listed_files(bundle))
    labels = (bundle / "labels.txt").read_text().splitlines()
    ml = ct.models.MLModel(str(bundle / "model_int8.mlpackage"), skip_model_load=True)
    assert json.loads(ml.user_defined_metadata["convnext_deploy.class_names"]) == labels == list(CLASS_NAMES)
    assert ml.get_spec().description.predictedProbabilitiesName  # what predict.py reads the probabilities from
    pp = json.loads((bundle / "preprocessing.json").read_text())
    assert pp["input"] == {"name": "image", "type": "image", "shape": [32, 32, 3]} and pp["output"]["kind"] == "probabilities"
    ref = np.load(bundle / "reference_outputs.npz")
    np.testing.assert_allclose(ref["outputs_int8"].sum(1), 1.0, atol=1e-5)  # what the package's softmax gives
    if get_target("coreml").available().ok:
        pytest.skip("this is macOS: the card carries real figures")
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "**Figures from a proxy** (Core ML proxy (not executed by Core ML))" in card
    assert "Latency\n\n**Not measured**" in card
    p = run_cli(["validate", str(bundle)], cli_env, code=3)
    lines = p.stdout.splitlines()
    assert lines[0] == f"checksums: {len(listed_files(bundle))} files match SHA256SUMS"
    assert lines[-1].startswith("validate: NOT RUN: the coreml runtime is not here (Core ML prediction needs macOS")
    assert "PASS" not in p.stdout and "reference outputs" not in p.stdout


def test_coreml_predict_py_as_far_as_linux_allows(coreml_run, images):
    """Off macOS: predict.py says in one line that Core ML needs macOS (exit 3); its image preparation is the pixels the
    deploy's Core ML runner feeds MLModel.predict, and a classifier's probability dictionary comes out in labels.txt
    order (a stand-in for MLModel with its predict/get_spec)."""
    from convnext_deploy.targets.coreml_apple import to_pixels

    bundle = coreml_run / "bundle"
    if not get_target("coreml").available().ok:
        p = run_predict(bundle, "coremltools", images.files[0])
        assert p.returncode == 3 and "predict.py: error: Core ML prediction needs macOS" in p.stderr and not p.stdout
    predict = load_module(bundle / "predict.py")
    pp = json.loads((bundle / "report.json").read_text())["model"]["preprocessing"]  # what the package's metadata holds
    labels = (bundle / "labels.txt").read_text().splitlines()
    ref = np.load(bundle / "reference_outputs.npz")
    for name, x in zip(ref["images"], to_pixels(ref["inputs"], json.loads((bundle / "report.json").read_text())
                                                ["model"]["preprocessing"])):
        np.testing.assert_array_equal(np.asarray(predict.resize_crop(Image.open(bundle / str(name)), pp)), x)

    fed = []

    class FakeMLModel:  # what predict.py reads of an MLModel: the probabilities' name, and predict
        def get_spec(self):
            return SimpleNamespace(description=SimpleNamespace(predictedProbabilitiesName="classLabel_probs",
                                                               input=[SimpleNamespace(name="image")]))

        def predict(self, inputs):
            fed.append(inputs["image"])
            return {"classLabel": labels[2], "classLabel_probs": dict(zip(reversed(labels), ref["outputs_int8"][0]))}

    run = predict.coreml_predictor(FakeMLModel(), pp, labels)
    scores = run([Image.open(images.files[0]), Image.open(images.files[-1])])
    assert [im.size for im in fed] == [(32, 32), (32, 32)] and fed[0].mode == "RGB"
    np.testing.assert_allclose(scores[0], ref["outputs_int8"][0][::-1], rtol=1e-6)
    top = predict.top_k(scores, labels, 5, "probabilities")[0]
    best = int(np.argmax(ref["outputs_int8"][0][::-1]))
    assert top[0] == {"index": best, "label": labels[best], "probability": pytest.approx(float(scores[0][best]))}


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction (MLModel.predict) needs macOS")
def test_coreml_predict_py_on_macos_gives_the_reference_top1(coreml_run, cli_env):
    bundle = coreml_run / "bundle"
    ref = np.load(bundle / "reference_outputs.npz")
    files = [bundle / str(f) for f in ref["images"]]
    assert predict_top1(bundle, "coremltools", files).tolist() == ref["outputs_int8"].argmax(1).tolist()
    run_cli(["validate", str(bundle), "--runs", "5"], cli_env, code=0)


def test_validate_runs_a_bundle_with_the_settings_it_tells_the_device():
    """preprocessing.json's runtime settings (what ran when the reference outputs were made) replace the build's
    request when validate loads the artifact: an OpenVINO build that asked for bf16 on a CPU without BF16 ran f32."""
    from convnext_deploy.pipeline.ship.bundle_index import as_configured, runtime_config

    meta = {"build": {"float_precision": "bf16", "overflow_fix": None}, "input": {"kind": "image"}}
    told = runtime_config("openvino", {"metadata": meta}, {"INFERENCE_PRECISION_HINT": "f32"})
    assert told == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    assert runtime_config("openvino", {"metadata": meta})["INFERENCE_PRECISION_HINT"] == "bf16"  # nothing resolved
    ran = as_configured("openvino", meta, told)
    assert ran["build"] == {"float_precision": "f32", "overflow_fix": None} and ran["input"] == meta["input"]
    assert meta["build"]["float_precision"] == "bf16"  # the report's record is left as it was
    assert as_configured("onnxruntime", meta, {"graph_optimization_level": "ORT_ENABLE_ALL"}) is meta
