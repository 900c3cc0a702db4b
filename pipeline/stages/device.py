"""Stage 5b (`--device NAME`, a device this machine is not): the shipped artifacts run on the device's own kernels,
under qemu-user with its -cpu and the runtime's wheel for its architecture, on the first `--device-eval N` images
of the evaluation split. Numerics only: latency under emulation says nothing, so none is taken.

What comes back is read as the host's figures are: top-1 in counts, INT8 against the reference run on the same
kernels, agreement with the host's outputs on the same inputs, and what the runtime executed there (precisions per
layer kind, the settings it resolved), by the target's own runner (pipeline/device/on_device.py).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from convnext_deploy.calibration.batches import iter_batches
from convnext_deploy.pipeline.core.cache import cached_dir, code_digest, key_of
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.device import emulator
from convnext_deploy.pipeline.device.guest import run_guest, where
from convnext_deploy.pipeline.measure.accuracy import Predictions, accuracy
from convnext_deploy.pipeline.ship.bundle import run_batched
from convnext_deploy.pipeline.ship.reference_set import DEVICE_REFERENCE, inputs_sha256, reference_set, set_difference
from convnext_deploy.pipeline.stages.build import Built
from convnext_deploy.pipeline.stages.context import Context
from convnext_deploy.targets import takes_image
from convnext_deploy.targets.base import inference_batch

ON_DEVICE_MODULE = "convnext_deploy.pipeline.device.on_device"  # what runs in the guest (its code keys the cache)
# the precisions whose reference outputs the device makes: INT8's numerics depend on the INT8 path (an AVX2 host's
# saturate where ARM's do not); FP32's do not (device vs host: max |Δ| 2e-6 on the A76, 0 % of the range), and FP32
# is the slow one under emulation (softfloat: 27 s against INT8's 9 s for atto's 240 images), so its reference
# outputs come from this machine and say so (preprocessing.json's reference_sets)
ON_REFERENCE = ["int8"]
SECONDS_PER_IMAGE = 2.0  # the emulated run's time limit per image and model (measured 0.1–0.64 s), plus a minute


def device_inputs(ctx: Context, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The float batches and labels of the first `n` evaluation images: the host's own evaluation input."""
    xs, ys = zip(*iter_batches(ctx.eval_src, ctx.split.evaluation.indices[:n], ctx.ck.preprocessing,
                               batch_size=inference_batch(ctx.ck.preprocessing.input_size), desc="device images"))
    return np.concatenate(xs), np.concatenate(ys)


def _top5(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :min(5, logits.shape[1])]


def reference_inputs(ctx: Context, built: Built, work: Path) -> dict:
    """The bundle's reference images and the model's own inputs made from them (pipeline/ship/reference_set.py):
    the same the bundle will ship, so the device's outputs on them can be its reference outputs."""
    shipped = built.artifacts.get("int8") or built.artifacts[ctx.target.reference]
    return reference_set(ctx.eval_src, ctx.split.evaluation.indices, ctx.ck.preprocessing, work / "reference_images",
                         takes_image(shipped.metadata))


def _run_emulated(ctx: Context, built: Built, x: np.ndarray, ref: np.ndarray, work: Path) -> dict:
    """The guest's outputs and what ran there, cached under a key of everything that decides them (the artifacts'
    bytes, the inputs, the core, the emulation and its wheels, this code): a re-run of the deploy resumes."""
    profile = ctx.device
    precisions = [p for p in (ctx.target.reference, "int8") if p in built.artifacts]
    emulated_by, em = where(profile), emulator.find(profile.arch)
    key = key_of("device", ctx.target.name, profile.name, emulated_by, str(em.python), str(em.site), em.manifest,
                 {p: built.artifacts[p].sha256() for p in precisions}, inputs_sha256(x), inputs_sha256(ref),
                 ctx.cfg.threads, ctx.target.describe_environment(),
                 code_digest(ON_DEVICE_MODULE, __name__, ctx.target.module))

    def run_into(out: Path) -> None:
        np.save(work / "inputs.npy", x)
        np.save(work / "reference_inputs.npy", ref)
        job = {"target": ctx.target.name, "inputs": str(work / "inputs.npy"), "out": str(out),
               "reference_inputs": str(work / "reference_inputs.npy"), "reference_precisions": ON_REFERENCE,
               "threads": ctx.cfg.threads, "batch": inference_batch(ctx.ck.preprocessing.input_size),
               "artifacts": {p: {"files": [str(f) for f in built.artifacts[p].files],
                                 "metadata": built.artifacts[p].metadata} for p in precisions}}
        (work / "job.json").write_text(json.dumps(job, default=str))
        ctx.log(f"device {profile.name}: running {', '.join(precisions)} on {len(x)} evaluation images and "
                f"{', '.join(ON_REFERENCE)} on the bundle's {len(ref)} reference images under {emulated_by} (numerics "
                "only)")
        start = time.perf_counter()
        proc = run_guest(profile, ["--job", str(work / "job.json")],
                         timeout=60 + SECONDS_PER_IMAGE * (len(x) * len(precisions) + len(ref)))
        if proc.returncode != 0 or not (out / "result.json").exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"the emulated {profile.name} run failed (exit {proc.returncode}: {last}); re-run "
                            "`make setup-emulation`, or deploy without --device")
        result = json.loads((out / "result.json").read_text())
        result["seconds"] = round(time.perf_counter() - start, 1)
        (out / "result.json").write_text(json.dumps(result, indent=1))

    directory, cached = cached_dir("device", key, run_into, log=ctx.log)
    result = json.loads((directory / "result.json").read_text())
    result["cached"] = cached
    result["emulator"] = emulated_by
    result["outputs"] = {p: np.load(directory / f"{p}.npy") for p in precisions}
    result["reference_outputs"] = {p: np.load(directory / f"{p}_reference.npy")
                                   for p in precisions if p in ON_REFERENCE}
    return result


