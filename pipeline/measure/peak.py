"""How far a model runs from what its runtime can do on this CPU: the runtime's own peak, measured, and a model's
effective MAC rate as a fraction of it.

The peak is one large product (2048³ multiply-accumulates) in each form a runtime runs ConvNeXt's pointwise layers
in, a GEMM (`MatMul`) and a 1×1 convolution (`Conv`), run through the target's own runner as ONNX graphs the runtime
reads like any artifact (targets.peak_graphs): FP32, and INT8 as Q/DQ with a per-tensor u8 activation and s8
weight (the U8S8 products both ONNX Runtime and OpenVINO run ConvNeXt's INT8 layers with). A product this size is
compute-bound, so its rate is what the runtime's kernels reach on these cores and threads.

A precision's peak is the fastest form that really executed in that precision, as the runtime reads back what it
ran (OpenVINO's runtime model: each compute layer's precision and kernel; ONNX Runtime's graph after its fusions:
its integer kernels). A form run in another precision is recorded with what ran it and never taken as that peak;
where no form ran INT8 the INT8 peak is absent, with the reason. One form is not enough: OpenVINO 2026.4 on AVX2
without VNNI runs the u8 GEMM in a generic kernel (jit_gemm_I8) barely faster than its FP32 GEMM, and the 1×1
convolution in a dedicated one (jit_avx2_1x1_I8): on a Zen 3, ConvNeXt-T's INT8 (its pointwise layers 1×1
convolutions in the channels-first form) ran 37 % above the GEMM-only "peak".

A model's rate (its multiply-accumulates at batch 1 over its p50) can only come near the peak where its time goes
into such products. A rate above the peak is no share of it, only proof that the peak missed a faster kernel:
`fraction` flags it ("bad_peak") instead. Measured once per CPU profile, thread count, runtime version and code
(cached).
"""
from __future__ import annotations

import json
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from convnext_deploy.pipeline.core.cache import cached_dir, code_digest, key_of
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.targets.base import Artifact, peak_onnx

N = 2048  # M = K = N: 8.6 G multiply-accumulates a call, compute-bound on any CPU here
FORMS = {"gemm": "GEMM", "conv1x1": "1×1 convolution"}  # targets.peak_graphs: the graph of each
INT8_TYPES = ("u8", "i8")  # the runtime precisions OpenVINO reports for an integer kernel
CALLS, BLOCKS = 5, 5  # per block; the median call of the fastest block (a peak, not a typical figure)


# model → {size: MACs}: export, decide and validate ask the same deploy's model up to six times (XL: a second each)
_MACS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_macs(model: torch.nn.Module, size: int) -> int:
    """Multiply-accumulates of one image at `size` px: every Conv2d and Linear (what runs as GEMM or convolution)."""
    known = _MACS.setdefault(model, {})
    if size not in known:
        known[size] = _count_macs(model, size)
    return known[size]


def _count_macs(model: torch.nn.Module, size: int) -> int:
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * k
        else:
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, getattr(model, "in_chans", 3), size, size))
    finally:
        for h in hooks:
            h.remove()
    return int(total)


def _rate(run, shape: list[int], n: int) -> tuple[float, float]:
    """(G multiply-accumulates per second, ms of the median call) of the fastest block: n³ per call."""
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    for _ in range(2):
        run(x)
    best = float("inf")
    for _ in range(BLOCKS):
        calls = []
        for _ in range(CALLS):
            t0 = time.perf_counter()
            run(x)
            calls.append(time.perf_counter() - t0)
        best = min(best, float(np.median(calls)))
    return n ** 3 / best / 1e9, best * 1e3


def executed(runner) -> tuple[str, str]:
    """(the precision a peak graph's compute really ran in: "int8", "fp32" or what else, what ran it), as the
    runtime reads it back through its runner; "not read back" where the runtime does not say."""
    compute = runner.layers.get("compute") or {}
    if compute:  # OpenVINO: the runtime precision of each compute layer, and the kernel it got
        kinds = {k.split()[-1] for k in compute}
        ran = "int8" if kinds <= set(INT8_TYPES) else "fp32" if kinds == {"f32"} else "+".join(sorted(kinds))
        return ran, ", ".join(runner.layers.get("kernels") or compute)
    if runner.ops:  # ONNX Runtime: the integer kernels and float Conv/MatMul left in the graph it executes
        ints, floats = runner.ops.get("integer_kernel_count", 0), runner.ops.get("float_conv_matmul_left", 0)
        ran = "fp32" if not ints else "int8" if not floats else "int8+fp32"
        return ran, "executed ops " + ", ".join(f"{k} ×{v}" for k, v in sorted(runner.ops["executed"].items()))
    return "not read back", runner.precision


