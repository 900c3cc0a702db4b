"""Gates: thresholds from a checked-in TOML file, checked against measured figures.

File layout (later tables override earlier ones):

    [defaults]                      # every target, every variant
    [target.<name>]                 # one target
    [target.<name>.variant.<v>]     # one target and variant

and under any of them `.path.<int8 path>` ([target.onnxruntime.variant.t.path.avx2]): only where the deploy's CPU
takes that INT8 path (machine.INT8_PATHS: amx, vnni, avx2, arm-i8mm, arm-dotprod, arm-neon, generic), right after
its scope. INT8 speed depends on the path (ConvNeXt-T's ONNX Runtime INT8 gained 1.60× on an AMD EPYC Zen 3, AVX2
without VNNI, and 2.00× on a Zen 5 with AVX-512 VNNI: benchmarks/amd-epyc-zen3-2026-12-07 and -zen5-2026-12-04), so a
speed gate written for one path is scoped to it instead of failing CI's own runner.

A gate whose figure was not measured fails as "not measured"; a figure from a proxy (a stand-in for the
real runtime) fails unless the gate file sets `allow_proxy = true` for that scope. On an emulated device
(`deploy --device`, pipeline/device/) the accuracy gates read the device's own figures and a speed gate cannot be
measured: it is "not measured (emulated)", which fails (the deploy exits 3) unless the scope sets
`allow_emulated = true`, which lets it pass as "not measured (emulated), allowed".
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import tomllib

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.measure.machine import INT8_PATHS
from convnext_deploy.pipeline.models.variants import VARIANTS
from convnext_deploy.reports.cells import PASSING
from convnext_deploy.targets import TARGETS

# gate name → (figure it reads, comparison, unit, description)
GATES = {
    "max_top1_drop_pp": ("top1_drop_pp", "<=", "pp", "INT8 top-1 drop vs the same target's reference (FP32; Core ML: FP16)"),
    "min_agreement": ("agreement", ">=", "", "INT8 top-1 agreement with the same target's reference"),
    "max_p50_ms": ("p50_ms", "<=", "ms", "INT8 p50 latency, deployment size, batch 1"),
    "min_int8_speedup": ("int8_speedup", ">=", "×", "reference p50 / INT8 p50, deployment size, batch 1"),
}
OPTIONS = {"allow_proxy", "allow_emulated"}
SPEED_GATES = ("max_p50_ms", "min_int8_speedup")
EMULATED = "not measured (emulated)"
EMULATED_ALLOWED = PASSING[1]


@dataclass
class Verdict:
    gate: str
    description: str
    allowed: float
    measured: float | None
    status: str  # pass | fail | not measured | proxy not allowed | EMULATED | EMULATED_ALLOWED
    unit: str
    comparison: str
    reason: str = ""  # why, where the deploy knows more than the figure (e.g. INT8 cannot pay on this CPU)
    counts: dict | None = None  # accuracy gates: the images that decided, e.g. {"images": 3, "allowed": 3, "n": 1000}

    @property
    def passed(self) -> bool:
        return self.status in PASSING

    def line(self) -> str:
        m = "—" if self.measured is None else f"{self.measured:.4g}{self.unit}"
        if self.counts:
            c = self.counts
            m += (f": {c['images']:,} of {c['n']:,} images, " + (f"{c['allowed']:,} allowed" if "allowed" in c
                                                                  else f"{c['needed']:,} needed"))
        return (f"{self.gate}: {self.status} (measured {m}, allowed {self.comparison} {self.allowed:g}{self.unit})"
                + (f" — {self.reason}" if self.reason else ""))

    def to_dict(self) -> dict:
        return asdict(self)


def load_gates(path: Path | str, target: str, variant: str, int8_path: str | None = None) -> dict:
    """The gates for one target and variant on a CPU whose INT8 path is `int8_path`: [defaults], then
    [target.<target>], then its variant table, each followed by its [... .path.<int8_path>] table.

    The whole file is checked first, every scope and not just the one deployed, so a typo in another target's
    table fails CI rather than the deploy that later needs it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gate file not found: {path}; pass --gates PATH (the repository's gates.toml is the default)")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})") from None
    validate_gates(doc, path)
    t = doc.get("target", {}).get(target, {})
    merged: dict = {}
    for scope in (doc.get("defaults", {}), t, t.get("variant", {}).get(variant, {})):
        merged.update({k: v for k, v in scope.items() if k not in ("variant", "path")})
        merged.update(scope.get("path", {}).get(int8_path, {}) if int8_path else {})
    return merged


# what a value may be: (lowest, highest, lowest itself allowed, in words for the error line)
LIMITS = {
    "max_top1_drop_pp": (0.0, None, True, "a number of percentage points ≥ 0, e.g. 0.3"),
    "min_agreement": (0.0, 1.0, True, "a fraction between 0 and 1, e.g. 0.98"),
    "max_p50_ms": (0.0, None, False, "a number of milliseconds > 0, e.g. 40"),
    "min_int8_speedup": (0.0, None, False, "a ratio > 0, e.g. 1.0 (INT8 never slower than the reference)"),
}
LAYOUT = ("[defaults], [target.<target>] and [target.<target>.variant.<variant>], each with optional "
          "[<scope>.path.<int8 path>] tables")


def validate_gates(doc: dict, path: Path) -> None:
    """Every table and value of a parsed gate file, or a UserError naming the first bad one, the file and
    what is allowed there."""
    for key, value in doc.items():
        if key not in ("defaults", "target"):
            where = f"table [{key}]" if isinstance(value, dict) else f"key {key} = {_show(value)} outside any table"
            raise UserError(f"{path}: unknown {where}; a gate file has only {LAYOUT}")
    _check_scope(doc.get("defaults", {}), "defaults", path, nested=("path",))
    targets = doc.get("target", {})
    if not isinstance(targets, dict):
        raise UserError(f"{path}: target = {_show(targets)} must be tables [target.<target>]")
    for name, table in targets.items():
        if not isinstance(table, dict):
            raise UserError(f"{path}: {name} = {_show(table)} in [target] is not allowed; gates go under "
                            "[target.<target>], one table per target")
        if name not in TARGETS:
            raise UserError(f"{path}: unknown target {name!r} in [target.{name}]; known targets: {', '.join(TARGETS)}")
        _check_scope(table, f"target.{name}", path, nested=("variant", "path"))
        variants = table.get("variant", {})
        if not isinstance(variants, dict):
            raise UserError(f"{path}: [target.{name}] variant = {_show(variants)} must be tables "
                            f"[target.{name}.variant.<variant>]")
        for v, vtable in variants.items():
            if v not in VARIANTS:
                raise UserError(f"{path}: unknown variant {v!r} in [target.{name}.variant.{v}]; known variants: "
                                + ", ".join(VARIANTS))
            _check_scope(vtable, f"target.{name}.variant.{v}", path, nested=("path",))


def _check_scope(table, scope: str, path: Path, nested: tuple[str, ...] = ()) -> None:
    if not isinstance(table, dict):
        raise UserError(f"{path}: {scope} = {_show(table)} must be a table [{scope}] of gates")
    for key, value in table.items():
        if key == "path" and "path" in nested:
            _check_paths(value, scope, path)
            continue
        if key in nested:
            continue
        if key not in GATES and key not in OPTIONS:
            raise UserError(f"{path}: unknown gate {key!r} in [{scope}]; known: {', '.join([*GATES, *OPTIONS])}")
        if key in OPTIONS:
            if not isinstance(value, bool):
                raise UserError(f"{path}: {key} = {_show(value)} in [{scope}] must be true or false")
            continue
        lo, hi, lo_ok, words = LIMITS[key]
        # bool is an int in Python; `true` for a threshold is a typo, not 1
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < lo or (value == lo and not lo_ok) or (hi is not None and value > hi):
            raise UserError(f"{path}: {key} = {_show(value)} in [{scope}] is not allowed; it must be {words}")


def _check_paths(paths, scope: str, path: Path) -> None:
    if not isinstance(paths, dict):
        raise UserError(f"{path}: [{scope}] path = {_show(paths)} must be tables [{scope}.path.<int8 path>]")
    for name, table in paths.items():
        if name not in INT8_PATHS:
            raise UserError(f"{path}: unknown INT8 path {name!r} in [{scope}.path.{name}]; known paths: "
                            + ", ".join(INT8_PATHS))
        _check_scope(table, f"{scope}.path.{name}", path)


def _show(value) -> str:
    """A value as the gate file spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    return repr(value) if not isinstance(value, list) else "[" + ", ".join(_show(v) for v in value) + "]"


def drop_allowance(max_drop_pp: float, n: int) -> int:
    """Images a top-1 drop gate allows on n images, exactly: 0.3 pp of 1,000 is 3 (the gate as written in decimal,
    not its binary float, whose product with n may land a hair under or over a whole image)."""
    return math.floor(Fraction(repr(float(max_drop_pp))) * n / 100)


def agreement_needed(min_agreement: float, n: int) -> int:
    """Images an agreement gate needs on n images, exactly: 98 % of 1,000 is 980."""
    return math.ceil(Fraction(repr(float(min_agreement))) * n)


def counted(gate: str, allowed: float, counts: dict) -> tuple[bool, dict]:
    """(passes, the counts shown beside the percentage) for an accuracy gate measured on `counts`: {"n", and
    "drop_images" or "agree"}."""
    n = counts["n"]
    if gate == "max_top1_drop_pp":
        limit = drop_allowance(allowed, n)
        return counts["drop_images"] <= limit, {"images": counts["drop_images"], "allowed": limit, "n": n}
    need = agreement_needed(allowed, n)
    return counts["agree"] >= need, {"images": counts["agree"], "needed": need, "n": n}


def check(gates: dict, figures: dict, proxy: bool, emulated: bool = False) -> list[Verdict]:
    """`figures` maps a figure name (see GATES) to its measured value, or None if not measured; its "counts" (n,
    drop_images, agree), where present, decide the accuracy gates exactly. `emulated`: the device is emulated, so
    no speed figure of it exists."""
    verdicts = []
    for gate, allowed in gates.items():
        if gate in OPTIONS:
            continue
        figure, cmp, unit, desc = GATES[gate]
        measured, counts = figures.get(figure), None
        if emulated and gate in SPEED_GATES:
            measured, status = None, EMULATED_ALLOWED if gates.get("allow_emulated", False) else EMULATED
        elif measured is None:
            status = "not measured"
        elif proxy and not gates.get("allow_proxy", False):
            status = "proxy not allowed"
        else:
            if gate in ("max_top1_drop_pp", "min_agreement") and figures.get("counts"):
                ok, counts = counted(gate, allowed, figures["counts"])
            else:
                ok = measured <= allowed if cmp == "<=" else measured >= allowed
            status = "pass" if ok else "fail"
        verdicts.append(Verdict(gate, desc, float(allowed), None if measured is None else float(measured),
                                status, unit, cmp, counts=counts))
    return verdicts
