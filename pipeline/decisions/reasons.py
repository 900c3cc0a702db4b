"""Why a gate could not be met, in words true of the CPU the deploy ran on, and what the user can do about it.

Every text names the decision that caused the miss and reads the CPU's real INT8 path from its profile
(`machine.cpu_profile`): advice to move to a CPU with VNNI is only given on a CPU without it.
"""
from __future__ import annotations

FLOAT_OPS = ("what stays slow are the float ops around them (depthwise convolutions, LayerNorm, GELU, layout "
             "changes): see where the time goes")


def int8_path_note(profile: dict) -> str:
    """What limits INT8 on this CPU, from its profile."""
    path = profile["int8_path"]
    if path.startswith("AMX"):
        return (f"this CPU runs INT8 GEMMs on {path}, so the integer layers are fast; {FLOAT_OPS}"
                + ("; BF16 on AMX may be the faster precision here (the report's recommended precision says, as "
                   "measured)" if profile.get("bf16_native") else ""))
    if profile.get("vnni"):
        return f"this CPU has VNNI ({path}), so the integer layers run at full rate; {FLOAT_OPS}"
    if profile.get("u8s8_saturates"):
        return (f"this CPU has no VNNI: {path}, three instructions per step where VPDPBUSD takes one; a CPU with "
                "AVX-512 VNNI or AVX-VNNI runs these INT8 layers faster")
    if "I8MM" in path:
        return f"this CPU runs INT8 GEMMs on {path}; {FLOAT_OPS}"
    if path.startswith("ARM dot-product"):
        return (f"this CPU runs INT8 GEMMs on {path}; a core with I8MM (SMMLA: Neoverse V1/N2 and newer) runs them "
                "faster, and the float ops around them (LayerNorm, GELU, depthwise convolutions) stay float")
    if path.startswith("ARM NEON"):
        return (f"this CPU has no ARM dot-product instructions: {path}, often no faster than FP32; a core with SDOT "
                "(Cortex-A76 / Neoverse-N1 and newer) runs INT8 GEMMs much faster")
    return f"this CPU has {path}: the runtime falls back to generic integer code, often no faster than FP32"


def gate_scope(target: str, variant: str) -> str:
    return f"[target.{target}.variant.{variant}]"


def speed_unreachable(target, variant: str, rows: list[dict], gates: dict, profile: dict) -> str:
    """No INT8 candidate met the speed gates in the recipe choice (rows: the timed candidates)."""
    fastest = max(rows, key=lambda r: r["speedup"])
    lo, hi = fastest.get("speedup_ci95") or (fastest["speedup"], fastest["speedup"])
    ref = target.reference.upper()
    want = (f"min_int8_speedup {gates['min_int8_speedup']:g}" if "min_int8_speedup" in gates
            else f"max_p50_ms {gates['max_p50_ms']:g}")
    value = (f"min_int8_speedup = {max(0.01, round(lo * 0.95, 2)):g}" if "min_int8_speedup" in gates
             else f"max_p50_ms = {fastest['p50_ms'] * 1.1:.3g}")
    return (f"no INT8 candidate reaches {want} on {profile['cpu']}: the fastest, {fastest['recipe']!r}, runs at "
            f"{fastest['speedup']:.2f}× {ref} [{lo:.2f}, {hi:.2f}] ({fastest['p50_ms']:.2f} ms) at the deployment "
            f"size, batch 1. {int8_path_note(profile)[0].upper()}{int8_path_note(profile)[1:]}. What you can do: "
            f"ship {ref} here (the report's recommended precision), or set {value} in {gate_scope(target.name, variant)} "
            "of the gate file if this ratio is acceptable on this CPU")


def accuracy_unreachable(choice: dict | None, fallback: dict | None, gate: str, control_n: int | None) -> str:
    """The accuracy gate `gate` failed: which decision left it failing, and what to try."""
    bits, met = [], 0
    if choice and choice.get("candidates"):
        meeting = [r for r in choice["candidates"] if r.get("meets_accuracy")]
        met = len(meeting)
        bits.append(f"{len(meeting)} of {len(choice['candidates'])} INT8 candidates met the accuracy gates on the "
                    "control split" + (f" (the chosen {choice['chosen']!r} did not)" if meeting and not next(
                        (r for r in choice["candidates"] if r["chosen"]), {}).get("meets_accuracy") else ""))
    if fallback and fallback.get("triggered"):
        bits.append(fallback.get("message") or "the fallback ran")
    elif fallback is None:
        bits.append("the accuracy fallback did not run (--no-fallback, or no control split)")
    more = f"--control {max(2000, 2 * (control_n or 1000))}" if control_n else "--control N"
    bits.append(f"what you can do: a larger control split ({more}, up to half the evaluation images) if the control "
                "and evaluation figures disagree; " + ("--recipe NAME for a candidate that met the gates; " if met else "")
                + f"--fallback-max-layers N to float more layers; or relax {gate} in the gate file")
    return "; ".join(bits)


def evaluation_disagrees(gate: str, control_rule: str, control_n: int, eval_n: int) -> str:
    """The control split passed a gate that the evaluation split then missed."""
    return (f"the control split ({control_n:,} images, {control_rule}) passed {gate}, the evaluation split "
            f"({eval_n:,} images) did not: the two samples differ by more than the decision's margin; a larger "
            f"control split (--control {max(2 * control_n, 2000)}) decides on more evidence")
