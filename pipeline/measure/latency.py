"""One latency harness for every target: warm-up, timed runs, percentiles and throughput.

A Runner with a device clock (`device_ms`, TensorRT: CUDA events around the engine) is timed by that clock, any
other by the host's. Runners compared in one call are timed in interleaved rounds (A, B, A, B, …), so drift in
machine load hits all of them alike and their ratios are honest.

Each round times a block of consecutive calls of one runner after one untimed call that re-warms the caches the
other runners evicted (a deployed model runs warm; alternating on every call makes all as slow as the slowest).

What makes two runs of the same comparison disagree, and how it is met:
- A shared machine (a VM with a co-tenant) has disturbed stretches, seconds to a minute long, that slow every core
  at once (often with no steal time reported), some runners more than others, so a ratio measured then is off too.
  A runner's round more than `DISTURBED` slower than its usual round, next in time to another slow one, ran on a
  disturbed machine: the round is counted (`disturbed_rounds`) and left out of every figure of every runner, so
  p50s and their ratios come from the same rounds. One runner slow on its own (a slow load of it) is not a disturbed
  machine: its neighbours in time ran at their usual speed. A run disturbed from start to end cannot tell.
- Two freshly loaded instances of the same artifacts can give ratios apart by more than either's interval (a
  compiled model's placement in memory). Given a `Spread`, the rounds are spread over its loads, and intervals
  bootstrap over loads and then over the rounds within each (hierarchical), so they carry that spread as well.
A ratio's interval pairs the rounds; wider than `tolerance`, it is unresolved. With a time budget, rounds (or instances)
go on until every ratio is resolved, or the budget ends. A slow model's minimum measurement fits it (`fit_budget`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from convnext_deploy.pipeline.measure.memory import release_free_heap
from convnext_deploy.targets.base import Runner

DISTURBED = 0.10  # slower than the runner's usual round by this much, with a neighbour in time as slow: disturbed
BOOTSTRAP = 2000


@dataclass
class Latency:
    p50_ms: float  # percentiles, mean and throughput over the undisturbed rounds
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float
    batch: int
    input_size: int
    runs: int  # timed calls in the undisturbed rounds
    warmup: int
    rounds: int = 1  # undisturbed rounds (of this runner)
    block: int = 0  # timed calls in a row per round (after one untimed re-warm call)
    p50_ci_ms: tuple[float, float] | None = None  # 95 % bootstrap interval of the p50 (instances, then rounds)
    instances: int = 1  # independently loaded instances the rounds were spread over (all loads measured)
    disturbed_rounds: int = 0  # rounds left out: the whole machine was slower (see the module's note)
    round_ms: list[list[float]] = field(default_factory=list, repr=False)  # every round's calls (ratios pair them)
    round_instance: list[int] = field(default_factory=list, repr=False)  # which instance ran each round
    round_kept: list[bool] = field(default_factory=list, repr=False)  # whether the round was undisturbed

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("round_")}

    def rounds_data(self) -> dict:
        """The rounds as plain data (a cached measurement keeps them): what `ratio_of_rounds` pairs."""
        return {"ms": self.round_ms, "instance": self.round_instance, "kept": self.round_kept}


@dataclass(frozen=True)
class Budget:
    """More rounds, for up to `seconds`, until every ratio to the first runner is within ±`tolerance` (95 %);
    `extend=False`: no more rounds, the seconds only bound the minimum measurement."""

    seconds: float
    tolerance: float = 0.03
    extend: bool = True


@dataclass(frozen=True)
class Spread:
    """Spread the rounds over `instances` loads: `loaders` maps a runner's name to a loader of a fresh instance of
    it (the target's load_runner on its artifact); a runner without one keeps its instance."""

    loaders: dict[str, Callable[[], Runner]]
    instances: int = 3


@dataclass(frozen=True)
class Ratio:
    """p50(reference) / p50(other), with its 95 % bootstrap interval over paired rounds (and instances)."""

    value: float
    low: float
    high: float
    rounds: int
    resolved: bool  # the interval is within the tolerance the measurement aimed for
    instances: int = 1
    tolerance: float = 0.03

    @property
    def verdict(self) -> str:
        if self.low > 1.0:
            return "faster"
        if self.high < 1.0:
            return "slower"
        return "no clear difference (the interval spans 1×)"

    def text(self) -> str:
        return (f"{self.value:.2f}× [{self.low:.2f}, {self.high:.2f}]"
                + ("" if self.resolved else f" (unresolved: wider than ±{self.tolerance * 100:g} %)"))

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "rounds": self.rounds,
                "instances": self.instances, "resolved": self.resolved, "verdict": self.verdict}


def ratio(reference: Latency, other: Latency, tolerance: float = 0.03, seed: int = 0) -> Ratio:
    """How many times faster `other` is than `reference`, from the same interleaved measurement."""
    return ratio_of_rounds(reference.rounds_data(), other.rounds_data(), tolerance, seed)


