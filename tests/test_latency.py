"""The latency harness: interleaved rounds, percentiles, throughput, and a device clock where a runner has one."""
import time

import numpy as np
import pytest

from convnext_deploy.pipeline.measure.latency import Budget, Spread, measure, ratio
from convnext_deploy.targets.base import Runner


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
    lat = measure({"a": a, "b": b}, batch=1, input_size=8, runs=20, warmup=0, rounds=4, budget=Budget(0.3, 1e-4))
    r = ratio(lat["a"], lat["b"], tolerance=1e-4)
    assert lat["a"].rounds > 4  # the budget bought more rounds than the minimum
    assert r.low < 1.0 < r.high and r.verdict.startswith("no clear difference") and not r.resolved
    assert "unresolved" in r.text()


def test_rounds_stop_once_every_ratio_is_resolved():
    rng = np.random.default_rng(3)
    a, b = clocked(10 + rng.normal(0, 0.1, 100_000)), clocked(5 + rng.normal(0, 0.05, 100_000))
    lat = measure({"a": a, "b": b}, batch=1, input_size=8, runs=20, warmup=0, rounds=4, budget=Budget(60, 0.05))
    assert lat["a"].rounds == 4 and ratio(lat["a"], lat["b"], tolerance=0.05).resolved


def test_rounds_of_a_disturbed_machine_are_counted_and_left_out():
    """Both runners slower together (the whole machine: a co-tenant) in rounds 3-5: those rounds are left out,
    and the figures are the undisturbed ones, not a mixture that depends on how long the disturbance lasted."""
    rounds, block = 10, 5
    def calls(base, slow):
        return [base * (slow if 3 <= i // (block + 1) <= 5 else 1.0) for i in range(rounds * (block + 1))]
    lat = measure({"fp32": clocked(calls(20.0, 1.22)), "int8": clocked(calls(10.0, 1.45))}, batch=1, input_size=8,
                  runs=rounds * block, warmup=0, rounds=rounds)
    assert lat["fp32"].disturbed_rounds == lat["int8"].disturbed_rounds == 3
    assert lat["fp32"].rounds == 7 and lat["fp32"].runs == 35
    assert lat["fp32"].p50_ms == pytest.approx(20.0) and lat["int8"].p99_ms == pytest.approx(10.0)
    assert ratio(lat["fp32"], lat["int8"]).value == pytest.approx(2.0)


def test_a_disturbance_starting_mid_round_leaves_out_the_whole_round():
    """The machine slows from round 3's int8 block to the end of round 5: round 3 is left out for fp32 too (half a
    round on a slowed machine pairs nothing fairly), so the p50s and their ratio come from the same rounds."""
    rounds, block = 10, 5

    def calls(base, slow, first):
        return [base * (slow if first <= i // (block + 1) <= 5 else 1.0) for i in range(rounds * (block + 1))]
    lat = measure({"fp32": clocked(calls(20.0, 1.22, 4)), "int8": clocked(calls(10.0, 1.45, 3))}, batch=1,
                  input_size=8, runs=rounds * block, warmup=0, rounds=rounds)
    assert lat["fp32"].disturbed_rounds == lat["int8"].disturbed_rounds == 3
    assert lat["fp32"].p99_ms == pytest.approx(20.0) and lat["int8"].p99_ms == pytest.approx(10.0)
    r = ratio(lat["fp32"], lat["int8"])
    assert r.rounds == 7 and r.value == pytest.approx(2.0) and r.low == pytest.approx(2.0)


def test_one_slow_runner_is_not_taken_for_a_disturbed_machine():
    """A round is disturbed only when most of its runners were slower: three runners, one 30 % slower in half the rounds."""
    def calls(base, slow):
        return [base * (slow if (i // 3) % 2 else 1.0) for i in range(40)]
    lat = measure({"a": clocked(calls(20.0, 1.0)), "b": clocked(calls(10.0, 1.3)), "c": clocked(calls(5.0, 1.0))},
                  batch=1, input_size=8, runs=20, warmup=0, rounds=10)
    assert lat["b"].disturbed_rounds == 0 and lat["b"].p99_ms == pytest.approx(13.0)


def test_rounds_are_spread_over_fresh_instances_and_the_interval_carries_their_spread():
    """Each load of the same artifact runs at its own speed (a compiled model's placement): the ratio's interval
    bootstraps over instances, so it is wider than a single instance's and covers the instances' ratios."""
    rng = np.random.default_rng(4)
    speeds = iter([1.0, 1.06, 0.96, 1.03, 0.98, 1.05])
    loads = []

    def load_int8():
        s = next(speeds)
        loads.append(s)
        return clocked(10 * s + rng.normal(0, 0.05, 10_000))

    ref = lambda: clocked(20 + rng.normal(0, 0.05, 10_000))  # noqa: E731
    lat = measure({"fp32": ref(), "int8": load_int8()}, batch=1, input_size=8, runs=40, warmup=1, rounds=8,
                  spread=Spread({"int8": load_int8}, 4))
    r = ratio(lat["fp32"], lat["int8"])
    assert len(loads) == 4 and lat["int8"].instances == 4 and r.instances == 4
    assert lat["int8"].rounds == 8 and sorted(set(lat["int8"].round_instance)) == [0, 1, 2, 3]
    per_instance = [2.0 / s for s in loads]
    assert r.low <= min(per_instance) * 1.01 and r.high >= max(per_instance) * 0.99  # spans the instances
    single = measure({"fp32": ref(), "int8": clocked(10 + rng.normal(0, 0.05, 10_000))}, batch=1, input_size=8,
                     runs=40, warmup=1, rounds=8)
    s = ratio(single["fp32"], single["int8"])
    assert (s.high - s.low) * 3 < r.high - r.low


def test_a_budget_adds_instances_until_the_ratio_is_resolved():
    rng = np.random.default_rng(5)
    speeds = iter([1.0, 1.2] + [1.0] * 50)
    loads = []

    def load():
        loads.append(1)
        return clocked(10 * next(speeds) + rng.normal(0, 0.05, 10_000))

    lat = measure({"fp32": clocked(20 + rng.normal(0, 0.05, 100_000)), "int8": load()}, batch=1, input_size=8,
                  runs=20, warmup=0, rounds=4, spread=Spread({"int8": load}, 2), budget=Budget(60, 0.05))
    r = ratio(lat["fp32"], lat["int8"], tolerance=0.05)
    assert lat["int8"].instances > 2 and len(loads) == lat["int8"].instances and r.resolved


def test_a_slow_model_takes_fewer_calls_a_round_so_its_minimum_fits_the_budget():
    from convnext_deploy.pipeline.measure.latency import MIN_BLOCK, fit_budget

    # 100 runs in 12 rounds over 3 loads of 5 runners at 0.5 s a call each: 9 calls a round would take 5 minutes
    block, rounds, loads = fit_budget(call_s=5 * 0.5, block=8, per_instance=4, instances=3, warmup=5, seconds=60)
    assert MIN_BLOCK <= block < 8 and rounds >= 2
    assert loads * (5 + rounds * (block + 1)) * 2.5 <= 60 or (block, rounds, loads) == (MIN_BLOCK, 2, 1)
    assert fit_budget(call_s=0.001, block=8, per_instance=4, instances=3, warmup=5, seconds=60) == (8, 4, 3)  # fits
    # ConvNeXt-XL at batch 8 (FP32 and INT8: 7.6 s a call): fewer loads before anything is measured past the budget
    assert fit_budget(call_s=7.6, block=3, per_instance=2, instances=3, warmup=2, seconds=60) == (MIN_BLOCK, 2, 1)
    assert fit_budget(call_s=1.0, block=3, per_instance=2, instances=3, warmup=2, seconds=60) == (MIN_BLOCK, 2, 3)
    assert fit_budget(call_s=2.5, block=3, per_instance=2, instances=3, warmup=2, seconds=60) == (MIN_BLOCK, 2, 2)


def test_the_budget_bounds_a_slow_runners_measurement_and_no_rounds_are_added_without_extend():
    t0 = time.monotonic()
    res = measure({"a": sleeper(30.0), "b": sleeper(30.0)}, batch=1, input_size=8, runs=100, warmup=1, rounds=6,
                  budget=Budget(2.0, extend=False))
    assert time.monotonic() - t0 < 4.0  # 100 calls each would take 6 s
    assert res["a"].rounds >= 2 and res["a"].block >= 3
