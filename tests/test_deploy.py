"""`convnext-deploy deploy` end to end on ONNX Runtime with the atto reference, and every bad-input case."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.measure.accuracy import predict_many

from conftest import PINNED_RECIPE, REPO, run_cli


@pytest.fixture(scope="module")
def env(cli_env):
    return cli_env


def cli(args, env, code=None):
    return run_cli(args, env, code)


def _one_clear_line(p):
    err = [line for line in p.stderr.splitlines() if line.startswith("convnext-deploy: error:")]
    assert len(err) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return err[0]


def test_deploy_writes_a_complete_report(deployed):
    out, p, _ = deployed
    names = {f.name for f in out.iterdir()}
    assert {"report.json", "report.md", "report.html", "manifest.json", "artifacts", "accuracy_vs_latency.png"} <= names
    assert {f.name for f in (out / "artifacts").iterdir()} == {"model_fp32.onnx", "model_int8.onnx"}
    r = json.loads((out / "report.json").read_text())
    assert r["gates"]["passed"] and all(v["status"] == "pass" for v in r["gates"]["verdicts"])
    assert r["data"]["accuracy_resolution"] == 32 and r["data"]["latency_resolution"] == 224
    assert r["data"]["evaluation"]["n"] == 1000 and r["data"]["calibration"]["n"] == 300
    for name, a in r["accuracy"].items():  # every figure says what measured it
        assert {"runtime", "device", "precision_executed", "threads", "kind", "n", "input_size"} <= a.keys()
        assert a["kind"] == "real"
    assert r["accuracy"]["int8"]["agreement"] >= 0.97
    assert "integer kernels" in r["accuracy"]["int8"]["precision_executed"]
    sizes = {(e["input_size"], e["batch"], e["precision"]) for e in r["latency"]}
    assert {(224, 1, "fp32"), (224, 1, "int8"), (32, 8, "int8")} <= sizes
    assert all(e["p50_ms"] > 0 and e["p99_ms"] >= e["p50_ms"] for e in r["latency"])
    for art in r["artifacts"]:
        for f, digest in art["sha256"].items():
            import hashlib

            assert hashlib.sha256((out / "artifacts" / f).read_bytes()).hexdigest() == digest
    from convnext_deploy.targets import get_target

    recipes = {row["recipe"]: row for row in r["int8_recipes"]}
    declared = {x.name for x in get_target("onnxruntime").int8_recipes}
    assert set(recipes) == {"ours (default)", "ours without outlier smoothing"} | declared
    assert recipes["ours (default)"]["float_conv_matmul_left"] == 0
    assert recipes["ours (default)"]["integer_kernels"].get("MatMulIntegerToFloat") == 24
    assert recipes["quantize_static defaults"]["float_conv_matmul_left"] > 0
    assert all(row["p50_ms"] > 0 and row["n"] == 1000 for row in recipes.values())
    # --recipe auto: every candidate measured here, the deployed one is the one chosen, for a stated reason
    choice = r["recipe_choice"]
    assert choice["mode"] == "auto" and {c["recipe"] for c in choice["candidates"]} == set(recipes)
    chosen = [c for c in choice["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["recipe"] == choice["chosen"] and recipes[choice["chosen"]]["deployed"]
    assert all(c["why"] for c in choice["candidates"])
    if chosen[0]["meets_accuracy"]:  # the fastest of those meeting the gates, or a tie with it on the paired interval
        fastest = min(c["p50_ms"] for c in choice["candidates"] if c["meets_accuracy"])
        assert chosen[0]["p50_ms"] == fastest or chosen[0]["vs_fastest"]["verdict"] != "slower", chosen[0]
    assert r["int8_numerics"]["int8_path"] == r["machine"]["cpu_profile"]["int8_path"]
    # the deployed artifact's weights say whether it saturates on x86 without VNNI (`validate` reads it): 7-bit and
    # unsigned weights do not, the others do; a saturating one carries the warning, in the notes too
    # (the default is itself 7-bit on a path without VNNI: prepare.path_defaults)
    safe = choice["chosen"] in ("ours with reduce_range (U8S8, 7-bit weights)", "ours with uint8 weights (U8U8)") or (
        choice["chosen"] == "ours (default)" and r["gates"]["int8_path"] == "avx2")
    assert r["int8_numerics"]["saturates_without_vnni"] is (not safe)
    assert ("warning" in r["int8_numerics"] and r["int8_numerics"]["warning"] in r["notes"]) is (not safe)
    rec = r["recommended_precision"]  # the fastest measured precision that meets the accuracy gates
    meeting = [c for c in rec["candidates"] if c["meets_accuracy"]]
    assert rec["p50_ms"] == min(c["p50_ms"] for c in meeting) and rec["precision"] in ("fp32", "int8")
    assert "fastest precision meeting the accuracy gates here" in p.stdout
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html
    md = (out / "report.md").read_text()
    assert "INT8 recipe chosen on this CPU" in md
    assert "32 px" in md and "224 px" in md and "Gates: PASSED" in md
    # the gates were read for this CPU's INT8 path ([<scope>.path.<name>] tables), and the page says which
    assert r["gates"]["int8_path"] == r["machine"]["cpu_profile"]["path"]
    assert f"scopes for INT8 path {r['gates']['int8_path']}" in md and "scopes for INT8 path" in html
    manifest = json.loads((out / "manifest.json").read_text())
    assert not set(manifest["calibration"]["indices"]) & set() and manifest["evaluation"]["source"] == "fashion-mnist/test"


def test_rerun_resumes_from_cache(deployed, env, tmp_path):
    _, _, gates = deployed  # a report of its own: the shared deploy's report is read by other tests
    p = cli(["deploy", "--target", "onnxruntime", "--variant", "atto", "--eval", "200", "--calib", "300",
             "--runs", "3", *PINNED_RECIPE, "--control", "0", "--gates", str(gates), "--out", str(tmp_path / "again")],
            env, code=0)
    assert "onnxruntime int8: cached" in p.stdout and "(cached)" in p.stdout


def test_deploy_on_imagefolder_trees(atto_reference, env, tmp_path):
    """The layout users have for ImageNet: root/<class>/<image>. Folder names that are not the checkpoint's
    class names map by sorted order (as ImageNet's wnid folders do). --no-smoothing: the session's export serves
    (smoothing factors come from the calibration images, so a smoothed deploy would export again)."""
    from convnext_deploy.calibration.fashion_mnist import FashionMNIST

    for split, per_class, root in (("train", 15, tmp_path / "train"), ("test", 20, tmp_path / "val")):
        data = FashionMNIST(split)
        for c in range(10):
            (root / str(c)).mkdir(parents=True)
            for i in np.flatnonzero(data.labels == c)[:per_class]:
                data[int(i)][0].save(root / str(c) / f"{i}.png")
    gates = tmp_path / "g.toml"
    gates.write_text("[defaults]\nmax_top1_drop_pp = 5\n")
    p = cli(["deploy", "--target", "onnxruntime", "--variant", "atto", "--calib-data", str(tmp_path / "train"),
             "--eval-data", str(tmp_path / "val"), "--calib", "100", "--runs", "5", *PINNED_RECIPE,
             "--no-smoothing", "--gates", str(gates), "--out", str(tmp_path / "r")], env, code=0)
    r = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "ImageFolder" in r["data"]["task"] and "sorted folders" in r["data"]["task"]
    # a tenth of the 200 val images is held out as the fallback's control split, never in the figures
    assert r["data"]["evaluation"]["n"] == 180 and r["data"]["control"]["n"] == 20 and r["data"]["calibration"]["n"] == 100
    assert r["accuracy"]["fp32"]["top1"] > 0.8  # labels line up with the checkpoint's classes
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["calibration"]["source"].endswith("/train") and manifest["evaluation"]["source"].endswith("/val")


def test_missed_gate_exits_1_naming_it(atto_reference, env, tmp_path):
    gates = tmp_path / "g.toml"
    gates.write_text("[defaults]\nmax_p50_ms = 0.0001\nmax_top1_drop_pp = 5\n")
    # --calib 300: the shared deploy's calibration, so its builds come from the session's cache
    p = cli(["deploy", "--target", "onnxruntime", "--variant", "atto", "--eval", "300", "--calib", "300",
             "--runs", "5", *PINNED_RECIPE, "--gates", str(gates), "--out", str(tmp_path / "r")], env, code=1)
    assert "FAIL max_p50_ms: fail" in p.stdout and "max_p50_ms fail" in p.stderr
    r = json.loads((tmp_path / "r" / "report.json").read_text())
    assert not r["gates"]["passed"]


@pytest.mark.parametrize("case", ["target", "variant", "wrong_variant", "bad_checkpoint", "empty_calib",
                                  "nan_weights", "no_reference", "image_size", "recipe"])
def test_bad_input_one_line_nonzero_nothing_written(case, atto_reference, env, tmp_path, monkeypatch, capsys):
    args = ["deploy", "--target", "onnxruntime", "--variant", "atto", "--out", str(tmp_path / "out")]
    e = dict(env)
    if case == "target":
        args[2], match = "tensorflow-lite", "unknown target 'tensorflow-lite'"
    elif case == "variant":
        args[4], match = "huge", "unknown variant 'huge'"
    elif case == "wrong_variant":
        args[4], match = "femto", "this is a ConvNeXt-Atto checkpoint, you asked for ConvNeXt-Femto"
        args += ["--checkpoint", str(atto_reference)]
    elif case == "bad_checkpoint":
        (tmp_path / "x.pth").write_text("not a checkpoint")
        args += ["--checkpoint", str(tmp_path / "x.pth")]
        match = "cannot read"
    elif case == "empty_calib":
        args += ["--calib", "0"]
        match = "calibration set is empty"
    elif case == "nan_weights":
        from convnext_deploy.pipeline.models.checkpoints import load_checkpoint, save_checkpoint

        ck = load_checkpoint(atto_reference)
        with torch.no_grad():
            ck.model.stages[2].blocks[0].mlp.fc1.weight[0, 0] = float("nan")
        path = save_checkpoint(ck.model, tmp_path / "nan", variant=ck.variant, class_names=ck.class_names,
                               preprocessing=ck.preprocessing, dataset=ck.metadata["dataset"])
        args += ["--checkpoint", str(path)]
        match = "NaN/inf"
    elif case == "no_reference":
        e["CONVNEXT_DEPLOY_REFERENCE_DIR"] = str(tmp_path / "empty")
        args += ["--no-train-reference"]  # without it the deploy trains the reference first (test_reference.py)
        match = "make reference VARIANT=atto"
    elif case == "recipe":
        args += ["--recipe", "fastest"]
        match = "--recipe 'fastest' is not an INT8 recipe of onnxruntime; choose auto or one of: 'ours (default)'"
    else:
        args += ["--image-size", "200"]
        match = "not a multiple of 32"
    p = _cli_here(args, e, monkeypatch, capsys)  # each case stops before any build: a subprocess would be imports
    assert p.returncode == 2, p.stdout + p.stderr
    assert match in _one_clear_line(p)
    assert not (tmp_path / "out").exists()


def _cli_here(args, env, monkeypatch, capsys):
    """`convnext-deploy ARGS` in this process, with the environment's CONVNEXT_DEPLOY_* settings."""
    from types import SimpleNamespace

    from convnext_deploy.pipeline.cli import main

    for k, v in env.items():
        if k.startswith("CONVNEXT_DEPLOY_"):
            monkeypatch.setenv(k, v)
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_missing_toolchain_says_which_extra_and_the_rest_still_works(env):
    block = "import sys; sys.modules['onnxruntime'] = None; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", block, "deploy", "--target", "onnxruntime", "--variant", "atto"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 2
    assert "convnext-deploy[onnxruntime]" in _one_clear_line(p)
    p = subprocess.run([sys.executable, "-c", block, "variants"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "ConvNeXt-XL" in p.stdout


def test_nan_logits_are_refused():
    def broken(x):
        out = np.zeros((len(x), 10), np.float32)
        out[0, 3] = np.nan
        return out

    with pytest.raises(UserError, match="NaN/inf logits"):
        predict_many({"int8": broken}, [(np.zeros((2, 3, 32, 32), np.float32), np.zeros(2, np.int64))])


def test_report_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous report whole and no temporary directory behind."""
    import convnext_deploy.reports.write as w

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text('{"old": true}')

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(w, "plot_png", lambda report: b"png")
    monkeypatch.setattr(w, "render_markdown", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        w.write_report(out, {"x": 1}, manifest="{}")
    assert json.loads((out / "report.json").read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_report_keeps_its_keys(deployed):
    """report.json is read by users' CI: every key saved before the stages refactor is still there (option values
    and environment details inside may grow, so those subtrees are not compared)."""
    import re

    saved = json.loads((REPO / "tests" / "data" / "report_keys_onnxruntime.json").read_text())
    skip = re.compile(saved["skipped"])

    def paths(x, pre=""):
        out = set()
        if isinstance(x, dict):
            for k, v in x.items():
                p = f"{pre}.{k}" if pre else k
                out |= {p} | paths(v, p)
        elif isinstance(x, list):
            for v in x:
                out |= paths(v, pre + "[]")
        return out

    report = json.loads((deployed[0] / "report.json").read_text())
    keys = {p for p in paths(report) if not skip.search(p)}
    assert not set(saved["keys"]) - keys, sorted(set(saved["keys"]) - keys)  # none lost (new ones may come)


def test_report_has_memory_intervals_and_the_latency_aware_step(deployed):
    """Peak RSS per stage; every latency with its interval and the INT8 speed-up's; the per-layer INT8 vs FP32
    comparison the latency-aware step measured (its decision is the end-to-end measurement, whatever it was)."""
    out, _, _ = deployed
    report = json.loads((out / "report.json").read_text())
    stages = [r["stage"] for r in report["memory"]["stages"]]
    assert stages == ["prepare", "export", "build", "decide", "sensitivity", "finish", "validate"]
    assert all(r["peak_rss_mib"] > 50 for r in report["memory"]["stages"])
    assert report["memory"]["peak_rss_mib"] == max(r["peak_rss_mib"] for r in report["memory"]["stages"])
    for row in report["latency"]:
        lo, hi = row["p50_ci_ms"]
        assert lo <= row["p50_ms"] <= hi and row["rounds"] >= 2
        # spread over its --loads 2, each load's rounds in full: 3 each, or 2 where the timing budget bounds them;
        # where one call is slow enough for the budget to bound the loads too (224 px at batch 8, on a slow CPU or a
        # busy moment: latency.fit_budget), one load
        assert (row["instances"], row["rounds"] + row["disturbed_rounds"]) in {(2, 4), (2, 6), (1, 2), (1, 3)}, row
        if row["input_size"] == 32 and row["batch"] == 1:  # a call of a millisecond: never bounded
            assert row["instances"] == 2
    int8 = next(r for r in report["latency"] if r["precision"] == "int8" and r["batch"] == 1 and r["role"] == "deployment")
    q = int8["speedup_vs_reference"]
    assert q["ci95"][0] <= q["value"] <= q["ci95"][1]
    assert q["value"] == pytest.approx(report["gates"]["figures"]["int8_speedup"])
    mixed = report["recipe_choice"]["mixed"]
    rows = mixed["layers"]["rows"]
    assert len(rows) == 41 and all(r["reference_ms"] > 0 and r["int8_ms"] > 0 for r in rows)
    assert mixed["float_layers"] == [r["layer"] for r in rows if not r["int8_pays"]]
    assert mixed["kept"] == (mixed.get("gain", {}).get("verdict") == "faster")
    md = (out / "report.md").read_text()
    assert "## Memory" in md and "## Latency-aware precision" in md and "[95 % CI]" in md and "(2 loads" in md