def ratio_of_rounds(reference: dict, other: dict, tolerance: float = 0.03, seed: int = 0) -> Ratio:
    """`ratio` on `Latency.rounds_data()` of both, e.g. as a cached measurement kept them: the rounds where
    neither was disturbed (`undisturbed` keeps at least two)."""
    n = len(reference["ms"])
    if len(other["ms"]) != n:
        return _paired(np.asarray(reference["ms"]), np.asarray(other["ms"]), tolerance, seed, None)
    both = np.asarray(reference.get("kept") or [True] * n) & np.asarray(other.get("kept") or [True] * n)
    instances = np.asarray(reference.get("instance") or np.zeros(n, int))[both]
    return _paired(np.asarray(reference["ms"])[both], np.asarray(other["ms"])[both], tolerance, seed, instances)


def _paired(a: np.ndarray, b: np.ndarray, tolerance: float, seed: int, instances) -> Ratio:
    value = float(np.median(a) / np.median(b))
    groups = _groups(instances, len(a))
    if len(a) < 2 or len(a) != len(b):
        return Ratio(value, value, value, len(a), False, len(groups), tolerance)
    idx = _resample(groups, seed)
    boot = _resampled_p50(a, idx) / _resampled_p50(b, idx)
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return Ratio(value, low, high, len(a), (high - low) / 2 <= tolerance * value, len(groups), tolerance)


def _groups(instances, n: int) -> list[np.ndarray]:
    """Round indices per instance (one instance when not given)."""
    if instances is None or len(instances) != n:
        return [np.arange(n)]
    ids = np.asarray(instances)
    return [np.flatnonzero(ids == g) for g in np.unique(ids)]


def _resample(groups: list[np.ndarray], seed: int) -> np.ndarray:
    """Hierarchical bootstrap indices (resamples × slots, -1 = empty slot): instances drawn with replacement, then
    rounds with replacement within each drawn instance. One instance: the plain bootstrap over rounds."""
    rng = np.random.default_rng(seed)
    slots = len(groups)
    width = max(len(g) for g in groups)
    within = np.full((len(groups), BOOTSTRAP, slots, width), -1)
    for i, g in enumerate(groups):
        within[i, ..., :len(g)] = g[rng.integers(0, len(g), (BOOTSTRAP, slots, len(g)))]
    chosen = rng.integers(0, len(groups), (BOOTSTRAP, slots))
    return within[chosen, np.arange(BOOTSTRAP)[:, None], np.arange(slots)].reshape(BOOTSTRAP, -1)


