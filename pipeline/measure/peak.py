"""How far a model runs from what its runtime can do on this CPU: the runtime's own peak, measured, and a model's
effective MAC rate as a fraction of it.

The peak is a large square matrix product (2048³) run through the target's own runner, as an ONNX graph the
runtime reads like any artifact: FP32 `MatMul`, and INT8 as `QuantizeLinear` → `DequantizeLinear` → `MatMul` with
a per-tensor u8 activation and s8 weight (the U8S8 GEMM both ONNX Runtime and OpenVINO run ConvNeXt's pointwise
layers with). A GEMM this size is compute-bound, so its rate is what the runtime's kernels reach on these cores
and threads; a model's rate (its multiply-accumulates at batch 1 over its p50) can only come near it where its
time goes into such GEMMs. Measured once per CPU profile, thread count, runtime version and code (cached).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from convnext_deploy.pipeline.core.cache import cached_dir, code_digest, key_of
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.targets.base import Artifact, gemm_onnx

N = 2048  # M = K = N: 8.6 G multiply-accumulates a call, compute-bound on any CPU here
CALLS, BLOCKS = 5, 5  # per block; the median call of the fastest block (a peak, not a typical figure)


def model_macs(model: torch.nn.Module, size: int) -> int:
    """Multiply-accumulates of one image at `size` px: every Conv2d and Linear (what runs as GEMM or convolution)."""
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


def _rate(run, n: int) -> tuple[float, float]:
    """(G multiply-accumulates per second, ms of the median call) of the fastest block."""
    x = np.random.default_rng(1).random((n, n), dtype=np.float32)
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


def runtime_peak(target, threads: int, log=print) -> dict:
    """{"fp32"|"int8": {"gmacs": G MAC/s, "ms": ms per call, "n": n}, "runtime": ..., "threads": ...} of `target`'s
    runner on this CPU (cached per CPU profile, threads, the target's environment and this code)."""
    key = key_of("peak", target.name, cpu_profile(), threads, target.describe_environment(), N,
                 code_digest(__name__, target.module))

    def measure(tmp: Path) -> None:
        out: dict = {"threads": threads, "gemm": f"a {N}×{N}×{N} GEMM, {threads} threads"}
        for precision in ("fp32", "int8"):
            path = tmp / f"gemm_{precision}.onnx"
            gemm_onnx(path, precision == "int8", N)
            runner = target.load_runner(Artifact(target.name, precision, [path], {"build": {"float_precision": "f32"}}),
                                        threads)
            gmacs, ms = _rate(runner.run, N)
            out[precision] = {"gmacs": round(gmacs, 1), "ms": round(ms, 2)}
            out["runtime"] = runner.runtime
            path.unlink()
        (tmp / "peak.json").write_text(json.dumps(out))

    directory, _ = cached_dir("peak", key, measure, log=log)
    return json.loads((directory / "peak.json").read_text())


def fraction(macs: int, p50_ms: float, peak: dict, precision: str) -> dict | None:
    """A model's effective rate against the runtime's peak of the same precision (None where none was measured)."""
    if precision not in peak or not p50_ms:
        return None
    gmacs = macs / (p50_ms / 1e3) / 1e9
    return {"gmacs": round(gmacs, 1), "of": precision, "peak_gmacs": peak[precision]["gmacs"],
            "fraction": round(gmacs / peak[precision]["gmacs"], 3), "peak": peak["gemm"]}  # through the row's runtime
