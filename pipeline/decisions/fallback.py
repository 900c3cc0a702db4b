"""Accuracy-bounded mixed precision: return INT8 layers to float, most sensitive first, until the candidate meets
the accuracy gates on the labelled control split (pipeline.decisions.judge: counts, bounds, more evidence at a boundary), or
the budget is spent, or floating more layers stops helping.

Decisions are made on the control split only (held out of the evaluation side, disjoint from calibration
and evaluation); the deploy re-measures whatever this returns on the evaluation split. Layers go back in growing groups
(1, 2, 4, … of the ranking), so a target that needs k layers is rebuilt about log2(k) times, not k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from convnext_deploy.pipeline.decisions.judge import AccuracyGates, Assessment, Evidence, assess, figures_text
from convnext_deploy.targets.base import Artifact, Runner


@dataclass
class FallbackConfig:
    gates: AccuracyGates
    max_float_layers: int = 8
    max_minutes: float = 30.0
    stall_rounds: int = 2  # rebuilds in a row that bring the figures no closer to the gates: the search stops
    started: float | None = None  # time.monotonic() when the fallback began (its ranking counts); None: at search


@dataclass
class FallbackResult:
    met: bool
    artifact: Artifact  # the candidate closest to the gates (the plain one if nothing helped)
    runner: Runner
    float_layers: list[str]
    assessment: Assessment  # of that candidate
    rounds: list[dict] = field(default_factory=list)
    message: str = ""
    stopped: str = ""  # "", "budget" or "no progress"

    def to_dict(self) -> dict:
        return {"met": self.met, "float_layers": self.float_layers, "rounds": self.rounds, "message": self.message,
                "stopped": self.stopped}


def search(build: Callable[[list[str]], tuple[Artifact, Runner]], ranking: list[str], evidence: Evidence,
           plain: tuple[Artifact, Runner], cfg: FallbackConfig, log=print) -> FallbackResult:
    """`build(layers)`: the INT8 artifact with those checkpoint layers in float, and its runner. `plain`: the
    all-INT8 artifact and its runner, judged on `evidence` against the reference precision."""
    start = cfg.started if cfg.started is not None else time.monotonic()
    a = assess(plain[1], evidence, cfg.gates)
    rounds = [{"float_layers": 0, **_round(a), "seconds": 0.0}]
    best = (a.score, plain[0], plain[1], [], a)
    limit = min(cfg.max_float_layers, len(ranking))
    n, stalled = 0, 0
    while not a.passed:
        elapsed = (time.monotonic() - start) / 60.0
        stop = ("budget", f"{n} layers in float (budget --fallback-max-layers {cfg.max_float_layers})") if n >= limit \
            else ("budget", f"{elapsed:.1f} min (budget --fallback-max-minutes {cfg.max_minutes:g}, the ranking "
                            "included)") \
            if elapsed >= cfg.max_minutes else ("no progress", f"{n} layers in float, {stalled} rebuilds in a row "
                                                "that brought the figures no closer to the gates") \
            if stalled >= cfg.stall_rounds else None
        if stop:
            msg = (f"fallback stopped ({stop[0]}) after {stop[1]}: the closest candidate, {len(best[3])} layers in float, "
                   f"still misses the accuracy gates on the control split ({figures_text(best[4].judged)}; "
                   f"{cfg.gates.text()})" + (". The INT8 error is not in a few layers: floating the most sensitive "
                                             "ones does not move it" if stop[0] == "no progress" else ""))
            log(msg)
            return FallbackResult(False, best[1], best[2], best[3], best[4], rounds, msg, stop[0])
        n = min(max(1, 2 * n), limit)
        layers = ranking[:n]
        t0 = time.monotonic()
        art, runner = build(layers)
        a = assess(runner, evidence, cfg.gates)
        rounds.append({"float_layers": n, "layers": layers, **_round(a), "seconds": time.monotonic() - t0})
        log(f"fallback: {n} layer(s) in float → control {figures_text(a.judged)}: {a.text()}")
        stalled = 0 if a.score < best[0] else stalled + 1
        if a.score < best[0] or a.passed:
            best = (a.score, art, runner, layers, a)
    layers = best[3]
    msg = (f"fallback met the accuracy gates on the control split with {len(layers)} layer(s) in float "
           f"({figures_text(a.judged)}; {a.rule})") if layers else \
        f"plain INT8 meets the accuracy gates on the control split ({figures_text(a.judged)}; {a.rule})"
    return FallbackResult(True, best[1], best[2], layers, best[4], rounds, msg)


def _round(a: Assessment) -> dict:
    return {**a.judged.figures(), "passed": a.passed, "rule": a.rule, "score": a.score}