def _resampled_p50(rounds: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The p50 of every bootstrap resample of whole rounds (rounds: R × block, idx: resamples × slots, -1 empty)."""
    calls = rounds[np.maximum(idx, 0)].astype(float)  # resamples × slots × block
    if not (idx < 0).any():
        return np.median(calls.reshape(len(idx), -1), axis=1)
    calls[idx < 0] = np.nan  # sorted last: each row's median sits in its first n values
    calls = np.sort(calls.reshape(len(idx), -1), axis=1)
    n, row = (idx >= 0).sum(axis=1) * rounds.shape[1], np.arange(len(idx))
    return (calls[row, (n - 1) // 2] + calls[row, n // 2]) / 2


def _ci(rounds: np.ndarray, instances=None, seed: int = 0) -> tuple[float, float]:
    idx = _resample(_groups(instances, len(rounds)), seed)
    return tuple(float(v) for v in np.percentile(_resampled_p50(rounds, idx), [2.5, 97.5]))


def undisturbed(times: dict[str, list[list[float]]]) -> np.ndarray:
    """Which rounds ran on an undisturbed machine (every runner of the round did). A runner's round is slow when its
    p50 is more than `DISTURBED` above the runner's usual (lower-quartile) round and further than its own
    round-to-round noise can explain (4 σ, from successive rounds' differences, which a few state changes do not
    move); it is disturbed when the measurement next to it in time (the previous or next runner of the round, across
    round boundaries) was slow too: the whole machine slowed for a while. A load of one runner that is slow by
    itself is not marked: its neighbours ran at their usual speed. Fewer than two undisturbed rounds: all are kept."""
    names = list(times)
    p50 = np.stack([np.median(np.asarray(times[k]), axis=1) for k in names], axis=1)  # rounds × runners, time order
    usual = np.quantile(p50, 0.25, axis=0)
    noise = 1.4826 * np.median(np.abs(np.diff(p50, axis=0)), axis=0) / np.sqrt(2) if len(p50) > 1 else 0.0
    slow = ((p50 > usual * (1 + DISTURBED)) & (p50 - usual > 4 * noise)).ravel()
    disturbed = (slow & (np.r_[False, slow[:-1]] | np.r_[slow[1:], False])).reshape(p50.shape)
    keep = ~disturbed.any(axis=1)  # a round half run on a slowed machine pairs nothing fairly
    return keep if keep.sum() >= 2 else np.ones(len(p50), bool)


def _seconds_of(runner) -> Callable[[np.ndarray], float]:
    """One timed call: the device's own clock where the runner has one, else the host's around the call."""
    if isinstance(runner, Runner) and runner.device_ms is not None:
        return lambda x: runner.device_ms(x) / 1e3
    run, own_input = (runner.run if isinstance(runner, Runner) else runner), (lambda x: x)
    if isinstance(runner, Runner) and runner.feed is not None:  # timed on its own input, converted once per batch
        fed: list = [None, None]  # the batch (held, so its id is never reused) and its conversion

        def own_input(x: np.ndarray):
            if fed[0] is not x:
                fed[:] = [x, runner.feed(x)]
            return fed[1]

        run = runner.native

    def host(x: np.ndarray) -> float:
        y = own_input(x)
        t0 = time.perf_counter()
        run(y)
        return time.perf_counter() - t0

    return host


def measure(runners: dict, *, batch: int, input_size: int, runs: int = 100, warmup: int = 10, rounds: int = 5,
            budget: Budget | None = None, spread: Spread | None = None) -> dict[str, Latency]:
    """`runners`: name → targets.base.Runner or a plain batch → logits callable. `runs` timed calls per runner in
    `rounds` rounds; a `budget` adds rounds (with `spread`: instances) until every ratio to the first runner is
    resolved. With `spread`, the rounds are spread over its instances (the first is `runners`; a runner given as
    None is loaded from its loader for the first instance too, so that no instance outlives its rounds)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size)).astype(np.float32)
    instances = spread.instances if spread is not None and spread.loaders else 1
    per_instance = -(-rounds // instances)
    block = max(1, runs // rounds)
    times: dict[str, list[list[float]]] = {k: [] for k in runners}
    instance_of: list[int] = []
    t0 = time.monotonic()
    first = {k: spread.loaders[k]() if r is None else r for k, r in runners.items()}  # None: loaded here
    instance, (timers, call_s) = 0, _warmed(first, x, warmup)
    del first  # released with its instance
    if budget is not None:  # fewer calls for a slow model, so that its minimum measurement fits the seconds
        block, per_instance, instances = fit_budget(call_s, block, per_instance, instances, warmup, budget.seconds)
    while True:
        for name, timer in timers.items():
            if len(timers) > 1:
                timer(x)  # re-warm: the other runners of the round evicted this one's caches
            times[name].append([timer(x) for _ in range(block)])
        instance_of.append(instance)
        if instances > 1 and len(instance_of) % per_instance:
            continue  # an instance's rounds are measured in full before anything is decided
        done = len(instance_of) >= per_instance * instances
        if done and budget is not None and budget.extend and time.monotonic() - t0 < budget.seconds \
                and len(timers) > 1:
            keep, ids = undisturbed(times).tolist(), list(instance_of)
            data = [{"ms": t, "instance": ids, "kept": keep} for t in times.values()]
            done = all(ratio_of_rounds(data[0], d, budget.tolerance).resolved for d in data[1:])
        if done:
            return _latencies(times, instance_of, batch, input_size, warmup, block)
        if instances > 1:
            instance += 1
            timers = None  # the previous instance is released before the next is loaded
            release_free_heap()
            timers, _ = _warmed({k: spread.loaders[k]() if k in spread.loaders else r for k, r in runners.items()},
                                x, warmup)


MIN_BLOCK, MIN_ROUNDS = 3, 2  # the fewest timed calls a round and rounds an instance keep: a p50 and a pairing


def fit_budget(call_s: float, block: int, per_instance: int, instances: int, warmup: int, seconds: float):
    """(calls per round, rounds per instance, loads) fitting `seconds`, one call of every runner taking `call_s`, in
    that order (ConvNeXt-XL at batch 8: three loads' minimum took 4 minutes of a 60 s budget)."""
    def cost(b: int, r: int) -> float:
        return instances * (warmup + r * (b + 1)) * call_s

    while block > MIN_BLOCK and cost(block, per_instance) > seconds:
        block = max(MIN_BLOCK, int(block * seconds / cost(block, per_instance)))
    while per_instance > MIN_ROUNDS and cost(block, per_instance) > seconds:
        per_instance -= 1
    while instances > 1 and cost(block, per_instance) > seconds:
        instances -= 1
    return block, per_instance, instances


def _warmed(runners: dict, x: np.ndarray, warmup: int) -> tuple[dict, float]:
    """(the runners' timers, warm; the seconds of one call of each, summed: 0 without warm-up)."""
    timers = {name: _seconds_of(r) for name, r in runners.items()}
    last = {}
    for name, timer in timers.items():
        for _ in range(warmup):
            last[name] = timer(x)
    return timers, sum(last.values())


def _latencies(times: dict, instance_of: list[int], batch: int, input_size: int, warmup: int,
               block: int) -> dict[str, Latency]:
    keep = undisturbed(times)
    out = {}
    for name, per_round in times.items():
        ms, ids = np.asarray(per_round)[keep] * 1e3, np.asarray(instance_of)[keep]
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        out[name] = Latency(float(p50), float(p90), float(p99), float(ms.mean()), float(batch * 1e3 / p50),
                            batch, input_size, ms.size, warmup, len(ms), block, _ci(ms, ids),
                            len(set(instance_of)), int((~keep).sum()), (np.asarray(per_round) * 1e3).tolist(),
                            list(instance_of), keep.tolist())
    return out
