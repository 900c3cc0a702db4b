"""One latency harness for every target: warm-up, timed runs, percentiles and throughput.

A Runner with a device clock (`device_ms`, TensorRT: CUDA events around the engine) is timed by that clock
instead of the host's; a plain callable or any other Runner by the host's. Runners compared in one call are timed in interleaved rounds (A, B, A, B, …), so drift in machine load
hits all of them alike and their ratios are honest.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from targets.base import Runner


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


def _seconds_of(runner) -> Callable[[np.ndarray], float]:
    """One timed call: the device's own clock where the runner has one, else the host's around the call."""
    if isinstance(runner, Runner) and runner.device_ms is not None:
        return lambda x: runner.device_ms(x) / 1e3
    run = runner.run if isinstance(runner, Runner) else runner

    def host(x: np.ndarray) -> float:
        t0 = time.perf_counter()
        run(x)
        return time.perf_counter() - t0

    return host


def measure(runners: dict, *, batch: int, input_size: int, runs: int = 100, warmup: int = 10, rounds: int = 5,
            channels: int = 3, seed: int = 0) -> dict[str, Latency]:
    """`runners`: name → targets.base.Runner or a plain batch → logits callable."""
    x = np.random.default_rng(seed).standard_normal((batch, channels, input_size, input_size)).astype(np.float32)
    timers = {name: _seconds_of(r) for name, r in runners.items()}
    for timer in timers.values():
        for _ in range(warmup):
            timer(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, timer in timers.items():
            for _ in range(per_round):
                times[name].append(timer(x))
    out = {}
    for name, ts in times.items():
        ms = np.asarray(ts) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        out[name] = Latency(float(p50), float(p90), float(p99), float(ms.mean()), float(batch * 1e3 / p50),
                            batch, input_size, len(ms), warmup)
    return out
