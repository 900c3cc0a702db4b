"""The bundle a deploy writes (pipeline/bundle.py), its standalone predict.py, and `validate` (pipeline/bundle_check.py).

ONNX Runtime: the session's shared deploy (`deployed`). OpenVINO and Core ML: one small deploy each (module fixtures,
the session's build cache). predict.py always runs in a subprocess with `-I` and an import blocker for this project,
torch and every other toolchain, so it proves it needs only its runtime, numpy and Pillow."""
import csv
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from convnext_deploy.calibration.batches import iter_batches
from convnext_deploy.calibration.fashion_mnist import CLASS_NAMES, FashionMNIST
from convnext_deploy.calibration.imagefolder import ImageFolder
from convnext_deploy.calibration.preprocess import preprocess
from convnext_deploy.pipeline.models.variants import Preprocessing
from convnext_deploy.targets import get_target
from convnext_deploy.targets.base import Artifact

from conftest import REPO, run_cli

PROJECT = {"torch", "pipeline", "targets", "calibration", "reports", "safetensors", "tqdm", "onnx", "nncf", "tensorrt"}
RUNTIMES = {"onnxruntime", "openvino", "coremltools"}
N_IMAGES = 200

# runs predict.py as a script, with an import of any forbidden top-level package refused, then names every forbidden
# package that is in sys.modules at exit (imported by anything, before or after the blocker)
BLOCKER = textwrap.dedent("""
    import importlib.abc, runpy, sys
    forbidden = set(sys.argv[1].split(","))
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in forbidden:
                raise ImportError(f"blocked import of {name}")
    sys.meta_path.insert(0, Block())
    script, sys.argv = sys.argv[2], sys.argv[2:]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.stderr.write("IMPORTED:" + ",".join(sorted({m.partition(".")[0] for m in sys.modules} & forbidden)) + "\\n")
""")


def run_predict(bundle: Path, runtime: str, *args) -> subprocess.CompletedProcess:
    forbid = PROJECT | (RUNTIMES - {runtime})
    p = subprocess.run([sys.executable, "-I", "-c", BLOCKER, ",".join(sorted(forbid)), str(bundle / "predict.py"),
                        *map(str, args)], cwd=bundle, capture_output=True, text=True, timeout=600)
    assert "IMPORTED:\n" in p.stderr and "blocked import" not in p.stderr, p.stderr
    return p


def sha256sum_check(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)


def listed_files(bundle: Path) -> set[str]:
    return {line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()}


def all_files(bundle: Path) -> set[str]:
    return {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"SHA256SUMS"}


