"""The latency harness: interleaved rounds, percentiles, throughput, and a device clock where a runner has one."""
import time

import numpy as np
import pytest

from pipeline.latency import measure
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
    assert order == ["a", "a", "b", "b"] * 3


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
