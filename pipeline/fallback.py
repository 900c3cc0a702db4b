"""Accuracy-bounded mixed precision: return INT8 layers to float, most sensitive first, until the top-1 drop
on the labelled control split is within the bound, or the budget is spent.

Decisions are made on the control split only (held out of the evaluation side, disjoint from calibration
and evaluation); the deploy re-measures whatever this returns on the evaluation split. Layers go back in growing groups
(1, 2, 4, … of the ranking), so a target that needs k layers is rebuilt about log2(k) times, not k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from targets.base import Artifact, LabelledData, Runner, inference_batch


@dataclass
class FallbackConfig:
    max_drop_pp: float  # the gate's max_top1_drop_pp
    min_agreement: float | None = None  # the gate's min_agreement (top-1 agreement with the reference precision)
    max_float_layers: int = 8
    max_minutes: float = 30.0
    drop_bound: bool = True  # False: the control split is too small to bound the drop gate (see resolve_drop)


@dataclass
class FallbackResult:
    met: bool
    artifact: Artifact  # the candidate with the lowest control drop (the plain one if nothing helped)
    float_layers: list[str]
    rounds: list[dict] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict:
        return {"met": self.met, "float_layers": self.float_layers, "rounds": self.rounds, "message": self.message}


Z = 1.645  # one-sided 95 %: a decision taken on the control split must hold on the evaluation split too


@dataclass
class Judged:
    """One runner on the control split: its top-1, and against the reference precision its drop and agreement,
    each with the one-sided 95 % bound that decisions use (the point figures are what the report compares)."""

    top1: float
    drop_pp: float
    agreement: float
    preds: np.ndarray
    agreement_low: float = 1.0  # Wilson lower bound
    drop_high_pp: float = 0.0  # upper bound of the paired top-1 drop

    def figures(self) -> dict:
        return {"control_top1": self.top1, "control_drop_pp": self.drop_pp, "control_agreement": self.agreement,
                "control_drop_high_pp": self.drop_high_pp, "control_agreement_low": self.agreement_low}


def wilson_low(k: int, n: int, z: float = Z) -> float:
    """Wilson score lower bound of a proportion k/n: honest near 100 %, where the normal interval is not."""
    if n == 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - margin) / (1 + z * z / n))


def paired_drop_high(ref_correct: np.ndarray, test_correct: np.ndarray, z: float = Z) -> float:
    """Upper bound (pp) of the top-1 drop measured on the same images: only the discordant images carry it
    (b: the reference right and the test wrong, c: the reverse); drop = (b − c)/n with McNemar's variance, at
    least one discordant image's worth, so a sample with none still has a bound above zero."""
    n = len(ref_correct)
    b = int(np.sum(ref_correct & ~test_correct))
    c = int(np.sum(~ref_correct & test_correct))
    var = max(b + c, 1) - (b - c) ** 2 / n
    return float(((b - c) + z * np.sqrt(max(var, 0.0))) / n * 100.0)


def judge(runner: Runner, control: LabelledData, reference: Judged | None = None) -> Judged:
    """The one control-split comparison: every decision (recipe choice, fallback rounds, accuracy control) uses it."""
    batch = inference_batch(control.images.shape[-1])
    preds = np.concatenate([runner.run(control.images[i:i + batch]).argmax(1)
                            for i in range(0, len(control.images), batch)])
    top1 = float((preds == control.labels).mean())
    if reference is None:
        return Judged(top1, 0.0, 1.0, preds)
    agree = preds == reference.preds
    return Judged(top1, (reference.top1 - top1) * 100.0, float(agree.mean()), preds,
                  wilson_low(int(agree.sum()), len(agree)),
                  paired_drop_high(reference.preds == control.labels, preds == control.labels))


def control_size_needed(margin_pp: float, discordance: float = 0.005, z: float = Z) -> int:
    """Control images needed for the drop's bound to sit within `margin_pp` of the point figure at a given
    rate of images whose prediction INT8 changes: n ≥ z²·d / margin²."""
    return int(np.ceil(z * z * discordance / (margin_pp / 100.0) ** 2))