def error_line(p) -> str:
    lines = [line for line in p.stderr.splitlines() if line.startswith("convnext-deploy: error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
    return lines[0]


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"predict_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deploy_runner(run_dir: Path, precision: str = "int8"):
    """The deploy's own runner of the run's artifact (what its evaluation ran)."""
    r = json.loads((run_dir / "report.json").read_text())
    row = next(a for a in r["artifacts"] if a["precision"] == precision)
    target = get_target(r["target"]["name"])
    art = Artifact(target.name, precision, [run_dir / "artifacts" / f for f in row["files"]], row["metadata"], row["proxy"])
    return target.load_runner(art, 2), Preprocessing.from_dict(r["model"]["preprocessing"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> SimpleNamespace:
    """200 Fashion-MNIST test images as PNG (root/<label index>/<i>.png, the ImageFolder layout, and a CSV of
    `file,class name`), and odd ones: any size, colour, alpha, palette."""
    root = tmp_path_factory.mktemp("fmnist_png")
    test = FashionMNIST("test")
    rows = []
    for i in range(N_IMAGES):
        img, y = test[i]
        (root / str(y)).mkdir(exist_ok=True)
        img.save(root / str(y) / f"{i:05d}.png")
        rows.append((f"{y}/{i:05d}.png", CLASS_NAMES[y]))
    with open(root.parent / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *rows])
    odd = tmp_path_factory.mktemp("odd")
    grey = np.asarray(test[3][0])
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).resize((100, 61), Image.Resampling.BILINEAR).save(odd / "colour_100x61.png")
    rgba = Image.fromarray(rgb).convert("RGBA").resize((45, 70))
    rgba.putalpha(128)
    rgba.save(odd / "rgba_45x70.png")
    test[7][0].resize((50, 50)).convert("P").save(odd / "palette_50.png")
    test[9][0].resize((64, 40)).save(odd / "grey.jpg", quality=90)
    files = sorted(root.rglob("*.png")) + sorted(odd.iterdir())
    return SimpleNamespace(root=root, csv=root.parent / "labels.csv", files=files, n=N_IMAGES)


def runner_top1(run_dir: Path, files: list[Path]) -> np.ndarray:
    """Top-1 of the deploy's own runner on `files`, preprocessed by the deploy's preprocessing."""
    runner, pp = deploy_runner(run_dir)
    x = np.stack([preprocess(Image.open(f), pp) for f in files])
    logits = np.concatenate([runner.run(x[i:i + 64]) for i in range(0, len(x), 64)])
    return np.argsort(-logits, axis=1, kind="stable")[:, 0]


def predict_top1(bundle: Path, runtime: str, files: list[Path]) -> np.ndarray:
    p = run_predict(bundle, runtime, "--json", *files)
    assert p.returncode == 0, p.stderr
    out = [json.loads(line) for line in p.stdout.splitlines()]
    assert [o["image"] for o in out] == [str(f) for f in files]
    labels = (bundle / "labels.txt").read_text().splitlines()
    for o in out:
        assert len(o["top"]) == 5 and 0 < sum(t["probability"] for t in o["top"]) <= 1 + 1e-9
        assert [t["probability"] for t in o["top"]] == sorted((t["probability"] for t in o["top"]), reverse=True)
        assert all(labels[t["index"]] == t["label"] for t in o["top"])
    return np.asarray([o["top"][0]["index"] for o in out])


def numbers_of(report) -> set[str]:
    """Every number in report.json, written the ways the card writes figures."""
    found = set()

    def walk(v):
        if isinstance(v, bool):
            return
        if isinstance(v, (int, float)):
            for s in (f"{v:.1f}", f"{v:.2f}", f"{v:.4g}", f"{v:g}", repr(v), f"{v * 100:.2f}", f"{v:.3g}"):
                found.add(s)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str):  # figures quoted inside notes and lines
            found.update(re.findall(r"\d+\.\d+", v))

    walk(report)
    return found


# ---------------------------------------------------------------- ONNX Runtime: the session's deploy

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
    assert (bundle / "predict.py").read_bytes() == (REPO / "pipeline" / "bundle_files" / "predict.py").read_bytes()
    assert (bundle / "labels.txt").read_text().splitlines() == list(CLASS_NAMES)
    r = json.loads((out / "report.json").read_text())
    assert json.loads((bundle / "report.json").read_text()) == r
    pp = json.loads((bundle / "preprocessing.json").read_text())
    assert {k: pp[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std")} == r["model"]["preprocessing"]
    assert pp["layout"] == "NCHW" and pp["dtype"] == "float32" and pp["runtime"] == "onnxruntime"
    assert pp["input"]["name"] == "input" and pp["output"] == {**pp["output"], "name": "logits", "kind": "logits"}
    assert "convert('RGB')" in pp["colour_mode"] and pp["models"]["int8"]["file"] == "model_int8.onnx"


def test_the_reference_outputs_are_the_deployed_artifacts(deployed):
    out, _, _ = deployed
    ref = np.load(out / "bundle" / "reference_outputs.npz", allow_pickle=False)
    runner, pp = deploy_runner(out)
    files = [out / "bundle" / str(f) for f in ref["images"]]
    assert len(files) == 16 and len(set(ref["labels"].tolist())) == 10  # the reference spans the classes
    x = np.stack([preprocess(Image.open(f), pp) for f in files])
    np.testing.assert_array_equal(x, ref["inputs"])
    np.testing.assert_array_equal(runner.run(x), ref["outputs_int8"])
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


def test_validate_passes_and_prints_local_figures_next_to_the_cards(deployed, images, cli_env):
    out, _, _ = deployed
    bundle = out / "bundle"
    r = json.loads((out / "report.json").read_text())
    p = run_cli(["validate", str(bundle), "--images", str(images.root), "--runs", "5"], cli_env, code=0)
    n = len(listed_files(bundle))
    assert f"checksums: {n} files match SHA256SUMS" in p.stdout
    assert re.search(r"reference outputs int8: 16 images, max \|Δlogits\| \S+ \(allowed .*top-1 16/16 agree: pass",
                     p.stdout), p.stdout
    assert "predict.py max |Δ| 0" in p.stdout and "validate: PASS" in p.stdout
    runner, pp = deploy_runner(out)  # the top-1 printed is this machine's, on these images
    src = ImageFolder(images.root, list(CLASS_NAMES))
    correct = sum(int((runner.run(x).argmax(1) == y).sum()) for x, y in iter_batches(src, range(len(src)), pp))
    card = f"card {r['accuracy']['int8']['top1'] * 100:.2f}% of {r['accuracy']['int8']['n']}"
    assert f"top-1 int8: here {correct / images.n * 100:.2f}% of {images.n} ({images.root}) | {card}" in p.stdout
    for size in (32, 224):
        e = [e for e in r["latency"] if e["precision"] == "int8" and e["batch"] == 1 and e["input_size"] == size][0]
        assert re.search(rf"p50 int8 {size} px batch 1: here \d+\.\d\d ms .* \| card {e['p50_ms']:.2f} ms", p.stdout)
    # a flat list of files with their class names (names holding '/' cannot be folders): the same figure
    q = run_cli(["validate", str(bundle), "--images", str(images.root), "--labels", str(images.csv), "--runs", "0"],
                cli_env, code=0)
    assert f"top-1 int8: here {correct / images.n * 100:.2f}% of {images.n}" in q.stdout and "p50" not in q.stdout


@pytest.mark.parametrize("victim", ["model_int8.onnx", "labels.txt", "a reference image"])
def test_one_changed_byte_is_refused_in_one_line(deployed, cli_env, tmp_path, victim):
    bundle = shutil.copytree(deployed[0] / "bundle", tmp_path / "bundle")
    victim = bundle / victim if (bundle / victim).exists() else sorted((bundle / "reference_images").iterdir())[3]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert sha256sum_check(bundle).returncode != 0
    p = run_cli(["validate", str(bundle)], cli_env, code=2)
    line = error_line(p)
    assert str(victim) in line and "sha256 differs from SHA256SUMS" in line and "get it again" in line
    assert "PASS" not in p.stdout


def test_a_missing_file_or_a_swapped_model_with_its_sum_is_refused(deployed, cli_env, tmp_path):
    from convnext_deploy.pipeline.ship.bundle import write_sums

    bundle = shutil.copytree(deployed[0] / "bundle", tmp_path / "bundle")
    (bundle / "labels.txt").unlink()
    line = error_line(run_cli(["validate", str(bundle)], cli_env, code=2))
    assert f"{bundle / 'labels.txt'}: missing" in line
    shutil.copy(deployed[0] / "bundle" / "labels.txt", bundle / "labels.txt")
    shutil.copy(deployed[0] / "artifacts" / "model_fp32.onnx", bundle / "model_int8.onnx")
    write_sums(bundle)  # SHA256SUMS rewritten to match: the sha256 the deploy measured still tells
    line = error_line(run_cli(["validate", str(bundle)], cli_env, code=2))
    assert "model_int8.onnx: not the file the deploy measured" in line
    assert error_line(run_cli(["validate", str(tmp_path)], cli_env, code=2)).endswith(
        "not a convnext-deploy bundle, or an incomplete copy; copy the whole bundle directory")


def test_validate_fails_when_the_model_or_the_preprocessing_disagree_here(deployed, cli_env, tmp_path):
    """Exit 1 (a check failed, like a gate), never a pass: reference outputs off by more than the tolerance, and a
    preprocessing.json whose filter no longer reproduces the reference inputs."""
    from convnext_deploy.pipeline.ship.bundle import write_sums

    bundle = shutil.copytree(deployed[0] / "bundle", tmp_path / "bundle")
    ref = dict(np.load(bundle / "reference_outputs.npz", allow_pickle=False))
    ref["outputs_int8"] = ref["outputs_int8"] * 1.1
    np.savez(bundle / "reference_outputs.npz", **ref)
    write_sums(bundle)
    p = run_cli(["validate", str(bundle), "--runs", "0"], cli_env, code=1)
    assert re.search(r"reference outputs int8: .*: FAIL", p.stdout) and "validate: FAIL" in p.stdout
    bundle = shutil.copytree(deployed[0] / "bundle", tmp_path / "bundle2")
    pp = json.loads((bundle / "preprocessing.json").read_text())
    pp["interpolation"] = "nearest"
    (bundle / "preprocessing.json").write_text(json.dumps(pp))
    write_sums(bundle)
    p = run_cli(["validate", str(bundle), "--runs", "0"], cli_env, code=1)
    assert re.search(r"preprocessing: .*predict.py max \|Δ\| [1-9].*: FAIL", p.stdout), p.stdout


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
    assert "reference outputs fp32: 16 images" in q.stdout and "reference outputs int8: 16 images" in q.stdout
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
             "--no-alternatives", "--runs", "3", "--gates", str(d / "gates.toml"), "--out", str(d / "run")],
            cli_env, code=0)
    return d / "run"


def test_openvino_bundle_predict_and_validate(openvino_run, images, cli_env, tmp_path):
    bundle = openvino_run / "bundle"
    assert {"model_int8.xml", "model_int8.bin", "predict.py"} <= {f.name for f in bundle.iterdir()}
    assert sha256sum_check(bundle).returncode == 0 and listed_files(bundle) == all_files(bundle)
    pp = json.loads((bundle / "preprocessing.json").read_text())
    r = json.loads((openvino_run / "report.json").read_text())
    float_precision = next(a for a in r["artifacts"] if a["precision"] == "int8")["metadata"]["build"]["float_precision"]
    assert pp["models"]["int8"]["config"]["INFERENCE_PRECISION_HINT"] == float_precision  # the deploy's numerics
    assert predict_top1(bundle, "openvino", images.files).tolist() == runner_top1(openvino_run, images.files).tolist()
    p = run_cli(["validate", str(bundle), "--images", str(images.root), "--runs", "3"], cli_env, code=0)
    assert "reference outputs int8: 16 images" in p.stdout and "openvino" in p.stdout and "validate: PASS" in p.stdout
    assert "top-1 int8: here" in p.stdout and "| card " in p.stdout
    broken = shutil.copytree(bundle, tmp_path / "bundle")
    data = bytearray((broken / "model_int8.bin").read_bytes())
    data[100] ^= 0x80
    (broken / "model_int8.bin").write_bytes(bytes(data))
    assert str(broken / "model_int8.bin") in error_line(run_cli(["validate", str(broken)], cli_env, code=2))


# ---------------------------------------------------------------- Core ML (built here, predicted on macOS only)

@pytest.fixture(scope="module")
def coreml_run(atto_reference, cli_env, tmp_path_factory):
    pytest.importorskip("coremltools", reason="coremltools is not installed: pip install 'convnext-deploy[coreml]'")
    d = tmp_path_factory.mktemp("coreml")
    (d / "gates.toml").write_text(GATES_LOOSE + "allow_proxy = true\n")
    macos = get_target("coreml").available().ok
    # --calib 200: the Core ML builds of test_coreml_target's deploy, shared through the session cache
    run_cli(["deploy", "--target", "coreml", "--variant", "atto", "--calib", "200", "--eval", "200", "--control", "0",
             "--no-alternatives", "--runs", "3", "--gates", str(d / "gates.toml"), "--out", str(d / "run")],
            cli_env, code=0 if macos else 3)
    return d / "run"


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
    pp, labels = predict.load_bundle(bundle)
    ref = np.load(bundle / "reference_outputs.npz")
    for name, x in zip(ref["images"], to_pixels(ref["inputs"], json.loads((bundle / "report.json").read_text())
                                                ["model"]["preprocessing"])):
        np.testing.assert_array_equal(np.asarray(predict.resize_crop(Image.open(bundle / str(name)), pp)), x)

    fed = []

    class FakeMLModel:  # what predict.py reads of an MLModel: the probabilities' name, and predict
        def get_spec(self):
            return SimpleNamespace(description=SimpleNamespace(predictedProbabilitiesName="classLabel_probs"))

        def predict(self, inputs):
            fed.append(inputs["image"])
            return {"classLabel": labels[2], "classLabel_probs": dict(zip(reversed(labels), ref["outputs_int8"][0]))}

    run = predict.coreml_predictor(FakeMLModel(), pp, labels)
    scores = run([Image.open(images.files[0]), Image.open(images.files[-1])])
    assert [im.size for im in fed] == [(32, 32), (32, 32)] and fed[0].mode == "RGB"
    np.testing.assert_allclose(scores[0], ref["outputs_int8"][0][::-1], rtol=1e-6)
    top = predict.top_k(scores, labels, 5, pp["output"]["kind"])[0]
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
