"""Accuracy decisions on the labelled control split, taken in counts of images.

A gate in percent is an allowance in images: on 1,000 images a 0.3 pp drop gate allows 3 images and 3 passes
(`gates.drop_allowance`), never a float comparison of 0.30000000000000027 with 0.3. Each gate of a candidate is
read three ways: its pessimistic one-sided 95 % bound meets the gate (pass), its optimistic bound misses it
(fail), or the gate lies within the split's sampling noise (boundary). A boundary is not a coin flip: the
decision asks for more evidence, a larger control split drawn from images in neither the calibration nor the
evaluation split, and only where none is left (or it still straddles) do the exact counts decide, a rule the
record names.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from convnext_deploy.pipeline.core.gate_file import agreement_needed, drop_allowance
from convnext_deploy.targets.base import LabelledData, Runner, inference_batch

Z = 1.645  # one-sided 95 %: a decision taken on the control split must hold on the evaluation split too


def wilson(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n: honest near 100 %, where the normal interval is not."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - margin) / (1 + z * z / n)), float((centre + margin) / (1 + z * z / n))


def paired_drop_interval(worse: int, better: int, n: int, z: float = Z) -> tuple[float, float]:
    """(low, high) of the top-1 drop in pp measured on the same images: only the discordant images carry it
    (worse: the reference right and the candidate wrong; better: the reverse); McNemar's variance, at least one
    discordant image's worth, so a sample with none still has a bound on either side."""
    var = max(worse + better, 1) - (worse - better) ** 2 / n
    half = z * np.sqrt(max(var, 0.0))
    return float((worse - better - half) / n * 100.0), float((worse - better + half) / n * 100.0)


@dataclass
class Judged:
    """One runner on a control split, in counts: against the reference precision, how many images it gets right
    and wrong that the reference did not, and how many top-1 predictions it shares."""

    preds: np.ndarray
    n: int
    correct: int
    ref_correct: int | None = None  # None: this is the reference
    agree: int = 0
    worse: int = 0  # the reference right, this one wrong
    better: int = 0  # the reverse

    @property
    def top1(self) -> float:
        return self.correct / self.n

    @property
    def drop_images(self) -> int:
        return 0 if self.ref_correct is None else self.ref_correct - self.correct

    @property
    def drop_pp(self) -> float:
        return self.drop_images / self.n * 100.0

    @property
    def agreement(self) -> float:
        return 1.0 if self.ref_correct is None else self.agree / self.n

    def figures(self) -> dict:
        drop_low, drop_high = paired_drop_interval(self.worse, self.better, self.n)
        agree_low, agree_high = wilson(self.agree, self.n) if self.ref_correct is not None else (1.0, 1.0)
        return {"control_n": self.n, "control_top1": self.top1, "control_drop_images": self.drop_images,
                "control_disagreements": self.n - self.agree if self.ref_correct is not None else 0,
                "control_drop_pp": self.drop_pp, "control_agreement": self.agreement,
                "control_drop_low_pp": drop_low, "control_drop_high_pp": drop_high,
                "control_agreement_low": agree_low, "control_agreement_high": agree_high}


def judge(runner: Runner, data: LabelledData, reference: Judged | None = None) -> Judged:
    """The one control-split comparison: every decision (recipe choice, fallback rounds, accuracy control) uses it."""
    batch = inference_batch(data.images.shape[-1])
    preds = np.concatenate([runner.run(data.images[i:i + batch]).argmax(1) for i in range(0, len(data.images), batch)])
    right = preds == data.labels
    if reference is None:
        return Judged(preds, len(preds), int(right.sum()))
    ref_right = reference.preds == data.labels
    return Judged(preds, len(preds), int(right.sum()), int(ref_right.sum()), int((preds == reference.preds).sum()),
                  int((ref_right & ~right).sum()), int((~ref_right & right).sum()))


