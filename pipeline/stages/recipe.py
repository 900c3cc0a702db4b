"""Part of stage 4 (decide): which INT8 recipe to deploy, chosen by measurement on the CPU the deploy runs on.

Every candidate the target declares (ours, the peer's default, the other settings, ours without outlier
smoothing) is timed at the deployment size, batch 1, interleaved with the reference precision, and judged on the
control split against the accuracy gates (on their one-sided 95 % bounds). `auto` keeps the fastest that meets
them. INT8 speed and even INT8 numerics depend on the CPU (U8S8 saturates without VNNI), so the measurement is
cached per CPU profile and artifact, not per target.
"""
from __future__ import annotations

import json

from pipeline import fallback as fb
from pipeline.cache import cached_dir, code_digest, key_of
from pipeline.errors import UserError
from pipeline.latency import Budget, measure, ratio, ratio_of_rounds
from pipeline.machine import cpu_profile
from pipeline.stages.build import Built, spread
from pipeline.stages.context import DEFAULT, Context

BUDGET_S = 60.0  # extra interleaved rounds until every candidate's speed-up is within ±3 % (95 % interval)


def _measure(ctx: Context, built: Built) -> list[dict]:
    """p50 of every candidate and the reference in one interleaved measurement, and each one's control figures."""
    ref = built.runners[ctx.target.reference]
    runs = max(20, ctx.cfg.latency_runs)
    loads = spread(ctx, {"reference": built.artifacts[ctx.target.reference],
                         **{n: r.artifact for n, r in built.recipes.items()}})
    lat = measure({"reference": ref, **{n: r.runner for n, r in built.recipes.items()}}, batch=1,
                  input_size=ctx.cfg.image_size, runs=runs, warmup=5, rounds=12, budget=Budget(BUDGET_S),
                  spread=loads)
    reference = fb.judge(ref, ctx.control) if ctx.control is not None else None
    rows = []
    for name, r in built.recipes.items():
        speedup = ratio(lat["reference"], lat[name])
        row = {"recipe": name, "p50_ms": lat[name].p50_ms, "p50_ci_ms": lat[name].p50_ci_ms,
               "reference_p50_ms": lat["reference"].p50_ms, "speedup": speedup.value, "speedup_ci95": [speedup.low, speedup.high],
               "runs": lat[name].runs, "rounds": lat[name].rounds, "instances": lat[name].instances,
               "disturbed_rounds": lat[name].disturbed_rounds, "rounds_data": lat[name].rounds_data()}
        if reference is not None:
            row.update(fb.judge(r.runner, ctx.control, reference).figures())
        rows.append(row)
    return rows


def _cached_measure(ctx: Context, built: Built) -> tuple[list[dict], bool]:
    # the runners' code and the harness shape the figures as much as the artifacts do
    key = key_of("recipe-choice", cpu_profile(), ctx.cfg.threads, ctx.cfg.image_size, ctx.cfg.latency_runs,
                 code_digest(ctx.target.module, "pipeline.latency", "pipeline.fallback", __name__),
                 {n: r.artifact.sha256() for n, r in built.recipes.items()},
                 built.artifacts[ctx.target.reference].sha256(), ctx.control.ids_sha256 if ctx.control else None)

    def write(tmp) -> None:
        (tmp / "choice.json").write_text(json.dumps(_measure(ctx, built), indent=1))

    directory, cached = cached_dir("recipe-choice", key, write, log=ctx.log)
    return json.loads((directory / "choice.json").read_text()), cached


