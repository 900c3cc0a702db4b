"""Stage 6: the measured figures against the gate file's values for this target and variant."""
from __future__ import annotations

from convnext_deploy.pipeline.core import gate_file as gates_mod
from convnext_deploy.pipeline.decisions import reasons
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.pipeline.stages.build import Built
from convnext_deploy.pipeline.stages.context import Context
from convnext_deploy.pipeline.stages.decide import Decision
from convnext_deploy.pipeline.stages.validate import Validation, p50, speedup_interval


def figures(ctx: Context, v: Validation, device: dict | None = None) -> dict:
    """The figures gates read: INT8 against the target's reference precision, latency at the deployment size; on an
    emulated device, the accuracy its own kernels gave (pipeline/stages/device.py)."""
    int8 = ((device or {}).get("accuracy") or v.accuracy).get("int8", {})
    ref_ms, int8_ms = p50(v.latency, ctx.target.reference, ctx.cfg.image_size), p50(v.latency, "int8", ctx.cfg.image_size)
    counts = {k: int8[k] for k in ("n", "drop_images", "agree")} if "agree" in int8 else None
    return {"top1_drop_pp": int8.get("top1_drop_pp"), "agreement": int8.get("agreement"), "p50_ms": int8_ms,
            "int8_speedup": (ref_ms / int8_ms) if (ref_ms and int8_ms) else None, "counts": counts}


def check(ctx: Context, built: Built, v: Validation, decision: Decision,
          device: dict | None = None) -> tuple[dict, list]:
    """(figures, verdicts); a figure from a proxy fails its gate unless the gate file allows proxies, and so does a
    speed gate of an emulated device (allow_emulated). Every failing verdict names the decision that caused it, true
    of this CPU, and what the user can do."""
    measured = figures(ctx, v, device)
    verdicts = gates_mod.check(ctx.gates, measured, any(r.proxy for r in built.runners.values()), ctx.emulated)
    executes = int8_executes(ctx, built, device)
    verdicts += [executes] if executes else []
    interval = speedup_interval(v.latency, "int8", ctx.cfg.image_size)
    for verdict in verdicts:
        if verdict.status in (gates_mod.EMULATED, gates_mod.EMULATED_ALLOWED):
            verdict.reason = (f"the emulated {ctx.device.name} gives numerics, not speed; this machine's own figure "
                              "is in the latency table, and is not the device's")
        elif verdict.gate == "min_int8_speedup" and interval:  # the point decides; the interval says how sure it is
            lo, hi = interval["ci95"]
            verdict.reason = (f"95 % interval [{lo:.2f}, {hi:.2f}]×" + (": the gate lies inside it, so this verdict "
                              "is within the machine's noise" if lo < verdict.allowed <= hi else ""))
        if verdict.status == "fail":
            verdict.reason = "; ".join(filter(None, (_cause(ctx, verdict, decision), verdict.reason)))
    return measured, verdicts


INT8_SHARE = 0.5  # below it, most compute layers of the INT8 artifact run in float: INT8 in name only