def misses(cfg: FallbackConfig, figures: dict) -> bool:
    """Held on the bounds, not the point figures: a control split of 1,000 images passed at 98.40 % agreement
    beside a 98 % gate, and the evaluation split then measured 97.87 %. Both gates are held: top-1 drop alone is
    the noisier statistic (a −0.2 pp control drop was measured beside a +0.66 pp evaluation drop)."""
    return score(cfg, figures) > 0


def resolve_drop(cfg: FallbackConfig, plain: dict) -> tuple[FallbackConfig, str | None]:
    """Whether the control split can bound the drop gate at all. Its 95 % half-width is z·√(discordant)/n: at 1,000
    images and 0.5–1 % of predictions flipped by INT8 that is ±0.25–0.5 pp: beside a 0.3 pp gate, held on the bound,
    only a drop under 0.05 pp would pass. Then the drop is decided on its point figure (the evaluation split, 9× larger,
    checks it again) and the report says so; agreement, the stable statistic, is always held on its bound."""
    half = plain["control_drop_high_pp"] - plain["control_drop_pp"]
    if half <= cfg.max_drop_pp / 2 or cfg.max_drop_pp <= 0:  # a drop of half the gate can then still be shown to
        return cfg, None  # pass; a gate of 0 pp allows no sampling error at all: held on the bound
    flipped = max(1.0 - plain["control_agreement"], 1e-3)
    need = control_size_needed(cfg.max_drop_pp / 2, flipped)
    note = (f"the control split bounds the top-1 drop only to ±{half:.2f} pp (95 %), more than half the "
            f"{cfg.max_drop_pp:g} pp gate: the drop is decided on its point figure, agreement on its 95 % bound; bounding the drop within half "
            f"the gate at {flipped * 100:.1f} % flipped predictions needs about {need:,} control images (--control)")
    return replace(cfg, drop_bound=False), note


def score(cfg: FallbackConfig, figures: dict) -> float:
    """How far the bounds (`Judged.figures()`) are from the gates (lower is better; ≤ 0 meets them), in pp."""
    gap = figures["control_drop_high_pp" if cfg.drop_bound else "control_drop_pp"] - cfg.max_drop_pp
    if cfg.min_agreement is not None:
        gap = max(gap, (cfg.min_agreement - figures["control_agreement_low"]) * 100.0)
    return gap


def search(build: Callable[[list[str]], tuple[Artifact, Runner]], ranking: list[str], control: LabelledData,
           reference: Judged, plain: tuple[Artifact, Runner], cfg: FallbackConfig, log=print) -> FallbackResult:
    """`build(layers)`: the INT8 artifact with those checkpoint layers in float, and its runner. `reference`: the
    target's reference precision judged on the control split; `plain`: the all-INT8 artifact and its runner."""
    start = time.monotonic()
    j = judge(plain[1], control, reference)
    rounds = [{"float_layers": 0, **j.figures(), "seconds": 0.0}]
    best = (score(cfg, j.figures()), plain[0], [], j.drop_pp)
    limit = min(cfg.max_float_layers, len(ranking))
    n = 0
    while misses(cfg, j.figures()):
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
        rounds.append({"float_layers": n, "layers": layers, **j.figures(), "seconds": time.monotonic() - t0})
        log(f"fallback: {n} layer(s) in float → control {figures_text(j)} ({bound_text(cfg)})")
        if score(cfg, j.figures()) < best[0]:
            best = (score(cfg, j.figures()), art, layers, j.drop_pp)
    layers = best[2]
    msg = (f"fallback met the bound on the control split with {len(layers)} layer(s) in float "
           f"({figures_text(j)}; {bound_text(cfg)})") if layers else \
        f"plain INT8 meets the bound on the control split ({figures_text(j)}; {bound_text(cfg)})"
    return FallbackResult(True, best[1], layers, rounds, msg)


def figures_text(j: Judged) -> str:
    return figures_text_of(j.figures())


def figures_text_of(f: dict) -> str:
    return (f"top-1 drop {f['control_drop_pp']:+.2f} pp (95 % bound {f['control_drop_high_pp']:+.2f}), agreement "
            f"{f['control_agreement'] * 100:.2f} % (95 % bound {f['control_agreement_low'] * 100:.2f} %)")


def bound_text(cfg: FallbackConfig) -> str:
    return f"bound: drop ≤ {cfg.max_drop_pp:g} pp" + (
        f", agreement ≥ {cfg.min_agreement * 100:g} %" if cfg.min_agreement is not None else "")
