"""Does this CPU compute the bundle's INT8 model as the CPU that measured it did? (part of `validate`)

INT8 numerics depend on the CPU's INT8 path. VNNI, AMX and ARM's dot-product instructions accumulate u8×s8
products exactly in int32. x86 without VNNI (AVX2 only: AMD EPYC Zen 3, GitHub's ubuntu-latest) adds each pair
of products into an int16 with saturation (VPMADDUBSW). A model whose INT8 weights use all 8 bits therefore
computes another function there. A bundle measured on a VNNI CPU would lose accuracy there without a word: its
reference outputs move by a part of the range that validate's INT8 tolerance has to allow for other correct
kernels (2 % of the logit range on atto, 1 image in 500 changing its top-1). So the check reads what the deploy
recorded: the artifact's weights (`int8_numerics.saturates_without_vnni`, from the target) and the INT8 path it
was measured on. It fails with the reason and the fix, instead of passing on the tolerance.
"""
from __future__ import annotations

from convnext_deploy.pipeline.measure.machine import cpu_profile


def check_int8_path(report: dict, recipes: tuple = ()) -> tuple[bool, str] | None:
    """(passed, the line validate prints) for the bundle's INT8 artifact on this CPU; None where the deploy recorded
    nothing to check (no INT8 artifact, a runtime that is not an x86 CPU one, a bundle made before this check).
    `recipes`: the target's INT8 recipes, for the name of the one with 7-bit weights."""
    num = report.get("int8_numerics") or {}
    if "saturates_without_vnni" not in num:
        return None
    here, built = cpu_profile(), (report.get("machine") or {}).get("cpu_profile") or {}
    where = f"measured on {num.get('measured_on', '?')} ({num.get('int8_path', '?')})"
    if not num["saturates_without_vnni"]:
        return True, f"INT8 path: 7-bit or unsigned weights, no u8×s8 pair can saturate on any CPU ({where}): pass"
    if not here["u8s8_saturates"]:
        return True, f"INT8 path: {here['int8_path']} here accumulates u8×s8 exactly (the bundle was {where}): pass"
    if built.get("u8s8_saturates"):
        return True, (f"INT8 path: {here['int8_path']} here, and the bundle was {where}: its figures include the "
                      "saturation: pass")
    seven = next((r.name for r in recipes if "7-bit" in r.name), None)
    return False, (f"INT8 path: FAIL: this CPU has no VNNI ({here['int8_path']}) and the bundle's INT8 weights use all "
                   f"8 bits, so their u8×s8 pair sums saturate here; its accuracy was {where}, where they do not, so "
                   "the card's figures do not hold here. Deploy on this CPU (its recipe choice measures the "
                   "saturation)" + (f", or deploy with --recipe '{seven}'" if seven else "")
                   + " and ship that bundle")
