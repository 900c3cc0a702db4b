"""`convnext-deploy validate BUNDLE`: on the machine that will run the model, check the bundle as it arrived.

1. Every file against SHA256SUMS (and each model file against the sha256 report.json measured): a changed byte
   is one line naming the file, exit 2 (bad input: get the bundle again), before anything is loaded.
2. The target's runtime here? If not (TensorRT without an NVIDIA GPU, Core ML off macOS): one line saying so,
   exit 3; the checksums were verified, nothing was run, nothing passes.
3. Preprocessing: the reference PNGs through calibration.preprocess (and the bundle's own predict.py) must give
   the bundle's reference inputs (this Pillow against the one that made them).
4. The model on the local runtime against the reference outputs, within a tolerance per precision (below).
5. INT8 on this CPU's INT8 path (ship/int8_path.py): full 8-bit weights measured on a CPU with VNNI fail on x86
   without it, where their u8×s8 pair sums saturate.
6. With labelled images, top-1 here; and p50 latency here; each printed next to the card's figure.
Exit 0 when every check passed, 1 when the model or the preprocessing disagrees with the reference here.

Tolerance: max |Δ output| ≤ r × max |reference output| (logits; Core ML: probabilities), r by precision:
fp32 1e-3 (another CPU's kernels change the float summation order: ~1e-5 of the range); fp16/bf16 2e-2 (one
half-precision rounding, 2^-11, compounding over the network); int8/w8 3e-2: ONNX Runtime's integer kernels
against the same graph run as float Q/DQ arithmetic differ by a small part of the range, so 3 % allows another ISA's kernels (VNNI, AVX2, ARM dot-product, AMX) while a saturating INT8 path or a wrong
runtime setting, which move outputs by a large part of the range, fail. Reference outputs made by a proxy (the
TensorRT Q/DQ graph on ONNX Runtime, the Core ML torch proxy) are compared at r = 0.1 at least, and say so.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np

from convnext_deploy.pipeline.core.cache import sha256_file
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.ship.bundle import REFERENCE_NPZ, SUMS, run_batched
from convnext_deploy.pipeline.ship.bundle_index import as_configured
from convnext_deploy.pipeline.ship.int8_path import check_int8_path
from convnext_deploy.pipeline.ship.labelled_images import labelled_source
from convnext_deploy.pipeline.ship.reference_set import HOST, PRIMARY

EXIT_OK, EXIT_FAILED, EXIT_NO_RUNTIME = 0, 1, 3
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 2e-2, "w8": 3e-2, "int8": 3e-2}
PROXY_TOLERANCE = 0.1
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


# ---------------------------------------------------------------- 1. checksums

def verify_sums(bundle: Path, log=print) -> int:
    """Number of files verified; a missing or changed file is a UserError naming it."""
    if not bundle.is_dir():
        raise UserError(f"{bundle} is not a directory; pass a bundle directory (e.g. runs/onnxruntime-atto/bundle)")
    sums = bundle / SUMS
    if not sums.is_file():
        raise UserError(f"{bundle} holds no {SUMS}: not a convnext-deploy bundle, or an incomplete copy; "
                        "copy the whole bundle directory")
    bad, listed = [], set()
    for n, line in enumerate(sums.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        m = _SUM_LINE.match(line)
        rel = m.group(2) if m else ""
        if not m or rel.startswith("/") or ".." in Path(rel).parts:
            raise UserError(f"{sums}:{n} is not a sha256sum line of a file in the bundle; the bundle was changed, "
                            "get it again")
        listed.add(rel)
        path = bundle / rel
        if not path.is_file():
            bad.append(f"{path}: missing (listed in {SUMS})")
        elif sha256_file(path) != m.group(1).lower():
            bad.append(f"{path}: sha256 differs from {SUMS} (changed after the bundle was made)")
    if bad:
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        raise UserError(f"{bad[0]}{more}; do not use this bundle: get it again from the deploy")
    unlisted = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()
                      and p.name != SUMS and not any(part.startswith(".") or part == "__pycache__"
                                                     for part in p.relative_to(bundle).parts))
    unlisted = [u for u in unlisted if u not in listed]
    if unlisted:
        log(f"note: {len(unlisted)} file(s) not covered by {SUMS}, ignored: {', '.join(unlisted[:3])}")
    return len(listed)


def _bundle_files(bundle: Path) -> tuple[dict, dict, list[str]]:
    try:
        report = json.loads((bundle / "report.json").read_text())
        pp = json.loads((bundle / "preprocessing.json").read_text())
        labels = (bundle / "labels.txt").read_text().splitlines()
    except (OSError, ValueError) as e:
        raise UserError(f"{bundle}: cannot read report.json / preprocessing.json / labels.txt ({e}); "
                        "not a complete bundle") from None
    return report, pp, labels


def _artifact(bundle: Path, report: dict, precision: str, config: dict):
    """The bundle's artifact of `precision`, its files checked against the sha256 the deploy measured, to be run with
    the settings preprocessing.json gives (`config`)."""
    from convnext_deploy.targets.base import Artifact

    row = next((a for a in report["artifacts"] if a["precision"] == precision), None)
    if row is None:
        raise UserError(f"{bundle}/report.json has no {precision} artifact; the bundle is inconsistent, get it again")
    name = report["target"]["name"]
    art = Artifact(name, precision, [bundle / f for f in row["files"]], as_configured(name, row["metadata"], config),
                   None)
    for name, digest in art.sha256().items():
        if row["sha256"].get(name) != digest:
            raise UserError(f"{bundle / name}: not the file the deploy measured (sha256 differs from report.json); "
                            "get the bundle again")
    return art


# ---------------------------------------------------------------- 3. preprocessing

def _predict_module(bundle: Path):
    """The bundle's own predict.py, loaded as a module (it imports its runtime only when it runs a model)."""
    path = bundle / "predict.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("bundle_predict", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_preprocessing(bundle: Path, ref, report: dict, pp_json: dict) -> tuple[bool, str]:
    from PIL import Image

    from convnext_deploy.calibration.preprocess import pixels, preprocess
    from convnext_deploy.pipeline.models.variants import Preprocessing

    pp = Preprocessing.from_dict(report["model"]["preprocessing"])
    predict = _predict_module(bundle)
    image_in = ref["inputs"].dtype == np.uint8  # the model takes the pixels themselves
    mean, std = np.asarray(pp.mean, np.float32), np.asarray(pp.std, np.float32)
    ours, theirs = [], []
    for name in ref["images"]:
        with Image.open(bundle / str(name)) as im:
            im.load()
            ours.append(pixels(im, pp) if image_in else preprocess(im, pp))
            if predict is not None:  # predict.py crops; a float reference (Core ML's proxy) is normalised here
                crop = predict.to_input(im, pp_json)
                theirs.append(crop if image_in else ((crop / np.float32(255) - mean) / std).transpose(2, 0, 1))
    level = 1.0 if image_in else 1.0 / (255.0 * min(pp.std)) + 1e-6  # one grey level
    ref = {**ref, "inputs": ref["inputs"].astype(np.float32)}
    diffs = {"calibration.preprocess": float(np.abs(np.stack(ours).astype(np.float32) - ref["inputs"]).max())}
    if predict is not None:
        diffs["predict.py"] = float(np.abs(np.stack(theirs).astype(np.float32) - ref["inputs"]).max())
    ok = all(d <= level for d in diffs.values())
    made = (pp_json.get("reference_made_with") or {}).get("pillow", "?")
    from PIL import __version__ as pillow

    text = ", ".join(f"{k} max |Δ| {v:.3g}" for k, v in diffs.items())
    return ok, (f"preprocessing: {len(ref['images'])} reference images → inputs: {text} (allowed: one grey level, "
                f"{level:.3g}; Pillow {pillow} here, {made} made them): {'pass' if ok else 'FAIL'}")


