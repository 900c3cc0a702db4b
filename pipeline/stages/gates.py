"""Stage 6: the measured figures against the gate file's values for this target and variant."""
from __future__ import annotations

from pipeline import gates as gates_mod
from pipeline.stages.build import Built
from pipeline.stages.context import Context
from pipeline.stages.decide import Decision
from pipeline.stages.validate import Validation, p50, speedup_interval


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
    interval = speedup_interval(v.latency, "int8", ctx.cfg.image_size)
    for verdict in verdicts:
        if verdict.gate != "min_int8_speedup":
            continue
        if interval:  # the point decides; the interval says how sure it is on this machine
            lo, hi = interval["ci95"]
            near = lo < verdict.allowed <= hi
            verdict.reason = (f"95 % interval [{lo:.2f}, {hi:.2f}]×" + (": the gate lies inside it, so this verdict "
                              "is within the machine's noise" if near else ""))
        if reason and not verdict.passed:
            verdict.reason = "; ".join(filter(None, (reason, verdict.reason)))
    return measured, verdicts


def recommend(ctx: Context, v: Validation) -> dict | None:
    """The fastest precision measured here (batch 1, deployment size) whose evaluation-split accuracy meets the
    accuracy gates: INT8 is not always it (OpenVINO atto on a CPU with native BF16: BF16 7.75 ms, INT8 8.5 ms)."""
    size, rows = ctx.cfg.image_size, []
    for precision, acc in v.accuracy.items():
        ms = p50(v.latency, precision, size)
        if precision == "torch_fp32" or ms is None:
            continue
        drop, agree = acc.get("top1_drop_pp", 0.0), acc.get("agreement", 1.0)
        meets = (drop <= ctx.gates.get("max_top1_drop_pp", float("inf"))
                 and agree >= ctx.gates.get("min_agreement", 0.0))
        rows.append({"precision": precision, "p50_ms": ms, "meets_accuracy": meets})
    meeting = [r for r in rows if r["meets_accuracy"]]
    if not meeting:
        return None
    best = min(meeting, key=lambda r: r["p50_ms"])
    return {**best, "input_size": size, "batch": 1, "candidates": rows,
            "line": f"fastest precision meeting the accuracy gates here: {best['precision']} "
                    f"(p50 {best['p50_ms']:.2f} ms at {size} px, batch 1, on {ctx.cfg.threads} threads of this CPU)"}
