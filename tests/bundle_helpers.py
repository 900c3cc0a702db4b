"""What the bundle tests share: a folder of real Fashion-MNIST images (and odd ones), predict.py run alone under an
import blocker, and readers of a bundle's files. predict.py always runs in a subprocess with `-I` and an import
blocker for this project, torch and every other toolchain, so it proves it needs only its runtime, numpy and Pillow."""
import csv
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from convnext_deploy.calibration.fashion_mnist import CLASS_NAMES, FashionMNIST
from convnext_deploy.calibration.preprocess import preprocess
from convnext_deploy.pipeline.models.variants import Preprocessing
from convnext_deploy.targets import get_target
from convnext_deploy.targets.base import Artifact

PROJECT = {"torch", "convnext_deploy", "pipeline", "targets", "calibration", "reports", "safetensors", "tqdm", "onnx", "nncf", "tensorrt"}
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