# ---------------------------------------------------------------- 4. reference outputs

def tolerance(precision: str, reference: np.ndarray, proxy: bool) -> float:
    r = TOLERANCE.get(precision, TOLERANCE["int8"])
    return max(r, PROXY_TOLERANCE if proxy else 0.0) * float(np.abs(reference).max())


def reference_choice(pp_json: dict, report: dict) -> tuple[str, str]:
    """(the reference_outputs.npz key prefix to compare with, the line saying which set and why). The bundle's own
    set (a --device bundle: the device's kernels') where this CPU takes the INT8 path it was made on; the host's
    where this CPU takes the host's path instead; otherwise the bundle's own, with the difference to expect."""
    from convnext_deploy.pipeline.measure.machine import cpu_profile

    built_on = ((report.get("machine") or {}).get("cpu_profile") or {}).get("path")  # a bundle from before the sets
    sets = pp_json.get("reference_sets") or {PRIMARY: {"int8": {"device": "the deploy's machine",
                                                                "int8_path": built_on}}}
    here = cpu_profile()["path"]

    def made(name: str) -> tuple[str, str]:
        first = next(iter(sets[name].values()))
        return first.get("device", "?"), first.get("int8_path") or "?"

    (where, path) = made(PRIMARY)
    if path == here:
        return PRIMARY, f"reference set: the bundle's own, made on {where}, INT8 path {path}: the path this CPU takes"
    if HOST in sets and made(HOST)[1] == here:
        return HOST, (f"reference set: the deploy host's, made on {made(HOST)[0]}, INT8 path {here}: the path this CPU "
                      f"takes (the bundle's own set is the device's: {where}, INT8 path {path})")
    apart = [f"{p}: max |Δ| {d['vs_device']['max_abs_diff_of_range'] * 100:.2g} % of the range, top-1 "
             f"{d['vs_device']['top1_agree']}/{d['vs_device']['n']}" for p, d in (sets.get(HOST) or {}).items()
             if d.get("vs_device")]
    return PRIMARY, (f"reference set: the bundle's own, made on {where}, INT8 path {path}; this CPU takes INT8 path "
                     f"{here}, whose integer kernels may round and accumulate otherwise: expect INT8 outputs to differ"
                     + (f" (between the two paths the deploy measured: {'; '.join(apart)})" if apart else "")
                     + f", within {TOLERANCE['int8'] * 100:g} % of the range unless this path saturates (below)")


