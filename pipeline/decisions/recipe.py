"""Part of stage 4 (decide): which INT8 recipe to deploy, chosen by measurement on the CPU the deploy runs on.

Every candidate the target declares (ours, the peer's default, the other settings, ours without outlier
smoothing) is timed at the deployment size, batch 1, interleaved with the reference precision, and judged on
every gate that applies at once: the accuracy gates on the control split (pipeline.decisions.judge: counts, bounds, more
evidence at a boundary) and the speed gates (min_int8_speedup, max_p50_ms) on the interleaved measurement. `auto`
keeps the fastest candidate meeting them all. Where none does, speed comes first: a candidate slower than the
reference is never taken while a faster one exists; the fastest candidates that miss only accuracy go to the
fallback to be repaired, the one closest to the accuracy gates first. INT8 speed and even INT8 numerics depend on
the CPU (U8S8 saturates without VNNI), so the timing is cached per CPU profile and artifact, not per target.
"""
from __future__ import annotations

import json

from convnext_deploy.pipeline.core.cache import cached_dir, code_digest, key_of
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.decisions import device_rules, reasons
from convnext_deploy.pipeline.decisions.judge import AccuracyGates, Evidence, assess
from convnext_deploy.pipeline.measure.latency import Budget, measure, ratio, ratio_of_rounds
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.pipeline.stages.build import Built, let_go, spread
from convnext_deploy.pipeline.stages.context import DEFAULT, Context


def _measure(ctx: Context, built: Built) -> list[dict]:
    """p50 of every candidate and the reference in one interleaved measurement."""
    runs = max(20, ctx.cfg.latency_runs)
    loads = spread(ctx, {"reference": built.artifacts[ctx.target.reference],
                         **{n: r.artifact for n, r in built.recipes.items()}})
    # every session is loaded instance by instance from its artifact, one set held at a time: the deploy's own
    # go first (OpenVINO L's decide held its FP32 and INT8 sessions beside an instance's set: 7.9 GiB), loaded again
    # when next run; the candidates are judged one at a time after
    let_go(ctx, built)
    lat = measure({"reference": None, **{n: None for n in built.recipes}}, batch=1,
                  input_size=ctx.cfg.image_size, runs=runs, warmup=5, rounds=12, budget=Budget(ctx.cfg.timing_budget_s),
                  spread=loads)
    rows = []
    for name in built.recipes:
        speedup = ratio(lat["reference"], lat[name])
        rows.append({"recipe": name, "p50_ms": lat[name].p50_ms, "p50_ci_ms": lat[name].p50_ci_ms,
                     "reference_p50_ms": lat["reference"].p50_ms, "speedup": speedup.value,
                     "speedup_ci95": [speedup.low, speedup.high], "runs": lat[name].runs, "rounds": lat[name].rounds,
                     "instances": lat[name].instances, "disturbed_rounds": lat[name].disturbed_rounds,
                     "rounds_data": lat[name].rounds_data()})
    return rows


def _cached_measure(ctx: Context, built: Built) -> tuple[list[dict], bool]:
    # the runners' code and the harness shape the figures as much as the artifacts do
    key = key_of("recipe-timing", cpu_profile(), ctx.cfg.threads, ctx.cfg.image_size, ctx.cfg.latency_runs,
                 code_digest(ctx.target.module, "convnext_deploy.pipeline.measure.latency", __name__),
                 {n: r.artifact.sha256() for n, r in built.recipes.items()},
                 built.artifacts[ctx.target.reference].sha256())

    def write(tmp) -> None:
        (tmp / "choice.json").write_text(json.dumps(_measure(ctx, built), indent=1))

    directory, cached = cached_dir("recipe-choice", key, write, log=ctx.log)
    return json.loads((directory / "choice.json").read_text()), cached


def speed_gates(gates: dict) -> dict:
    return {g: gates[g] for g in ("min_int8_speedup", "max_p50_ms") if g in gates}


def meets_speed(row: dict, gates: dict) -> bool:
    """On the point figures, as the deploy's verdict reads them."""
    return (row["speedup"] >= gates.get("min_int8_speedup", 0.0)
            and row["p50_ms"] <= gates.get("max_p50_ms", float("inf")))


