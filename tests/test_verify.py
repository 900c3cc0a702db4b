"""`convnext-deploy validate BUNDLE` (pipeline/ship/verify.py) on the session's ONNX Runtime bundle: local figures
next to the card's, and a bundle that changed, lost a file or disagrees here refused in one line."""
import json
import re
import shutil

import numpy as np
import pytest

from convnext_deploy.calibration.batches import iter_batches
from convnext_deploy.calibration.fashion_mnist import CLASS_NAMES
from convnext_deploy.calibration.imagefolder import ImageFolder

from bundle_helpers import (
    deploy_runner,
    error_line,
    images,  # noqa: F401  (the module's image-folder fixture)
    listed_files,
    run_predict,
    runner_top1,
    sha256sum_check,
)
from conftest import run_cli


def test_validate_passes_and_prints_local_figures_next_to_the_cards(deployed, images, cli_env):
    out, _, _ = deployed
    bundle = out / "bundle"
    r = json.loads((out / "report.json").read_text())
    p = run_cli(["validate", str(bundle), "--images", str(images.root), "--runs", "5"], cli_env, code=0)
    n = len(listed_files(bundle))
    assert f"checksums: {n} files match SHA256SUMS" in p.stdout
    assert re.search(r"reference outputs int8: 200 images, max \|Δlogits\| \S+ \(allowed .*top-1 200/200 agree: pass",
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