def _forms(target, threads: int, precision: str, tmp: Path) -> tuple[dict, str]:
    """Each form of `precision` through the target's runner: its rate and what executed it; and the runtime."""
    out, runtime = {}, ""
    for form, label in FORMS.items():
        path = tmp / f"{form}_{precision}.onnx"
        shape = peak_onnx(path, form, precision == "int8", N)
        runner = target.load_runner(Artifact(target.name, precision, [path], {"build": {"float_precision": "f32"}}),
                                    threads)
        ran, what = executed(runner)
        gmacs, ms = _rate(runner.run, shape, N)
        out[form] = {"form": label, "input": shape, "gmacs": round(gmacs, 1), "ms": round(ms, 2), "ran": ran,
                     "executed": what}
        if ran != precision:
            out[form]["reason"] = f"executed in {ran}, not {precision.upper()}: {what}"
        runtime = runner.runtime
        del runner
        path.unlink()
    return out, runtime


def runtime_peak(target, threads: int, log=print) -> dict:
    """`target`'s runner's peak on this CPU (cached per CPU profile, threads, the target's environment and this
    code): {"fp32"|"int8": {"gmacs": G MAC/s, "ms": ms per call, "form": the fastest form that ran in it},
    "forms": {precision: {form: {gmacs, ms, ran, executed, reason if not in the precision}}}, "absent": {precision:
    why it has no peak}, "gemm": what was measured (its name in result files from before the forms), "runtime",
    "threads"}."""
    key = key_of("peak", target.name, cpu_profile(), threads, target.describe_environment(), N, tuple(FORMS),
                 code_digest(__name__, target.module))

    def measure(tmp: Path) -> None:
        out: dict = {"threads": threads, "forms": {}, "absent": {},
                     "gemm": f"a {N}×{N}×{N} product as a GEMM and as a 1×1 convolution, the fastest that executed "
                             f"in the precision, {threads} threads"}
        for precision in ("fp32", "int8"):
            forms, out["runtime"] = _forms(target, threads, precision, tmp)
            out["forms"][precision] = forms
            ran = {f: r for f, r in forms.items() if r["ran"] == precision}
            if ran:
                best = ran[max(ran, key=lambda f: ran[f]["gmacs"])]
                out[precision] = {"gmacs": best["gmacs"], "ms": best["ms"], "form": best["form"]}
            else:
                out["absent"][precision] = f"no form executed in {precision.upper()}: " + "; ".join(
                    f"the {r['form']} {r['reason']}" for r in forms.values())
                log(f"{target.name}: no {precision.upper()} peak: {out['absent'][precision]}")
        (tmp / "peak.json").write_text(json.dumps(out))

    directory, _ = cached_dir("peak", key, measure, log=log)
    return json.loads((directory / "peak.json").read_text())


def fraction(macs: int, p50_ms: float, peak: dict, precision: str) -> dict | None:
    """A model's effective rate against the runtime's peak of the same precision (through the row's runtime), None
    where that precision was not measured. Where the peak is absent (no form ran in it), the rate with the reason;
    where the rate is above the peak, no fraction but "bad_peak": a peak a model beats is not a peak."""
    absent = peak.get("absent", {}).get(precision)
    if not p50_ms or (precision not in peak and not absent):
        return None
    gmacs = macs / (p50_ms / 1e3) / 1e9
    out = {"gmacs": round(gmacs, 1), "of": precision, "peak": peak["gemm"]}
    if absent:
        return {**out, "peak_gmacs": None, "fraction": None, "no_peak": absent}
    top = peak[precision]
    out.update(peak_gmacs=top["gmacs"], peak_form=top.get("form", "GEMM"))
    if gmacs > top["gmacs"]:
        return {**out, "fraction": None, "bad_peak": True}
    return {**out, "fraction": round(gmacs / top["gmacs"], 3)}