def joined(a: Judged, b: Judged) -> Judged:
    """One runner judged on two disjoint parts of a split, as on their union."""
    ref = None if a.ref_correct is None else a.ref_correct + b.ref_correct
    return Judged(np.concatenate([a.preds, b.preds]), a.n + b.n, a.correct + b.correct, ref, a.agree + b.agree,
                  a.worse + b.worse, a.better + b.better)


@dataclass(frozen=True)
class AccuracyGates:
    max_drop_pp: float | None = None  # the gate file's max_top1_drop_pp
    min_agreement: float | None = None  # its min_agreement

    @classmethod
    def of(cls, gates: dict) -> "AccuracyGates":
        return cls(gates.get("max_top1_drop_pp"), gates.get("min_agreement"))

    @property
    def any(self) -> bool:
        return self.max_drop_pp is not None or self.min_agreement is not None

    def text(self) -> str:
        parts = ([f"drop ≤ {self.max_drop_pp:g} pp"] if self.max_drop_pp is not None else []) + (
            [f"agreement ≥ {self.min_agreement * 100:g} %"] if self.min_agreement is not None else [])
        return "gates: " + (", ".join(parts) or "none")


def gate_states(gates: AccuracyGates, j: Judged) -> dict[str, dict]:
    """Per accuracy gate: pass (even its pessimistic bound meets it), fail (even its optimistic bound misses it) or
    boundary (within the sampling noise), and the exact count comparison that decides a boundary."""
    f = j.figures()
    out = {}
    if gates.max_drop_pp is not None:
        allowed = drop_allowance(gates.max_drop_pp, j.n)
        state = ("pass" if f["control_drop_high_pp"] <= gates.max_drop_pp else
                 "fail" if f["control_drop_low_pp"] > gates.max_drop_pp else "boundary")
        out["max_top1_drop_pp"] = {"state": state, "images": j.drop_images, "allowed_images": allowed,
                                   "count_passes": j.drop_images <= allowed}
    if gates.min_agreement is not None:
        needed = agreement_needed(gates.min_agreement, j.n)
        state = ("pass" if f["control_agreement_low"] >= gates.min_agreement else
                 "fail" if f["control_agreement_high"] < gates.min_agreement else "boundary")
        out["min_agreement"] = {"state": state, "images": j.agree, "needed_images": needed,
                                "count_passes": j.agree >= needed}
    return out


@dataclass
class Assessment:
    """A candidate's accuracy verdict on the control split and the rule that gave it."""

    passed: bool
    rule: str  # "bounds" | "bounds on the extended split" | "counts at the boundary"
    judged: Judged  # on the split that decided
    gates: dict  # gate_states on that split
    extended: bool = False

    @property
    def score(self) -> float:
        """How far the figures are from the gates, in images per thousand (lower is better; the fallback ranks by it)."""
        gaps = [(g["images"] - g["allowed_images"]) if name == "max_top1_drop_pp" else (g["needed_images"] - g["images"])
                for name, g in self.gates.items()]
        return max(gaps, default=0) / self.judged.n * 1000.0

    def to_dict(self) -> dict:
        return {"passed": self.passed, "rule": self.rule, "extended": self.extended, **self.judged.figures(),
                "gates": self.gates}

    def text(self) -> str:
        return f"{'meets' if self.passed else 'misses'} the accuracy gates ({figures_text(self.judged)}; {self.rule})"


