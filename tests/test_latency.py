"""The latency harness: interleaved rounds, percentiles, throughput, and a device clock where a runner has one."""
import time

import numpy as np
import pytest

from pipeline.latency import measure, ratio
from targets.base import Runner


def sleeper(ms: float):
    def run(x: np.ndarray) -> np.ndarray:
        time.sleep(ms / 1e3)
        return np.zeros((len(x), 10), np.float32)

    return run


def test_percentiles_and_throughput_follow_the_timed_calls():
    res = measure({"slow": sleeper(8.0), "fast": sleeper(1.0)}, batch=4, input_size=32, runs=20, warmup=1)
    slow, fast = res["slow"], res["fast"]
    assert slow.runs == fast.runs == 20 and slow.batch == 4 and slow.input_size == 32
    assert 8.0 <= slow.p50_ms < 40 and 1.0 <= fast.p50_ms < slow.p50_ms  # sleep is a lower bound, never exact
    assert slow.p50_ms <= slow.p90_ms <= slow.p99_ms
    assert slow.images_per_s == pytest.approx(4 * 1e3 / slow.p50_ms)


def test_runners_are_interleaved_round_by_round():
    order = []

    def tag(name):
        def run(x):
            order.append(name)
            return x
        return run

    measure({"a": tag("a"), "b": tag("b")}, batch=1, input_size=8, runs=6, warmup=0, rounds=3)
    assert order == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # 1 re-warm + 2 timed


def test_a_device_clock_is_used_instead_of_the_host_clock():
    """TensorRT's runner returns the engine's CUDA-event time; host↔device copies must not count."""
    calls = []

    def device_ms(x: np.ndarray) -> float:
        calls.append(x.shape)
        time.sleep(0.002)  # host time that must not be what is reported
        return 0.5

    r = Runner(sleeper(0), "fake GPU", "gpu", "int8", 1, device_ms=device_ms)
    res = measure({"gpu": r}, batch=2, input_size=16, runs=5, warmup=1)
    assert res["gpu"].p50_ms == pytest.approx(0.5) and res["gpu"].p99_ms == pytest.approx(0.5)
    assert calls and all(s == (2, 3, 16, 16) for s in calls)


def test_a_runner_without_device_clock_is_timed_on_the_host():
    r = Runner(sleeper(3.0), "cpu runtime", "cpu", "fp32", 1)
    assert measure({"cpu": r}, batch=1, input_size=8, runs=5, warmup=0)["cpu"].p50_ms >= 3.0


def clocked(times_ms):
    """A runner whose device clock returns the given times, one per call: the harness's arithmetic, exactly."""
    it = iter(times_ms)
    return Runner(sleeper(0), "fake", "dev", "fp32", 1, device_ms=lambda x: next(it))


def test_ratio_interval_is_a_bootstrap_over_paired_rounds():
    rng = np.random.default_rng(1)
    slow = clocked(20 + rng.normal(0, 1, 10_000))
    fast = clocked(10 + rng.normal(0, 0.5, 10_000))
    lat = measure({"slow": slow, "fast": fast}, batch=1, input_size=8, runs=100, warmup=0, rounds=10)
    r = ratio(lat["slow"], lat["fast"])
    assert lat["slow"].rounds == 10 and lat["slow"].block == 10 and lat["slow"].runs == 100
    assert r.low <= r.value <= r.high and 1.8 < r.low and r.high < 2.2 and r.verdict == "faster"
    lo, hi = lat["fast"].p50_ci_ms
    assert lo <= lat["fast"].p50_ms <= hi


def test_equal_runners_are_no_clear_difference_and_a_budget_ends_unresolved():
    rng = np.random.default_rng(2)
    a, b = clocked(10 + rng.normal(0, 3, 100_000)), clocked(10 + rng.normal(0, 3, 100_000))
    lat = measure({"a": a, "b": b}, batch=1, input_size=8, runs=20, warmup=0, rounds=4, budget_s=0.3, tolerance=1e-4)
    r = ratio(lat["a"], lat["b"], tolerance=1e-4)
    assert lat["a"].rounds > 4  # the budget bought more rounds than the minimum
    assert r.low < 1.0 < r.high and r.verdict.startswith("no clear difference") and not r.resolved
    assert "unresolved" in r.text()


def test_rounds_stop_once_every_ratio_is_resolved():
    rng = np.random.default_rng(3)
    a, b = clocked(10 + rng.normal(0, 0.1, 100_000)), clocked(5 + rng.normal(0, 0.05, 100_000))
    lat = measure({"a": a, "b": b}, batch=1, input_size=8, runs=20, warmup=0, rounds=4, budget_s=60, tolerance=0.05)
    assert lat["a"].rounds == 4 and ratio(lat["a"], lat["b"], tolerance=0.05).resolved
