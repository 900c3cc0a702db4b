"""One latency harness for every target: warm-up, timed runs, percentiles and throughput.

A Runner with a device clock (`device_ms`, TensorRT: CUDA events around the engine) is timed by that clock
instead of the host's; a plain callable or any other Runner by the host's. Runners compared in one call are timed in interleaved rounds (A, B, A, B, …), so drift in machine load
hits all of them alike and their ratios are honest.

Each round times a block of consecutive calls of one runner after one untimed call: a deployed model runs warm,
call after call, and the untimed call re-warms the caches the other runners of the round evicted (alternating
runners on every call made every ConvNeXt-T file as slow as FP32 on an Intel Xeon: issue 15). A ratio's interval
is a bootstrap over the paired rounds (the same round's machine state hits both); with a time budget, rounds go
on until every ratio's 95 % interval is within `tolerance` of it, or the budget ends and it is reported unresolved.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
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
    rounds: int = 1
    block: int = 0  # timed calls in a row per round (after one untimed re-warm call)
    p50_ci_ms: tuple[float, float] | None = None  # 95 % bootstrap interval of the p50 over rounds
    round_ms: list[list[float]] = field(default_factory=list, repr=False)  # each round's timed calls (ratios pair them)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("round_ms")
        return d


@dataclass(frozen=True)
class Ratio:
    """p50(reference) / p50(other), with its 95 % bootstrap interval over paired rounds."""

    value: float
    low: float
    high: float
    rounds: int
    resolved: bool  # the interval is within the tolerance the measurement aimed for

    @property
    def verdict(self) -> str:
        if self.low > 1.0:
            return "faster"
        if self.high < 1.0:
            return "slower"
        return "no clear difference (the interval spans 1×)"

    def text(self) -> str:
        return (f"{self.value:.2f}× [{self.low:.2f}, {self.high:.2f}]"
                + ("" if self.resolved else " (unresolved: the time budget ended first)"))

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "rounds": self.rounds, "resolved": self.resolved,
                "verdict": self.verdict}


BOOTSTRAP = 2000


def ratio(reference: Latency, other: Latency, tolerance: float = 0.03, seed: int = 0) -> Ratio:
    """How many times faster `other` is than `reference`, from the same interleaved measurement."""
    return ratio_of_rounds(reference.round_ms, other.round_ms, tolerance, seed)


def ratio_of_rounds(reference_ms, other_ms, tolerance: float = 0.03, seed: int = 0) -> Ratio:
    """`ratio` on the rounds themselves (round × call, ms), e.g. as a cached measurement kept them."""
    a, b = np.asarray(reference_ms), np.asarray(other_ms)
    value = float(np.median(a) / np.median(b))
    if len(a) < 2 or len(a) != len(b):
        return Ratio(value, value, value, len(a), False)
    idx = np.random.default_rng(seed).integers(0, len(a), (BOOTSTRAP, len(a)))
    boot = _resampled_p50(a, idx) / _resampled_p50(b, idx)
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return Ratio(value, low, high, len(a), (high - low) / 2 <= tolerance * value)


def _resampled_p50(rounds: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The p50 of every bootstrap resample of whole rounds (rounds: R × block, idx: resamples × R)."""
    return np.median(rounds[idx].reshape(len(idx), -1), axis=1)


def _ci(rounds: np.ndarray, seed: int = 0) -> tuple[float, float]:
    idx = np.random.default_rng(seed).integers(0, len(rounds), (BOOTSTRAP, len(rounds)))
    return tuple(float(v) for v in np.percentile(_resampled_p50(rounds, idx), [2.5, 97.5]))


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
            budget_s: float | None = None, tolerance: float = 0.03) -> dict[str, Latency]:
    """`runners`: name → targets.base.Runner or a plain batch → logits callable. `runs` timed calls per runner in
    `rounds` rounds; with `budget_s`, more rounds until every ratio to the first runner is within `tolerance`."""
    x = np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size)).astype(np.float32)
    timers = {name: _seconds_of(r) for name, r in runners.items()}
    for timer in timers.values():
        for _ in range(warmup):
            timer(x)
    block = max(1, runs // rounds)
    times: dict[str, list[list[float]]] = {k: [] for k in runners}
    t0 = time.monotonic()
    while True:
        for name, timer in timers.items():
            if len(timers) > 1:
                timer(x)  # re-warm: the other runners of the round evicted this one's caches
            times[name].append([timer(x) for _ in range(block)])
        done = len(times[name]) >= rounds
        if done and budget_s is not None and time.monotonic() - t0 < budget_s and len(timers) > 1:
            first, *others = times.values()  # the ratios only: the per-runner intervals are not needed yet
            done = all(ratio_of_rounds(first, o, tolerance).resolved for o in others)
        if done:
            return _latencies(times, batch, input_size, warmup, block)


def _latencies(times: dict, batch: int, input_size: int, warmup: int, block: int) -> dict[str, Latency]:
    out = {}
    for name, per_round in times.items():
        ms = np.asarray(per_round) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        out[name] = Latency(float(p50), float(p90), float(p99), float(ms.mean()), float(batch * 1e3 / p50),
                            batch, input_size, ms.size, warmup, len(ms), block, _ci(ms), ms.tolist())
    return out
