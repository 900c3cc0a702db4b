"""One latency harness for every target: warm-up, timed runs, percentiles and throughput.

A runner whose run function sets `last_gpu_ms` (TensorRT: CUDA events around the engine) is timed by that
device clock instead of the host's. Runners compared in one call are timed in interleaved rounds (A, B, A, B, …), so drift in machine load
hits all of them alike and their ratios are honest.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


@dataclass
class Latency:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float
    batch: int
    input_size: int
    runs: int
    warmup: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure(runners: dict[str, Callable[[np.ndarray], np.ndarray]], *, batch: int, input_size: int,
            runs: int = 100, warmup: int = 10, rounds: int = 5, channels: int = 3, seed: int = 0) -> dict[str, Latency]:
    x = np.random.default_rng(seed).standard_normal((batch, channels, input_size, input_size)).astype(np.float32)
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                run(x)
                elapsed = time.perf_counter() - t0
                # a GPU runner reports its device's own clock (CUDA events), without host↔device copies
                device_ms = getattr(run, "last_gpu_ms", None)
                times[name].append(elapsed if device_ms is None else device_ms / 1e3)
    out = {}
    for name, ts in times.items():
        ms = np.asarray(ts) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        out[name] = Latency(float(p50), float(p90), float(p99), float(ms.mean()), float(batch * 1e3 / p50),
                            batch, input_size, len(ms), warmup)
    return out
