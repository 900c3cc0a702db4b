"""Accuracy-bounded mixed precision: return INT8 layers to float, most sensitive first, until the top-1 drop
on the labelled control split is within the bound, or the budget is spent.

Decisions are made on the control split only (held out of the evaluation side, disjoint from calibration
and evaluation); the deploy re-measures whatever this returns on the evaluation split. Layers go back in growing groups
(1, 2, 4, … of the ranking), so a target that needs k layers is rebuilt about log2(k) times, not k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from targets.base import Artifact, LabelledData, Runner


@dataclass
class FallbackConfig:
    max_drop_pp: float  # the gate's max_top1_drop_pp
    min_agreement: float | None = None  # the gate's min_agreement (top-1 agreement with the reference precision)
    max_float_layers: int = 8
    max_minutes: float = 30.0


@dataclass
class FallbackResult:
    met: bool
    artifact: Artifact  # the candidate with the lowest control drop (the plain one if nothing helped)
    float_layers: list[str]
    rounds: list[dict] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict:
        return {"met": self.met, "float_layers": self.float_layers, "rounds": self.rounds, "message": self.message}


@dataclass
class Judged:
    """One runner on the control split: its top-1, and against the reference precision its drop and agreement."""

    top1: float
    drop_pp: float
    agreement: float
    preds: np.ndarray

    def figures(self) -> dict:
        return {"control_top1": self.top1, "control_drop_pp": self.drop_pp, "control_agreement": self.agreement}


def judge(runner: Runner, control: LabelledData, reference: Judged | None = None, batch: int = 100) -> Judged:
    """The one control-split comparison: every decision (fallback rounds, accuracy control, plain INT8) uses it."""
    preds = np.concatenate([runner.run(control.images[i:i + batch]).argmax(1)
                            for i in range(0, len(control.images), batch)])
    top1 = float((preds == control.labels).mean())
    if reference is None:
        return Judged(top1, 0.0, 1.0, preds)
    return Judged(top1, (reference.top1 - top1) * 100.0, float((preds == reference.preds).mean()), preds)


def misses(cfg: FallbackConfig, drop_pp: float, agreement: float) -> bool:
    """Top-1 drop alone is a noisy statistic on a thousand images (a −0.2 pp control drop was measured beside a
    +0.66 pp evaluation drop); agreement with the reference is the stable one, so both gates are held."""
    return drop_pp > cfg.max_drop_pp or (cfg.min_agreement is not None and agreement < cfg.min_agreement)


def score(cfg: FallbackConfig, drop_pp: float, agreement: float) -> float:
    """How far from the bound (lower is better; ≤ 0 meets it), in pp."""
    gap = drop_pp - cfg.max_drop_pp
    if cfg.min_agreement is not None:
        gap = max(gap, (cfg.min_agreement - agreement) * 100.0)
    return gap


def search(build: Callable[[list[str]], tuple[Artifact, Runner]], ranking: list[str], control: LabelledData,
           reference: Judged, plain: tuple[Artifact, Runner], cfg: FallbackConfig, log=print) -> FallbackResult:
    """`build(layers)`: the INT8 artifact with those checkpoint layers in float, and its runner. `reference`: the
    target's reference precision judged on the control split; `plain`: the all-INT8 artifact and its runner."""
    start = time.monotonic()
    first = judge(plain[1], control, reference)
    drop, agree = first.drop_pp, first.agreement
    rounds = [{"float_layers": 0, **first.figures(), "seconds": 0.0}]
    best = (score(cfg, drop, agree), plain[0], [], drop)
    limit = min(cfg.max_float_layers, len(ranking))
    n = 0
    while misses(cfg, drop, agree):
        elapsed = (time.monotonic() - start) / 60.0
        if n >= limit or elapsed >= cfg.max_minutes:
            spent = (f"{n} layers in float (budget --fallback-max-layers {cfg.max_float_layers})" if n >= limit
                     else f"{elapsed:.1f} min (budget --fallback-max-minutes {cfg.max_minutes:g})")
            msg = (f"fallback stopped at the budget: top-1 drop {best[3]:+.2f} pp on the control split after {spent} "
                   f"misses the bound ({bound_text(cfg)}); keeping the best candidate ({len(best[2])} layers in float). "
                   "Raise the budget, relax the gate, or deploy the reference precision")
            log(msg)
            return FallbackResult(False, best[1], best[2], rounds, msg)
        n = min(max(1, 2 * n), limit)
        layers = ranking[:n]
        t0 = time.monotonic()
        art, runner = build(layers)
        j = judge(runner, control, reference)
        drop, agree = j.drop_pp, j.agreement
        rounds.append({"float_layers": n, "layers": layers, **j.figures(), "seconds": time.monotonic() - t0})
        log(f"fallback: {n} layer(s) in float → control top-1 drop {drop:+.2f} pp, agreement {agree * 100:.2f} % "
            f"({bound_text(cfg)})")
        if score(cfg, drop, agree) < best[0]:
            best = (score(cfg, drop, agree), art, layers, drop)
    layers = best[2]
    msg = (f"fallback met the bound on the control split with {len(layers)} layer(s) in float "
           f"(drop {drop:+.2f} pp, agreement {agree * 100:.2f} %; {bound_text(cfg)})") if layers else \
        f"plain INT8 meets the bound on the control split (drop {drop:+.2f} pp; {bound_text(cfg)})"
    return FallbackResult(True, best[1], layers, rounds, msg)


def bound_text(cfg: FallbackConfig) -> str:
    return f"bound: drop ≤ {cfg.max_drop_pp:g} pp" + (
        f", agreement ≥ {cfg.min_agreement * 100:g} %" if cfg.min_agreement is not None else "")
