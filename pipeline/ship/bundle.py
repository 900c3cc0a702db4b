"""The bundle a device team takes as it is: `<run>/bundle/` with the artifact the gates passed, labels.txt,
preprocessing.json, MODEL_CARD.md (read from report.json, which it carries), reference inputs and outputs,
predict.py (ONNX Runtime, OpenVINO, Core ML) and SHA256SUMS over every other file (`sha256sum -c` format).

Only a run whose gates passed is bundled: a deploy that misses a gate writes no bundle, and `bundle RUN_DIR`
refuses such a run, so a failed artifact never leaves looking like a shippable one. A run whose figures come from
a proxy (TensorRT without a GPU, Core ML off macOS) is bundled only when its gates passed (`allow_proxy`), and its
card says so in its second line. The bundle is built under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from convnext_deploy.pipeline.core.cache import publish_dir, sha256_file
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.pipeline.ship.bundle_index import (
    PIL_INPUT,
    PROBABILITIES,
    image_input,
    output_kind,
    preprocessing_json,
)
from convnext_deploy.pipeline.ship.reference_set import (
    HOST,
    PRIMARY,
    REFERENCE_IMAGES,
    device_outputs,
    reference_images,
    set_difference,
)
from convnext_deploy.reports.cells import verdict_passed

BUNDLE = "bundle"
SUMS = "SHA256SUMS"
REFERENCE_NPZ = "reference_outputs.npz"
TEMPLATES = Path(__file__).resolve().parent / "bundle_files"
# What the template and validate must know of a runtime, by target name (the Target contract does not say):
PREDICT = {"onnxruntime", "openvino", "coreml"}  # predict.py runs these; a TensorRT engine needs the device's build


def read_report(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "report.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not a deploy's report directory (no report.json); pass the --out of a "
                        "deploy, e.g. runs/onnxruntime-atto") from None
    except ValueError as e:
        raise UserError(f"{run_dir}/report.json is not valid JSON ({e}); re-run the deploy") from None


def failed_gates(report: dict) -> str:
    bad = [f"{v['gate']} {v['status']}" for v in report["gates"]["verdicts"]
           if not verdict_passed(v)]
    return ", ".join(bad) or "no gate passed"


# ---------------------------------------------------------------- what goes in

def _artifact_rows(report: dict, run_dir: Path, precisions: list[str]) -> dict[str, dict]:
    """The report's artifact rows of `precisions`, each file checked against the sha256 the report measured."""
    from convnext_deploy.targets.base import Artifact

    rows = {a["precision"]: a for a in report["artifacts"]}
    for p in precisions:
        if p not in rows:
            raise UserError(f"{run_dir} has no {p} artifact (it has: {', '.join(rows)})")
        a = rows[p]
        art = Artifact(report["target"]["name"], p, [run_dir / "artifacts" / f for f in a["files"]])
        missing = [f.name for f in art.files if not f.exists()]
        if missing:
            raise UserError(f"{run_dir}/artifacts/{missing[0]} is missing; re-run the deploy")
        for name, digest in art.sha256().items():
            if a["sha256"].get(name) != digest:
                raise UserError(f"{run_dir}/artifacts/{name} is not the file the report measured (sha256 differs); "
                                "re-run the deploy")
    return {p: rows[p] for p in precisions}


def _class_names(report: dict, checkpoint: Path | None) -> list[str]:
    from convnext_deploy.pipeline.models.checkpoints import load_checkpoint

    m = report["model"]
    path = Path(checkpoint or m["checkpoint"])
    if not path.exists():
        raise UserError(f"checkpoint {path} (named in report.json) not found; run from the directory the deploy ran "
                        "in, or pass --checkpoint PATH")
    ck = load_checkpoint(path)
    if ck.sha256 != m["checkpoint_sha256"]:
        raise UserError(f"{path} is not the checkpoint this run deployed (sha256 {ck.sha256[:12]}…, the report "
                        f"says {m['checkpoint_sha256'][:12]}…); pass --checkpoint with the right file")
    return list(ck.class_names)


def run_batched(run, inputs: np.ndarray) -> np.ndarray:
    """The model's outputs on `inputs`, a runtime-sized batch at a time (200 images at 224 px in one call would
    make the runtime's arena hold all their activations)."""
    from convnext_deploy.targets.base import inference_batch

    step = inference_batch(inputs.shape[1] if inputs.shape[-1] == 3 else inputs.shape[-1], cap=50)
    return np.concatenate([np.asarray(run(inputs[i:i + step]), np.float32) for i in range(0, len(inputs), step)])


def _runner(report: dict, run_dir: Path, row: dict, runners: dict | None):
    """The artifact as published in the run directory, loaded by its target (the file the bundle ships is the
    file that gives the reference outputs); the deploy's own runner where that cannot load here (Core ML off
    macOS: its torch proxy lives in the build cache, not in the run)."""
    from convnext_deploy.targets import get_target
    from convnext_deploy.targets.base import Artifact

    target = get_target(report["target"]["name"])
    art = Artifact(target.name, row["precision"], [run_dir / "artifacts" / f for f in row["files"]],
                   row["metadata"], row.get("proxy"))
    threads = report["accuracy"].get(row["precision"], {}).get("threads") or 1
    try:
        return target.load_runner(art, threads)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        if runners and row["precision"] in runners:
            return runners[row["precision"]]
        raise UserError(f"cannot run the {row['precision']} artifact of {run_dir} here to record its reference outputs "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); re-run the deploy, which bundles "
                        "when its gates pass, or run `bundle` where the target's runtime is (Core ML: macOS)") from None