@dataclass
class Evidence:
    """The control images every accuracy decision of one deploy is taken on, the reference judged on them, and,
    drawn the first time a decision sits at a boundary, more control images (`more`, given the reference's
    measured seconds per control image, so that it can bound their passes' time; None when none are left). On the
    extended split a runner is judged on the extra images only, joined with its judgement on the control split."""

    reference: Runner
    control: LabelledData
    more: Callable[[float], LabelledData | None] | None = None
    log: Callable[[str], None] = print
    drawn: dict = field(default_factory=dict)  # the loader's record of what it drew (its sample list)
    _memo: dict = field(default_factory=dict)

    def reference_on_control(self) -> Judged:
        if "control" not in self._memo:
            t0 = time.perf_counter()
            self._memo["control"] = judge(self.reference, self.control)
            self._memo["s_per_image"] = (time.perf_counter() - t0) / max(len(self.control.labels), 1)
        return self._memo["control"]

    def reference_on_extra(self) -> Judged:
        if "extra_judged" not in self._memo:
            self._memo["extra_judged"] = judge(self.reference, self.extra())
        return self._memo["extra_judged"]

    def extra(self) -> LabelledData | None:
        """The extra control images, drawn and loaded once; None when no more images exist."""
        if "extra" not in self._memo:
            self.reference_on_control()  # its pass's speed bounds how many are drawn
            extra = self.more(self._memo["s_per_image"]) if self.more is not None else None
            self._memo["extra"] = None if extra is None or not len(extra.labels) else extra
            if self._memo["extra"] is not None:
                self.log(f"at a gate's boundary: {len(extra.labels)} more control images drawn "
                         f"({len(self.control.labels) + len(extra.labels)} in all) to decide on more evidence")
        return self._memo["extra"]

    def describe(self) -> dict:
        extra = self._memo.get("extra")
        return {"n": len(self.control.labels), "extended_n": None if extra is None else len(self.control.labels)
                + len(extra.labels), "rule": RULE}


RULE = ("each accuracy gate is held on its one-sided 95 % bounds in counts of images; where a gate lies within the "
        "control split's sampling noise, more control images are drawn (neither calibration nor evaluation images) and "
        "the bounds read again; where it still does, or none are left, the exact counts decide (a 0.3 pp gate on "
        "1,000 images allows 3)")


def assess(runner: Runner, evidence: Evidence, gates: AccuracyGates, key: str | None = None) -> Assessment:
    """`key`: the artifact the runner runs (its file), so that an artifact judged once by one decision (the recipe
    choice) is not judged again by the next (the fallback's look at the chosen one): a large variant's pass over
    a thousand control images takes minutes."""
    if key is None:
        return _assess(runner, evidence, gates)
    memo = ("assessed", key, repr(gates))
    if memo not in evidence._memo:
        evidence._memo[memo] = _assess(runner, evidence, gates)
    return evidence._memo[memo]


def _assess(runner: Runner, evidence: Evidence, gates: AccuracyGates) -> Assessment:
    base = judge(runner, evidence.control, evidence.reference_on_control())
    states = gate_states(gates, base)
    if not _boundary(states):
        return Assessment(_passes(states), "bounds", base, states)
    extra = evidence.extra()
    if extra is not None:
        j = joined(base, judge(runner, extra, evidence.reference_on_extra()))
        states = gate_states(gates, j)
        if not _boundary(states):
            return Assessment(_passes(states), "bounds on the extended split", j, states, True)
        return Assessment(_counts_pass(states), "counts at the boundary", j, states, True)
    return Assessment(_counts_pass(states), "counts at the boundary", base, states)


def _boundary(states: dict) -> bool:
    return not any(s["state"] == "fail" for s in states.values()) and any(
        s["state"] == "boundary" for s in states.values())


def _passes(states: dict) -> bool:
    return all(s["state"] == "pass" for s in states.values())


def _counts_pass(states: dict) -> bool:
    return all(s["state"] == "pass" or (s["state"] == "boundary" and s["count_passes"]) for s in states.values())


def figures_text(j: Judged) -> str:
    f = j.figures()
    n = f["control_n"]
    return (f"top-1 drop {f['control_drop_images']} of {n:,} images ({f['control_drop_pp']:+.2f} pp, 95 % "
            f"[{f['control_drop_low_pp']:+.2f}, {f['control_drop_high_pp']:+.2f}]), agreement {n - f['control_disagreements']:,}"
            f" of {n:,} ({f['control_agreement'] * 100:.2f} %, 95 % [{f['control_agreement_low'] * 100:.2f}, "
            f"{f['control_agreement_high'] * 100:.2f}])")