def pick(rows: list[dict], gates: dict) -> tuple[dict, str, dict | None]:
    """(the candidate to deploy, which case decided, the backup: the fastest candidate meeting every gate when the
    pick is one to repair). `rows` carry speedup, p50_ms, meets_accuracy, score (distance from the accuracy gates,
    ≤ 0 met) and, where measured, rounds_data; in the declared order (ours first).

    Speed narrows the pool first: the candidates meeting the speed gates and faster than the reference, else those
    meeting the speed gates, else those faster than the reference, else all. In it, the fastest meeting the accuracy
    gates (a candidate not clearly slower than the fastest is a tie: the declared order decides); where none does,
    the one closest to the accuracy gates, for the fallback to repair, with the backup taken if the repair fails."""
    fast = [r for r in rows if meets_speed(r, gates)]
    pool = [r for r in fast if r["speedup"] > 1.0] or fast or [r for r in rows if r["speedup"] > 1.0] or rows
    case = ("speed gates met" if meets_speed(pool[0], gates) else
            "no candidate meets the speed gates: the faster-than-reference ones" if pool[0]["speedup"] > 1.0 else
            "no candidate is faster than the reference")
    accurate = [r for r in pool if r["meets_accuracy"]]
    if not accurate:
        backup = _fastest([r for r in fast if r["meets_accuracy"]])
        return (min(pool, key=lambda r: (r["score"], r["p50_ms"])), case + "; none of them meets the accuracy gates",
                backup)
    return _fastest(accurate), case, None


def _fastest(rows: list[dict]) -> dict | None:
    """The fastest row, a tie (not clearly slower, on the paired rounds' interval) going to the declared order."""
    if not rows:
        return None
    fastest = min(rows, key=lambda r: r["p50_ms"])
    for r in rows:
        r["vs_fastest"] = (ratio_of_rounds(fastest["rounds_data"], r["rounds_data"]).to_dict()  # < 1: r is slower
                           if "rounds_data" in r and "rounds_data" in fastest else
                           {"verdict": "slower" if r["p50_ms"] > fastest["p50_ms"] else "tie"})
    return next(r for r in rows if r is fastest or r["vs_fastest"]["verdict"] != "slower")


def choose(ctx: Context, built: Built, evidence: Evidence | None) -> tuple[str, dict | None]:
    """(name of the recipe to deploy, the choice as the report shows it; None when nothing was chosen)."""
    cfg, recipes = ctx.cfg, built.recipes
    if cfg.recipe not in ("auto", *recipes):  # prepare checked the name; smoothing off makes that one absent
        raise UserError(f"--recipe {cfg.recipe!r} was not built here (outlier smoothing is off); choose auto or one of: "
                        + ", ".join(repr(n) for n in recipes))
    timed = built.runners["int8"].timed and built.runners[ctx.target.reference].timed  # one runtime: all or none
    if cfg.recipe != "auto" or not timed or not recipes:
        name = DEFAULT if cfg.recipe == "auto" else cfg.recipe
        why = "named with --recipe" if cfg.recipe != "auto" else (
            "the only candidate" if len(recipes) < 2 else "not timed here (a proxy): the target's default")
        return name, ({"mode": cfg.recipe, "chosen": name, "why": why, "candidates": []} if recipes else None)
    rows, cached = _cached_measure(ctx, built)
    acc_gates = AccuracyGates.of(ctx.gates)
    judged = evidence is not None and acc_gates.any
    settled = None  # the fastest candidate so far meeting every gate, faster than the reference
    for row in sorted(rows, key=lambda r: r["p50_ms"]):  # judged fastest first: a large variant's pass takes minutes
        row["meets_speed"] = meets_speed(row, ctx.gates)
        why_not = cannot_win(row, settled, rows) if judged and not ctx.emulated else None
        if why_not:
            row.update(meets_accuracy=None, score=float("inf"), accuracy_rule="not judged", not_judged=why_not)
        elif judged:
            a = assess(recipes[row["recipe"]].runner, evidence, acc_gates, str(recipes[row["recipe"]].artifact.files[0]))
            recipes[row["recipe"]].release()
            row.update(a.judged.figures(), meets_accuracy=a.passed, score=a.score, accuracy_rule=a.rule,
                       accuracy_gates=a.gates)
            if settled is None and a.passed and row["meets_speed"] and row["speedup"] > 1.0:
                settled = row
        else:
            row.update(meets_accuracy=True, score=0.0)
    if ctx.emulated:
        for row in rows:
            row["excluded"] = device_rules.excluded(ctx, recipes[row["recipe"]].artifact)
        best, case, backup = device_rules.pick(rows)
    else:
        best, case, backup = pick(rows, ctx.gates)
    for row in rows:
        row.pop("rounds_data", None)
        row["chosen"] = row is best
        row["why"] = device_rules.why(row, best) if ctx.emulated else _why(row, best, judged)
        ctx.log(f"recipe {row['recipe']}: p50 {row['p50_ms']:.2f} ms ({row['speedup']:.2f}× {ctx.target.reference})"
                + (f", control: {row['control_drop_images']} of {row['control_n']:,} images lost, "
                   f"{row['control_disagreements']} disagree ({row['accuracy_rule']})" if "control_n" in row else "")
                + f": {row['why']}")
    prof = cpu_profile()
    choice = {"mode": "auto", "chosen": best["recipe"], "candidates": rows, "cached_measurement": cached,
              "case": case, "gates_judged": {**({"accuracy": acc_gates.text()} if judged else {}),
                                             **speed_gates(ctx.gates)},
              "accuracy_judged_on": (evidence.describe() if judged else "nothing: no accuracy gate or no control split"),
              "backup": backup["recipe"] if backup else None,
              "cpu_profile": prof, "int8_pays": best["speedup"] > 1.0, "meets_all": best["meets_speed"] and best[
                  "meets_accuracy"], "repair": best["meets_speed"] and not best["meets_accuracy"], "why": best["why"]}
    if not best["meets_speed"] and speed_gates(ctx.gates) and not ctx.emulated:
        choice["reason"] = reasons.speed_unreachable(ctx.target, ctx.ck.variant.name, rows, ctx.gates, prof)
        ctx.log(choice["reason"])
        ctx.notes.append(choice["reason"])
    return best["recipe"], choice


