"""Stage 6: the measured figures against the gate file's values for this target and variant."""
from __future__ import annotations

from pipeline import gates as gates_mod
from pipeline.stages.build import Built
from pipeline.stages.context import Context
from pipeline.stages.decide import Decision
from pipeline.stages.validate import Validation, p50


def figures(ctx: Context, v: Validation) -> dict:
    """The figures gates read: INT8 against the target's reference precision, latency at the deployment size."""
    int8 = v.accuracy.get("int8", {})
    ref_ms, int8_ms = p50(v.latency, ctx.target.reference, ctx.cfg.image_size), p50(v.latency, "int8", ctx.cfg.image_size)
    return {"top1_drop_pp": int8.get("top1_drop_pp"), "agreement": int8.get("agreement"), "p50_ms": int8_ms,
            "int8_speedup": (ref_ms / int8_ms) if (ref_ms and int8_ms) else None}


def check(ctx: Context, built: Built, v: Validation, decision: Decision) -> tuple[dict, list]:
    """(figures, verdicts); a figure from a proxy fails its gate unless the gate file allows proxies. A missed
    speed gate names the reason the recipe choice found (INT8 cannot pay on this CPU)."""
    measured = figures(ctx, v)
    verdicts = gates_mod.check(ctx.gates, measured, any(r.proxy for r in built.runners.values()))
    reason = (decision.recipe or {}).get("reason")
    for verdict in verdicts:
        if reason and verdict.gate == "min_int8_speedup" and not verdict.passed:
            verdict.reason = reason
    return measured, verdicts