def int8_executes(ctx: Context, built: Built, device: dict | None) -> gates_mod.Verdict | None:
    """Whether the INT8 artifact's compute layers run in INT8 where it is deployed, where the runtime says which
    precision each ran in (OpenVINO): on ARM its CPU plugin runs a quantized IR in float ("simulation"), so the
    deploy's INT8 speed-up would be a figure the device never gives. None where not known or no --device given."""
    if ctx.device is None:
        return None
    ran = ((device or {}).get("accuracy") or {}).get("int8") or {}
    layers = ran.get("layers") or (built.runners["int8"].layers if "int8" in built.runners else {})
    compute = layers.get("compute") or {}
    if not compute:
        return None
    ints = sum(n for kind, n in compute.items() if kind.split()[-1] in ("u8", "i8"))
    share, where = ints / sum(compute.values()), (device or {}).get("label") or "this machine"
    kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(compute.items()))
    verdict = gates_mod.Verdict("int8_executes", "the INT8 artifact's compute layers run in INT8 on the device",
                                INT8_SHARE, share, "pass" if share >= INT8_SHARE else "fail", "", ">=",
                                reason=f"{ints} of {sum(compute.values())} compute layers in INT8 on {where}")
    if verdict.status == "fail":
        ref = ((device or {}).get("accuracy") or {}).get(ctx.target.reference, {})
        float_ran = f" (it ran as: {ref['precision_executed']})" if ref.get("precision_executed") else ""
        verdict.reason += (f": {ctx.target.name} runs this INT8 artifact in float there ({kinds}), having no INT8 "
                           "kernels for it on that CPU, so INT8 brings it no speed and its accuracy is that float "
                           f"run's. Ship the {ctx.target.reference} artifact{float_ran}, or a target whose INT8 "
                           "kernels run on that CPU (--target onnxruntime)")
    return verdict


def _cause(ctx: Context, verdict, decision: Decision) -> str:
    """The decision behind a failed gate."""
    choice, fallback = decision.recipe or {}, decision.fallback
    if verdict.gate in ("min_int8_speedup", "max_p50_ms"):
        if choice.get("reason"):
            return choice["reason"]
        after = (fallback or {}).get("speed_after")
        if after and not after["meets_speed"]:
            return (f"the fallback floated {len(fallback['float_layers'])} layers to meet the accuracy gates and the "
                    f"repaired INT8 then ran at {after['value']:.2f}× the reference: no candidate met every gate here. "
                    + reasons.int8_path_note(cpu_profile()))
        chosen = next((r for r in choice.get("candidates", []) if r.get("chosen")), None)
        if chosen:
            return (f"the recipe choice measured {chosen['recipe']!r} at {chosen['speedup']:.2f}× "
                    f"[{chosen['speedup_ci95'][0]:.2f}, {chosen['speedup_ci95'][1]:.2f}]; the validation's own "
                    "measurement differs by the machine's noise")
        return reasons.int8_path_note(cpu_profile())
    if verdict.gate in ("max_top1_drop_pp", "min_agreement"):
        control = decision.control
        passed_on_control = (fallback or {}).get("met") or ((fallback or {}).get("plain_control") or {}).get("passed")
        if control and passed_on_control and verdict.counts:
            n = control.get("extended_n") or control["n"]
            return reasons.evaluation_disagrees(verdict.gate, "held as " + control["rule"].split(";")[0], n,
                                                verdict.counts["n"])
        return reasons.accuracy_unreachable(choice, fallback, verdict.gate, control and control["n"])
    return ""


def recommend(ctx: Context, v: Validation) -> dict | None:
    """The fastest precision measured here (batch 1, deployment size) whose evaluation-split accuracy meets the
    accuracy gates: INT8 is not always it (on a CPU with native BF16, a small model's BF16 can beat its INT8)."""
    size, rows = ctx.cfg.image_size, []
    for precision, acc in v.accuracy.items():
        ms = p50(v.latency, precision, size)
        if precision == "torch_fp32" or ms is None:
            continue
        meets = "agree" not in acc or all(gates_mod.counted(g, ctx.gates[g], acc)[0]
                                          for g in ("max_top1_drop_pp", "min_agreement") if g in ctx.gates)
        rows.append({"precision": precision, "p50_ms": ms, "meets_accuracy": meets})
    meeting = [r for r in rows if r["meets_accuracy"]]
    if not meeting:
        return None
    best = min(meeting, key=lambda r: r["p50_ms"])
    return {**best, "input_size": size, "batch": 1, "candidates": rows,
            "line": f"fastest precision meeting the accuracy gates here: {best['precision']} "
                    f"(p50 {best['p50_ms']:.2f} ms at {size} px, batch 1, on {ctx.cfg.threads} threads of this CPU)"}