def on_device(ctx: Context, built: Built) -> dict | None:
    """The device's figures (report.json's `device`), or None where no --device was given."""
    profile = ctx.device
    if profile is None:
        return None
    about = {"name": profile.name, "description": profile.description, "core": profile.core, "arch": profile.arch,
             "int8_path": profile.int8()["int8_path"], "path": profile.int8()["path"],
             "fp16_arithmetic": profile.fp16_arithmetic, "measured": ctx.device_mode}
    if ctx.device_mode == "native":
        ctx.log(f"device {profile.name}: this machine takes its INT8 path; every figure is measured here")
        return {**about, "label": "native"}
    n = min(ctx.cfg.device_eval, len(ctx.split.evaluation))
    x, labels = device_inputs(ctx, n)
    with tempfile.TemporaryDirectory(prefix="convnext-device-") as tmp:
        ref = reference_inputs(ctx, built, Path(tmp))
        result = _run_emulated(ctx, built, x, ref["inputs"], Path(tmp))
    seen = result["cpu_profile"]
    label = f"emulated {seen['cpu']}"
    base = ctx.target.reference
    preds = {p: Predictions(_top5(out), labels) for p, out in result["outputs"].items()}
    figures = {}
    for p, out in result["outputs"].items():
        acc = accuracy(preds[p], preds[base] if p != base else None)
        ran = result["models"][p]
        figures[p] = {**acc, "label": label, "kind": "emulated", "runtime": ran["runtime"],
                      "precision_executed": ran["executed"], "settings": ran["settings"], "layers": ran["layers"],
                      "vs_host": set_difference(out, run_batched(built.runners[p].run, x)),
                      "predictions": [int(c) for c in preds[p].top5[:, 0]],  # what device-check compares with
                      "seconds": ran["load_s"] + ran["run_s"]}
        ctx.log(f"device {profile.name} ({label}) {p}: top-1 {acc['correct']}/{n}"
                + (f", agreement with {base} {acc['agree']}/{n}, drop {acc['drop_images']} images"
                   if "agree" in acc else "")
                + f"; agrees with this machine on {figures[p]['vs_host']['top1_agree']}/{n}; ran {ran['executed']}")
    return {**about, "label": label, "emulator": result["emulator"], "cpu_seen": seen, "n": n,
            "images": f"the first {n:,} of the evaluation split's {len(ctx.split.evaluation):,}",
            "indices": [int(i) for i in ctx.split.evaluation.indices[:n]],
            "accuracy": figures, "seconds": result["seconds"], "cached": result["cached"],
            "reference": _reference(ctx, built, about, label, result, ref),
            # arrays, not report.json's: deploy.py hands them to the report stage, which writes DEVICE_REFERENCE
            "reference_outputs": {"indices": ref["indices"],
                                  **{f"outputs_{p}": y for p, y in result["reference_outputs"].items()}}}


def _reference(ctx: Context, built: Built, about: dict, label: str, result: dict, ref: dict) -> dict:
    """What report.json says of the device's outputs on the bundle's reference inputs: the file, the inputs they
    belong to, the kernels that made them, and how far this machine's outputs are from them."""
    made_by, vs_host = {}, {}
    for p, y in result["reference_outputs"].items():
        ran = result["models"][p]
        made_by[p] = {"runtime": ran["runtime"], "device": f"{label} ({result['emulator']})",
                      "precision_executed": ran["executed"], "proxy": None, "int8_path": about["path"],
                      "kind": "emulated", "emulator": result["emulator"]}
        r = built.runners[p]
        vs_host[p] = set_difference(y, run_batched(r.native or r.run, ref["inputs"]))
        d = vs_host[p]
        ctx.log(f"device {ctx.device.name} {p}: reference outputs of the bundle's {len(y)} images made on its kernels; "
                f"this machine's differ by max |Δ| {d['max_abs_diff']:.3g} ({d['max_abs_diff_of_range'] * 100:.2g} % "
                f"of the range), top-1 {d['top1_agree']}/{len(y)}")
    return {"file": DEVICE_REFERENCE, "n": len(ref["indices"]), "inputs_sha256": inputs_sha256(ref["inputs"]),
            "made_by": made_by, "host_vs_device": vs_host}