def check_outputs(precision: str, runner, ref, made_by: dict, which: str = PRIMARY) -> tuple[bool, str]:
    expected = ref[f"{which}_{precision}"]
    got = run_batched(runner.native or runner.run, ref["inputs"])  # the inputs are the model's own
    if got.shape != expected.shape:
        return False, f"reference outputs {precision}: shape {got.shape} here, {expected.shape} in the bundle: FAIL"
    proxy = bool(made_by.get("proxy"))
    tol = tolerance(precision, expected, proxy)
    diff = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
    agree = int((got.argmax(1) == expected.argmax(1)).sum())
    ok = diff <= tol
    kind = str(ref["output_kind"])
    return ok, (f"reference outputs {precision}: {len(expected)} images, max |Δ{kind}| {diff:.3g} (allowed {tol:.3g}"
                f" = {max(TOLERANCE.get(precision, 0.03), PROXY_TOLERANCE if proxy else 0):g} × the output range"
                + (f"; made by a proxy: {made_by['proxy']}" if proxy else "") + f"), top-1 {agree}/{len(expected)} "
                f"agree: {'pass' if ok else 'FAIL'}")


# ---------------------------------------------------------------- 6. labelled images, latency

def _card_top1(report: dict, precision: str) -> str:
    a = report["accuracy"].get(precision)
    if not a:
        return "not in the card"
    return (f"{a['top1'] * 100:.2f}% of {a['n']} ({report['data']['evaluation']['source']}; {a['runtime']}, "
            f"{a['device']}, {a['kind']})")


