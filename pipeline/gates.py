"""Gates: thresholds from a checked-in TOML file, checked against measured figures.

File layout (later tables override earlier ones):

    [defaults]                      # every target, every variant
    [target.<name>]                 # one target
    [target.<name>.variant.<v>]     # one target and variant

A gate whose figure was not measured fails as "not measured"; a figure from a proxy (a stand-in for the
real runtime) fails unless the gate file sets `allow_proxy = true` for that scope.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import UserError

# gate name → (figure it reads, comparison, unit, description)
GATES = {
    "max_top1_drop_pp": ("top1_drop_pp", "<=", "pp", "INT8 top-1 drop vs the same target's reference (FP32; Core ML: FP16)"),
    "min_agreement": ("agreement", ">=", "", "INT8 top-1 agreement with the same target's reference"),
    "max_p50_ms": ("p50_ms", "<=", "ms", "INT8 p50 latency, deployment size, batch 1"),
    "min_int8_speedup": ("int8_speedup", ">=", "×", "reference p50 / INT8 p50, deployment size, batch 1"),
}
OPTIONS = {"allow_proxy"}


@dataclass
class Verdict:
    gate: str
    description: str
    allowed: float
    measured: float | None
    status: str  # pass | fail | not measured | proxy not allowed
    unit: str
    comparison: str
    reason: str = ""  # why, where the deploy knows more than the figure (e.g. INT8 cannot pay on this CPU)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def line(self) -> str:
        m = "—" if self.measured is None else f"{self.measured:.4g}{self.unit}"
        return (f"{self.gate}: {self.status} (measured {m}, allowed {self.comparison} {self.allowed:g}{self.unit})"
                + (f" — {self.reason}" if self.reason else ""))

    def to_dict(self) -> dict:
        return asdict(self)


def load_gates(path: Path | str, target: str, variant: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gate file not found: {path}; pass --gates PATH (the repository's gates.toml is the default)")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})") from None
    scopes = [doc.get("defaults", {})]
    t = doc.get("target", {}).get(target, {})
    scopes.append({k: v for k, v in t.items() if k != "variant"})
    scopes.append(t.get("variant", {}).get(variant, {}))
    merged: dict = {}
    for scope in scopes:
        for k, v in scope.items():
            if k not in GATES and k not in OPTIONS:
                raise UserError(f"{path}: unknown gate {k!r}; known: {', '.join([*GATES, *OPTIONS])}")
            merged[k] = v
    return merged


def check(gates: dict, figures: dict, proxy: bool) -> list[Verdict]:
    """`figures` maps a figure name (see GATES) to its measured value, or None if not measured."""
    verdicts = []
    for gate, allowed in gates.items():
        if gate in OPTIONS:
            continue
        figure, cmp, unit, desc = GATES[gate]
        measured = figures.get(figure)
        if measured is None:
            status = "not measured"
        elif proxy and not gates.get("allow_proxy", False):
            status = "proxy not allowed"
        else:
            ok = measured <= allowed if cmp == "<=" else measured >= allowed
            status = "pass" if ok else "fail"
        verdicts.append(Verdict(gate, desc, float(allowed), None if measured is None else float(measured),
                                status, unit, cmp))
    return verdicts