def device_settings(report: dict, precision: str) -> dict | None:
    """The runtime settings an emulated --device resolved for `precision` (OpenVINO's precision hint: f16 on an ARM
    core with FP16 arithmetic, whatever this machine ran): what the device must be told, not this machine's."""
    d = report.get("device") or {}
    return ((d.get("accuracy") or {}).get(precision) or {}).get("settings") if d.get("measured") == "emulated" else None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- the bundle

def write_sums(directory: Path) -> int:
    """SHA256SUMS over every other file under `directory`, sorted, in `sha256sum -c` format."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != SUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    (directory / SUMS).write_text("".join(lines))
    return len(lines)


def make_bundle(run_dir: Path, with_fp32: bool = False, runners: dict | None = None,
                class_names: list[str] | None = None, checkpoint: Path | None = None, log=print) -> Path:
    """Write `run_dir/bundle/` for a run whose gates passed. `runners`: the deploy's own (precision → Runner), for
    an artifact that cannot be loaded from the run here; `with_fp32`: the target's float reference too (FP32;
    Core ML: FP16); `class_names`: the checkpoint's (else read from the checkpoint the report names)."""
    from convnext_deploy.reports.model_card import render_model_card

    run_dir = Path(run_dir)
    report = read_report(run_dir)
    target = report["target"]["name"]
    if not report["gates"]["passed"]:
        raise UserError(f"{run_dir}: gates not met ({failed_gates(report)}); only an artifact that passed its gates "
                        "is bundled: fix the cause and re-deploy")
    precisions = ["int8"] + ([report["target"]["reference"]] if with_fp32 else [])
    rows = _artifact_rows(report, run_dir, precisions)
    names = list(class_names) if class_names is not None else _class_names(report, checkpoint)
    if len(names) != report["model"]["num_classes"]:
        raise UserError(f"{len(names)} class names for a {report['model']['num_classes']}-class model")
    made_by, outputs, resolved = {}, {}, {}
    staged: dict = {}
    image_in = image_input(rows["int8"])
    # predict.py reads its labels and input rule from the model: an image-input artifact, or a Core ML package
    predict = target in PREDICT and (image_in or target in PIL_INPUT)

    def build(tmp: Path) -> None:
        ref = reference_images(run_dir, report, names, tmp / REFERENCE_IMAGES, image_in)
        on_device = device_outputs(run_dir, report, ref)  # an emulated --device's own outputs on these inputs
        host = {}
        for p, row in rows.items():
            r = _runner(report, run_dir, row, runners)
            y = run_batched(r.native or r.run, ref["inputs"])  # the model's own input
            if target in PROBABILITIES and r.proxy:  # the proxy gives the logits the package's softmax reads
                y = _softmax(y)
            host[p] = {"runtime": r.runtime, "device": r.device, "precision_executed": r.precision, "proxy": r.proxy,
                       "int8_path": cpu_profile()["path"]}  # this machine's: `bundle` may run elsewhere
            if on_device is not None and p in on_device:  # the device's set first, the host's kept beside it
                outputs[f"{PRIMARY}_{p}"], outputs[f"{HOST}_{p}"] = on_device[p], y
                made_by[p] = report["device"]["reference"]["made_by"][p]
            else:
                outputs[f"{PRIMARY}_{p}"], made_by[p] = y, host[p]
            resolved[p] = device_settings(report, p) or r.settings
            for f in row["files"]:
                src = run_dir / "artifacts" / f
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / f)  # a copy: never the cache's inode
        np.savez(tmp / REFERENCE_NPZ, **ref, **outputs, output_kind=np.asarray(output_kind(target)),
                 precisions=np.asarray(precisions))
        (tmp / "labels.txt").write_text("".join(f"{n}\n" for n in names))
        pp = preprocessing_json(report, rows, len(names), resolved)
        pp["reference_made_by"] = made_by
        pp["reference_sets"] = {PRIMARY: {p: made_by[p] for p in rows}}
        if on_device is not None:
            pp["reference_sets"][HOST] = {p: {**host[p], "vs_device": set_difference(
                outputs[f"{HOST}_{p}"], outputs[f"{PRIMARY}_{p}"])} for p in rows if f"{HOST}_{p}" in outputs}
        if report.get("device"):
            pp["device"] = {k: report["device"].get(k) for k in ("name", "description", "measured", "label")}
        (tmp / "preprocessing.json").write_text(json.dumps(pp, indent=1) + "\n")
        shutil.copy2(run_dir / "report.json", tmp / "report.json")
        if predict:
            shutil.copy2(TEMPLATES / "predict.py", tmp / "predict.py")
        info = {"precisions": precisions, "files": {p: r["files"] for p, r in rows.items()},
                "predict": predict, "image_input": image_in,
                "reference": {"n": len(ref["labels"]), "source": report["data"]["evaluation"]["source"],
                              "made_by": made_by}}
        (tmp / "MODEL_CARD.md").write_text(render_model_card(report, info))
        staged["files"] = write_sums(tmp)  # last: it covers every file written above

    out = publish_dir(run_dir / BUNDLE, build)
    log(f"bundle: {out} ({', '.join(precisions)}; {staged['files']} files in {SUMS})")
    return out


def after_deploy(out_dir: Path, report: dict, runners: dict, class_names, log=print) -> Path | None:
    """The deploy's last step: a bundle when every gate passed, otherwise one line saying why there is none."""
    if not report["gates"]["passed"]:
        log(f"bundle: none written: gates not met ({failed_gates(report)}); a failed artifact is never bundled")
        return None
    if "int8" not in runners:
        log("bundle: none written: no INT8 artifact was built")
        return None
    return make_bundle(out_dir, runners=runners, class_names=list(class_names), log=log)
