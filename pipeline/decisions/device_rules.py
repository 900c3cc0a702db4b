"""Part of the recipe choice (decisions/recipe.py) for a `--device` this machine only emulates: its speed cannot be
measured (this machine's timings say nothing of the device's), and some candidates are known wrong for its INT8
path whatever the control split says here.

- x86 without VNNI (AVX2): full 8-bit weights saturate their u8×s8 pair sums (VPMADDUBSW), so the candidates the
  target says saturate (`Target.saturates_without_vnni`) are excluded, with that reason;
- the choice is then the first candidate in the declared order (ours first) meeting the accuracy gates on the
  control split, speed not judged; the deployed one is measured again on the device's own kernels afterwards
  (stages/device.py), and the accuracy gates read those figures.
"""
from __future__ import annotations

from convnext_deploy.pipeline.stages.context import Context


def excluded(ctx: Context, artifact) -> str | None:
    """Why a candidate is wrong for the device's INT8 path, or None."""
    check = ctx.target.saturates_without_vnni
    if ctx.device.int8()["path"] == "avx2" and check is not None and check(artifact):
        return (f"excluded for {ctx.device.name}: full 8-bit weights, whose u8×s8 pair sums saturate at int16 on its "
                "x86-without-VNNI path")
    return None


def pick(rows: list[dict]) -> tuple[dict, str, None]:
    """(the candidate to deploy, which case decided, no backup): the first allowed one meeting the accuracy gates,
    else the allowed one closest to them (the fallback repairs it)."""
    allowed = [r for r in rows if not r.get("excluded")] or rows
    accurate = [r for r in allowed if r["meets_accuracy"]]
    case = "emulated device: its speed is not measurable, so the declared order decides among accurate candidates"
    if accurate:
        return accurate[0], case, None
    return min(allowed, key=lambda r: r["score"]), case + "; none meets the accuracy gates", None


def why(row: dict, best: dict) -> str:
    if row.get("excluded"):
        return row["excluded"] + ("; yet no other candidate was built, so its accuracy on the device's own kernels "
                                  "decides (stages/device.py)" if row is best else "")
    if row is best:
        return ("first candidate in the declared order meeting the accuracy gates (the emulated device's speed is not "
                "measured)" if row["meets_accuracy"] else "closest to the accuracy gates; none meets them")
    return "misses the accuracy gates on the control split" if not row["meets_accuracy"] else \
        f"{best['recipe']} comes first in the declared order"