def _card_p50(report: dict, precision: str, size: int) -> str:
    rows = [e for e in report["latency"] if e["precision"] == precision and e["batch"] == 1 and e["input_size"] == size]
    if not rows:
        return "not measured"
    e = rows[0]
    return f"{e['p50_ms']:.2f} ms ({e['runtime']}, {e['device']}, {e['kind']})"


def validate_bundle(bundle: Path, images: Path | None = None, labels: Path | None = None, runs: int = 50,
                    threads: int | None = None, log=print) -> int:
    from convnext_deploy.pipeline.measure.latency import measure
    from convnext_deploy.targets import get_target

    bundle = Path(bundle)
    if labels is not None and images is None:
        raise UserError("--labels FILE needs --images DIR (the folder its file names are in)")
    n = verify_sums(bundle, log)
    log(f"checksums: {n} files match {SUMS}")
    report, pp_json, class_names = _bundle_files(bundle)
    target = get_target(report["target"]["name"])
    ref = dict(np.load(bundle / REFERENCE_NPZ, allow_pickle=False))
    precisions = [str(p) for p in ref["precisions"]]
    arts = {p: _artifact(bundle, report, p, (pp_json.get("models", {}).get(p) or {}).get("config") or {})
            for p in precisions}
    avail = target.available()
    if not avail.ok:
        log(f"validate: NOT RUN: the {target.name} runtime is not here ({avail.reason}); the checksums are verified, "
            f"the model was not run, so nothing else is checked (exit {EXIT_NO_RUNTIME})")
        return EXIT_NO_RUNTIME
    ok, line = check_preprocessing(bundle, ref, report, pp_json)
    log(line)
    which, line = reference_choice(pp_json, report)
    log(line)
    made_by = ((pp_json.get("reference_sets") or {}).get(which) or pp_json.get("reference_made_by") or {})
    runners = {}
    for p, art in arts.items():
        t = threads or report["accuracy"].get(p, {}).get("threads") or os.cpu_count() or 1
        runners[p] = r = target.load_runner(art, t)
        if r.proxy:  # never a pass from a stand-in for the runtime
            log(f"validate: NOT RUN: {target.name} can only run a proxy here ({r.proxy}); the checksums are "
                f"verified, nothing else is checked (exit {EXIT_NO_RUNTIME})")
            return EXIT_NO_RUNTIME
        log(f"runtime {p}: {r.runtime} on {r.device}, executed {r.precision}")
        good, line = check_outputs(p, r, ref, made_by.get(p) or {}, which)
        ok &= good
        log(line)
    path_check = check_int8_path(report, target.int8_recipes) if "int8" in runners else None
    if path_check:
        ok &= path_check[0]
        log(path_check[1])
    if images is not None:
        from convnext_deploy.calibration.batches import iter_batches
        from convnext_deploy.pipeline.measure.accuracy import accuracy, predict_many
        from convnext_deploy.pipeline.models.variants import Preprocessing

        src = labelled_source(Path(images), labels, class_names)
        pp = Preprocessing.from_dict(report["model"]["preprocessing"])
        preds = predict_many({p: r.run for p, r in runners.items()},
                             iter_batches(src, range(len(src)), pp, desc="validate"))
        for p in runners:
            a = accuracy(preds[p])
            log(f"top-1 {p}: here {a['top1'] * 100:.2f}% of {a['n']} ({images}) | card {_card_top1(report, p)}")
    if runs > 0:
        for p, r in runners.items():
            sizes = sorted({e["input_size"] for e in report["latency"] if e["precision"] == p and e["batch"] == 1}) \
                or [int(pp_json["input_size"])]
            for size in sizes:
                lat = measure({p: r}, batch=1, input_size=size, runs=runs, warmup=5)[p]
                log(f"p50 {p} {size} px batch 1: here {lat.p50_ms:.2f} ms ({r.runtime}, {r.device}) | "
                    f"card {_card_p50(report, p, size)}")
    log(f"validate: {'PASS' if ok else 'FAIL'}: {bundle}")
    return EXIT_OK if ok else EXIT_FAILED
