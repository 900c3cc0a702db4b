"""The bounded bench's deadline on this CPU: the default is calibrated on one CPU and scaled by this one's speed.

Only the rows' timing is cut to the deadline (bench_rows.Clock); building, evaluating and the minimum rounds of
timing are not, and they take longer on a slower CPU: the default deadline, set on an AMD EPYC Zen 5, printed
"~6.5 min" on an AMD EPYC Zen 3 whose run took 15.0 minutes (benchmarks/amd-epyc-zen3-2026-12-07/bench.json). So
before the rows a probe times this CPU: a 2048×2048×2048 FP32 GEMM through a runtime's own runner, the graph
(targets.base.peak_onnx, form "gemm") whose time every committed result records in its peak (`rows[].peak.fp32.ms`
in the results from before the peak had forms), so the reference's figure is a measured one, not a guess. The
default deadline is scaled by this CPU's time over the reference's, and so is the run's expected length (the
reference's run took longer than its deadline). A deadline the user gives (--minutes) is theirs, not scaled.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from convnext_deploy.targets import get_target
from convnext_deploy.targets.base import Artifact, peak_onnx

# The CPU the default deadline (bench_rows.BOUNDED["minutes"]) is calibrated on, from its committed result: the
# probe's graph there (each runtime's peak.fp32.ms, 2 threads) and how long its default run took with that deadline.
REFERENCE = {"result": "benchmarks/amd-epyc-zen5-2026-12-04/bench.json", "cpu": "AMD EPYC (family 26, model 2: Zen 5)",
             "threads": 2, "image_size": 224, "minutes": 6.5, "took_minutes": 9.1,
             "ms": {"onnxruntime": 39.09, "openvino": 38.19}}
N = 2048  # the peak's GEMM in the committed results: the same graph, so the two times compare
CALLS = 3  # timed after one warm-up, the fastest counting as the peak's fastest block does: a probe, not a peak


def gemm_probe(target, threads: int) -> dict:
    """The probe on `target`'s runner: ms of the fastest of CALLS calls of the FP32 GEMM, after one warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemm_fp32.onnx"
        x = np.random.default_rng(1).random(peak_onnx(path, "gemm", False, N), dtype=np.float32)
        runner = target.load_runner(Artifact(target.name, "fp32", [path], {"build": {"float_precision": "f32"}}),
                                    threads)
        runner.run(x)
        times = []
        for _ in range(CALLS):
            t0 = time.perf_counter()
            runner.run(x)
            times.append(time.perf_counter() - t0)
    return {"gemm": f"a {N}×{N}×{N} FP32 GEMM, {threads} threads", "target": target.name, "runtime": runner.runtime,
            "threads": threads, "ms": round(min(times) * 1e3, 2)}


def deadline(minutes: float, given: list[str], targets: list[str], threads: int, size: int) -> dict:
    """The deadline the rows' timing is cut to on this CPU, how it was set and a clause saying so for the plan line.

    `minutes`: the mode's, or the user's if `given` (the mode's settings the command set) holds it; `targets`: the
    runtimes this run can time, the first with a reference figure runs the probe. Only the reference's own plan (no
    setting given, its size and threads) has an expected length: its run's, scaled."""
    default_plan = not given and (size, threads) == (REFERENCE["image_size"], REFERENCE["threads"])
    runtime = next((t for t in targets if t in REFERENCE["ms"] and get_target(t).gemm_peak), None)
    probe = gemm_probe(get_target(runtime), threads) if runtime else None
    ref = f"{REFERENCE['cpu']} ({REFERENCE['result']})"
    out = {"minutes": minutes, "default_minutes": REFERENCE["minutes"], "calibrated_on": ref, "probe": probe,
           "scale": round(probe["ms"] / REFERENCE["ms"][runtime], 2) if probe else None, "expected_minutes": None}
    if not minutes:
        return {**out, "note": "a rough figure, not calibrated on any CPU"}
    if "minutes" in given or not probe:
        why = f"--minutes {minutes:g} given" if "minutes" in given else "no runtime to probe this CPU"
        return {**out, "note": f"{why}, not scaled: the default {REFERENCE['minutes']:g} minutes are calibrated on {ref}"}
    scaled, expect = round(minutes * out["scale"], 1), round(REFERENCE["took_minutes"] * out["scale"], 1)
    note = (f"the default {minutes:g} minutes × {out['scale']:.2f}, this CPU against {ref}, where it is calibrated: "
            f"{probe['gemm']} through {probe['runtime']} took {probe['ms']:.1f} ms here, "
            f"{REFERENCE['ms'][runtime]:.1f} ms there")
    if default_plan:  # only the reference's own plan: its run took longer than its deadline (builds, minimum rounds)
        note += f"; its default run took {REFERENCE['took_minutes']:g} minutes there, so expect about {expect:g} here"
    return {**out, "minutes": scaled, "expected_minutes": expect if default_plan else None, "note": note}