def cannot_win(row: dict, settled: dict | None, rows: list[dict]) -> str | None:
    """Why `row` need not be judged on the control split: a faster candidate (`settled`) meets every gate, and `row`
    is either clearly slower than it or declared after it, so `pick` can never take `row` (the fastest meeting every
    gate wins, a tie going to the declared order)."""
    if settled is None:
        return None
    if rows.index(row) > rows.index(settled):
        return f"not judged: {settled['recipe']!r}, faster and declared before it, meets every gate"
    vs = ratio_of_rounds(settled["rounds_data"], row["rounds_data"]) if "rounds_data" in row else None
    if vs is not None and vs.verdict == "slower":  # settled p50 / row p50 < 1 on the whole interval
        return f"not judged: clearly slower than {settled['recipe']!r}, which meets every gate"
    return None


def _why(row: dict, best: dict, judged: bool) -> str:
    if row is best:
        if row["meets_accuracy"] and row["meets_speed"]:
            return ("fastest meeting every gate (a candidate not clearly slower than the fastest, on the 95 % "
                    "interval of their paired rounds, is a tie: the declared order decides)")
        if row["meets_speed"]:
            return "meets the speed gates but not the accuracy gates: closest to them (the fallback repairs it)"
        return ("fastest meeting the accuracy gates, but no candidate meets the speed gates" if row["meets_accuracy"]
                else "closest to the accuracy gates; no candidate meets every gate")
    if not row["meets_speed"] and best["meets_speed"]:
        return f"misses the speed gates ({row['speedup']:.2f}× the reference)"
    if row.get("not_judged"):
        return row["not_judged"]
    if not row["meets_accuracy"]:
        return "misses the accuracy gates on the control split" if judged else "rejected"
    vs = row.get("vs_fastest") or {}
    if vs.get("verdict") != "slower":
        return (f"a tie with {best['recipe']} ({row['p50_ms']:.2f} vs {best['p50_ms']:.2f} ms, intervals overlap): "
                "the declared order decides")
    if "value" not in vs:
        return f"slower than {best['recipe']} ({row['p50_ms']:.2f} vs {best['p50_ms']:.2f} ms)"
    return (f"slower than {best['recipe']} ({row['p50_ms']:.2f} vs {best['p50_ms']:.2f} ms; ratio "
            f"{vs['value']:.2f}× [{vs['ci95'][0]:.2f}, {vs['ci95'][1]:.2f}])")


def numerics(ctx: Context, artifact) -> dict:
    """On which INT8 path the deployed artifact's accuracy was measured, whether its numerics differ on another
    (`saturates_without_vnni`: full 8-bit u8×s8 pairs, which VPMADDUBSW saturates at int16 on x86 without VNNI;
    `validate` reads it), and a warning where they do."""
    prof = cpu_profile()
    out = {"measured_on": prof["cpu"], "int8_path": prof["int8_path"], "path": prof["path"], "vnni": prof["vnni"]}
    check = ctx.target.saturates_without_vnni
    if artifact is None or check is None:
        return out
    out["saturates_without_vnni"] = saturates = bool(check(artifact))
    if saturates:
        out["warning"] = ("INT8 weights at full 8 bits: on an x86 CPU without VNNI (AVX2 only) their u8×s8 pair sums "
                          "saturate, so its accuracy there can be lower than measured here"
                          + (" (this CPU has no VNNI: the figures above include it)" if prof["u8s8_saturates"] else
                             "; `validate` on such a CPU fails with this reason")
                          + "; for such CPUs deploy there, or the candidate with 7-bit weights (--recipe)")
        ctx.notes.append(out["warning"])
    return out