def choose(ctx: Context, built: Built) -> tuple[str, dict | None]:
    """(name of the recipe to deploy, the choice as the report shows it; None when nothing was chosen)."""
    cfg, recipes = ctx.cfg, built.recipes
    if cfg.recipe not in ("auto", *recipes):  # prepare checked the name; smoothing off makes that one absent
        raise UserError(f"--recipe {cfg.recipe!r} was not built here (outlier smoothing is off); choose auto or one of: "
                        + ", ".join(repr(n) for n in recipes))
    timed = all(r.runner.timed for r in recipes.values()) and built.runners[ctx.target.reference].timed
    if cfg.recipe != "auto" or not timed or not recipes:
        name = DEFAULT if cfg.recipe == "auto" else cfg.recipe
        why = "named with --recipe" if cfg.recipe != "auto" else (
            "the only candidate" if len(recipes) < 2 else "not timed here (a proxy): the target's default")
        return name, ({"mode": cfg.recipe, "chosen": name, "why": why, "candidates": []} if recipes else None)
    rows, cached = _cached_measure(ctx, built)
    gates = fb.FallbackConfig(float(ctx.gates.get("max_top1_drop_pp", float("inf"))), ctx.gates.get("min_agreement"))
    judged = ctx.control is not None and ("max_top1_drop_pp" in ctx.gates or "min_agreement" in ctx.gates)
    resolution = None
    if judged and DEFAULT in {r["recipe"] for r in rows}:  # settled once, on the default, for every decision
        gates, resolution = fb.resolve_drop(gates, next(r for r in rows if r["recipe"] == DEFAULT))
        if resolution:
            ctx.log(f"NOTE: {resolution}")
            ctx.notes.append(resolution)
    for row in rows:
        row["meets_accuracy"] = not judged or not fb.misses(gates, row)
    meeting = [r for r in rows if r["meets_accuracy"]]
    if meeting:  # not clearly slower than the fastest is a tie on this machine: the declared order (ours first) decides
        fastest = min(meeting, key=lambda r: r["p50_ms"])
        for r in meeting:
            r["vs_fastest"] = ratio_of_rounds(fastest["rounds_data"], r["rounds_data"]).to_dict()  # < 1: r is slower
        best = next(r for r in meeting if r is fastest or r["vs_fastest"]["verdict"] != "slower")
    else:
        best = min(rows, key=lambda r: fb.score(gates, r))
    for row in rows:
        row.pop("rounds_data", None)
        row["chosen"] = row is best
        row["why"] = _why(row, best, judged)
        ctx.log(f"recipe {row['recipe']}: p50 {row['p50_ms']:.2f} ms ({row['speedup']:.2f}× {ctx.target.reference})"
                + (f", control {fb.figures_text_of(row)}" if judged else "") + f": {row['why']}")
    prof = cpu_profile()
    choice = {"mode": "auto", "chosen": best["recipe"], "candidates": rows, "cached_measurement": cached,
              "accuracy_judged_on": (f"control split ({len(ctx.control.images)} images), 95 % bounds"
                                     if judged else "nothing: no accuracy gate or no control split"),
              "cpu_profile": prof, "int8_pays": best["speedup"] > 1.0, "drop_resolution": resolution,
              "why": best["why"]}
    if not choice["int8_pays"]:
        choice["reason"] = (f"INT8 is not faster than {ctx.target.reference.upper()} on {prof['cpu']} ({prof['int8_path']}): "
                            f"best candidate {best['recipe']} {best['speedup']:.2f}×; keep {ctx.target.reference.upper()} "
                            "here or target a CPU with VNNI")
        ctx.log(choice["reason"])
        ctx.notes.append(choice["reason"])
    return best["recipe"], choice


def _why(row: dict, best: dict, judged: bool) -> str:
    if row is best:
        return ("fastest meeting the accuracy gates (a candidate not clearly slower than the fastest, on the 95 % "
                "interval of their paired rounds, is a tie: the declared order decides)" if row["meets_accuracy"] else
                "none meets the accuracy gates: closest to them (the fallback takes it from here)")
    if not row["meets_accuracy"]:
        return "misses the accuracy gates on the control split" if judged else "rejected"
    vs = row.get("vs_fastest") or {}
    if vs.get("verdict") != "slower":
        return (f"a tie with {best['recipe']} ({row['p50_ms']:.2f} vs {best['p50_ms']:.2f} ms, intervals overlap): "
                "the declared order decides")
    return (f"slower than {best['recipe']} ({row['p50_ms']:.2f} vs {best['p50_ms']:.2f} ms; ratio "
            f"{vs['value']:.2f}× [{vs['ci95'][0]:.2f}, {vs['ci95'][1]:.2f}])")


def numerics(ctx: Context, artifact) -> dict:
    """On which INT8 path the deployed artifact's accuracy was measured, and a warning where its numerics differ
    on another: u8 activations × s8 weights at full 8 bits saturate in VPMADDUBSW on CPUs without VNNI."""
    prof = cpu_profile()
    q = (artifact.metadata or {}).get("quantization", {}) if artifact is not None else {}
    out = {"measured_on": prof["cpu"], "int8_path": prof["int8_path"], "vnni": prof["vnni"]}
    if q.get("activation_type") == "QUInt8" and q.get("weight_type") == "QInt8" and not q.get("reduce_range"):
        out["warning"] = ("U8S8 at full 8-bit weights: on a CPU without VNNI (AVX2 only) its u8×s8 pair sums saturate, "
                          "so its accuracy there can be lower than measured here"
                          + ("" if prof["vnni"] else " (this CPU has no VNNI: the figures above include it)")
                          + "; for such CPUs deploy the reduce_range or U8U8 candidate (--recipe)")
        ctx.notes.append(out["warning"])
    return out
