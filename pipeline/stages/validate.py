"""Stage 5: accuracy on the evaluation split (the checkpoint's own resolution, every runner on the same streamed
batches), latency (deployment and checkpoint resolutions, each batch size, every precision interleaved), the INT8
recipes compared, and what the fallback cost, re-measured."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from convnext_deploy.calibration.batches import iter_batches
from convnext_deploy.pipeline.measure.accuracy import accuracy, predict_many
from convnext_deploy.pipeline.measure.latency import Budget, measure, ratio
from convnext_deploy.pipeline.measure.memory import release_free_heap
from convnext_deploy.pipeline.measure.machine import device_label
from convnext_deploy.pipeline.measure.peak import model_macs
from convnext_deploy.pipeline.stages.build import Built, let_go, spread
from convnext_deploy.pipeline.stages.context import Context, runner_entry
from convnext_deploy.pipeline.stages.decide import Decision
from convnext_deploy.targets.base import Runner, inference_batch

PLAIN_INT8 = "int8 (all layers INT8, before the fallback)"


@dataclass
class Validation:
    accuracy: dict  # name → top-1/top-5/agreement/drop and what measured it
    latency: list[dict]  # one row per precision × input size × batch
    recipes: list[dict]  # the INT8 recipes compared (empty when none or not timed)
    time_split: dict | None = None  # where the time goes, per precision (targets with a profiler)


def speedup_interval(latency: list[dict], precision: str, size: int) -> dict | None:
    """`precision`'s speed-up over the reference at batch 1 with its 95 % interval, if it was measured."""
    return next((e.get("speedup_vs_reference") for e in latency if e["precision"] == precision and e["batch"] == 1
                 and e["input_size"] == size), None)


def p50(latency: list[dict], precision: str, size: int) -> float | None:
    """The batch-1 p50 of `precision` at `size`, if it was measured."""
    return next((e["p50_ms"] for e in latency if e["precision"] == precision and e["batch"] == 1
                 and e["input_size"] == size), None)


def torch_runner(model, threads: int) -> Runner:
    """Eager torch FP32: the reference every target's figures are also compared with."""
    torch.set_num_threads(threads)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return Runner(run, f"torch {torch.__version__} eager", device_label(threads), "fp32", threads)


def validate(ctx: Context, built: Built, decision: Decision) -> Validation:
    reference = torch_runner(ctx.ck.model, ctx.cfg.threads)
    preds = _predict(ctx, built, decision, reference)
    acc = _accuracy(ctx, built, preds, reference)
    let_go(ctx, built)  # the latency times fresh loads only, one set at a time: not beside the sessions held till now
    release_free_heap()  # those sessions, the passes' arenas and batches, freed
    latency = _latency(ctx, built, decision)
    release_free_heap()
    recipes = _compare_recipes(ctx, built, preds, decision.recipe)
    if decision.fallback is not None:
        _fallback_figures(ctx, decision.fallback, preds, latency)
    return Validation(acc, latency, recipes, _time_split(ctx, built))


def _time_split(ctx: Context, built: Built) -> dict | None:
    """Per-op time of the reference and the deployed INT8 at the deployment size, from the runtime's profiler:
    which ops INT8 made faster, and which (float ops, Q/DQ) it did not."""
    target, size = ctx.target, ctx.cfg.image_size
    if target.profile is None or "int8" not in built.artifacts or not built.runners["int8"].timed:
        return None
    split = {p: target.profile(built.artifacts[p], ctx.cfg.threads, size) for p in (target.reference, "int8")}
    ref, int8 = split[target.reference], split["int8"]
    kinds = ", ".join(f"{k} {v:.2f} ms" for k, v in int8["by_kind_ms"].items())
    ctx.log(f"where the time goes at {size}px: {target.reference} {ref['total_ms']:.2f} ms of kernels; int8 "
            f"{int8['total_ms']:.2f} ms ({kinds})")
    return split


def _predict(ctx: Context, built: Built, decision: Decision, reference: Runner) -> dict:
    """Every runner's top-5 on the evaluation split: the reference, the target's precisions and the all-INT8
    runner in one streamed pass; each other INT8 candidate in a pass of its own, loaded and released in turn, so
    one candidate's session is held at a time, not eight."""
    def batches():
        return iter_batches(ctx.eval_src, ctx.split.evaluation.indices, ctx.ck.preprocessing,
                            batch_size=inference_batch(ctx.ck.preprocessing.input_size), desc="evaluation")

    runners = {"torch_fp32": reference.run, **{p: r.run for p, r in built.runners.items()}}
    if decision.plain_runner is not None:
        runners["plain:int8"] = decision.plain_runner.run
    preds = predict_many(runners, batches())
    if not _alternatives_on_evaluation(ctx, decision.recipe):
        return preds
    for name, recipe in _others(built).items():
        preds.update(predict_many({f"alt:{name}": recipe.runner.run}, batches()))
        recipe.release()
    return preds


ALTERNATIVES_MACS = 1.5e12  # evaluation images × one image's MACs up to which every other candidate is evaluated too


def _alternatives_on_evaluation(ctx: Context, choice: dict | None) -> bool:
    """Whether the other INT8 candidates are evaluated on the evaluation split as well: always where that is cheap
    (Fashion-MNIST at 32 px: ConvNeXt-T's 9,000 images are 0.8 T multiply-accumulates); above it, where the recipe
    choice already judged them on the control split, its figures stand in, labelled (ConvNeXt-T at 224 px: seven more
    passes over 900 images, 4 T, took longer than the whole accuracy stage of the deployed artifact; ConvNeXt-XL's
    200 images are 12 T, 40 s a candidate at its INT8 speed on two cores). A candidate the recipe choice did not judge,
    since it could not win (`recipe.cannot_win`), is settled as well: its row says why, and it is not evaluated."""
    size = ctx.ck.preprocessing.input_size
    judged = (all("control_n" in r or r.get("not_judged") for r in (choice or {}).get("candidates", []))
              and (choice or {}).get("candidates"))
    return not judged or len(ctx.split.evaluation) * model_macs(ctx.ck.model, size) <= ALTERNATIVES_MACS


def _accuracy(ctx: Context, built: Built, preds: dict, reference: Runner) -> dict:
    size, base = ctx.ck.preprocessing.input_size, ctx.target.reference
    acc = {"torch_fp32": {**accuracy(preds["torch_fp32"]), **runner_entry(reference, "fp32"),
                          "input_size": size}}
    for p, r in built.runners.items():
        entry = {**accuracy(preds[p], preds[base] if p != base else None), **runner_entry(r, p)}
        vs_torch = accuracy(preds[p], preds["torch_fp32"])
        acc[p] = {**entry, "vs_torch": {"agreement": vs_torch["agreement"], "top1_drop_pp": vs_torch["top1_drop_pp"]},
                  "input_size": size}
    for p, a in acc.items():
        ctx.log(f"accuracy {p}: top-1 {a['top1'] * 100:.2f}%, top-5 {a['top5'] * 100:.2f}%"
                + (f", agreement {a['agreement'] * 100:.2f}%, drop {a['top1_drop_pp']:+.2f} pp" if "agreement" in a else ""))
    return acc


def _latency(ctx: Context, built: Built, decision: Decision) -> list[dict]:
    cfg, target = ctx.cfg, ctx.target
    timed = {p: (p, r) for p, r in built.runners.items() if r.timed}
    loads = {p: built.artifacts[p] for p in timed}
    if target.extra_runners is not None:  # e.g. Core ML on CPU_ONLY beside ALL
        timed.update({f"{p} ({label})": (p, r) for p, a in built.artifacts.items()
                      for label, r in target.extra_runners(a, cfg.threads).items()})
    if decision.plain_runner is not None and decision.plain_runner.timed:  # the fallback's cost, in the same rounds
        timed[PLAIN_INT8] = ("int8", decision.plain_runner)
        loads.update({PLAIN_INT8: decision.plain} if decision.plain is not None else {})
    untimed = [p for p, r in built.runners.items() if not r.timed]
    if untimed:
        ctx.notes.append(f"latency not measured for {', '.join(untimed)}: "
                         f"{built.runners[untimed[0]].proxy} runs on this CPU, and its speed says nothing about the target")
    rows = []
    for size in sorted({cfg.image_size, ctx.ck.preprocessing.input_size}) if timed else ():
        for batch in cfg.batch_sizes:
            runs = cfg.latency_runs if batch == 1 else max(10, cfg.latency_runs // 4)
            res = measure({k: None if k in loads else r for k, (_, r) in timed.items()}, batch=batch,
                          input_size=size, runs=runs, warmup=5 if batch == 1 else 2, rounds=6, spread=spread(ctx, loads),
                          budget=Budget(cfg.timing_budget_s, extend=False))
            ref = res.get(target.reference)
            for k, lat in res.items():
                vs = ratio(ref, lat) if ref is not None and k != target.reference else None
                rows.append({"precision": k, **lat.to_dict(), **runner_entry(timed[k][1], timed[k][0]),
                             "role": "deployment" if size == cfg.image_size else "checkpoint",
                             **({"speedup_vs_reference": vs.to_dict()} if vs else {})})
                ctx.log(f"latency {k} {size}px b{batch}: p50 {lat.p50_ms:.2f} ms [{lat.p50_ci_ms[0]:.2f}, "
                        f"{lat.p50_ci_ms[1]:.2f}], {lat.images_per_s:.1f} img/s"
                        + (f", {vs.text()} vs {target.reference}" if vs else ""))
    if rows and target.gemm_peak:
        _distance_to_peak(ctx, rows)
    return rows


def _distance_to_peak(ctx: Context, rows: list[dict]) -> None:
    """Each batch-1 deployment row's effective MAC rate as a fraction of the runtime's peak of the precision it
    executes (pipeline.measure.peak: measured once per CPU, threads and runtime); above the peak, a bad peak."""
    from convnext_deploy.pipeline.measure.peak import fraction, runtime_peak
    from convnext_deploy.reports.cells import rate_vs_peak

    peak = runtime_peak(ctx.target, ctx.cfg.threads, ctx.log)
    macs = model_macs(ctx.ck.model, ctx.cfg.image_size)
    for row in rows:
        if row["batch"] == 1 and row["role"] == "deployment":
            f = fraction(macs, row["p50_ms"], peak, row["precision"].split()[0])
            if f:
                row["mac_rate"] = {**f, "macs": macs}
                ctx.log(f"{row['precision']}: {rate_vs_peak(f, named=True)} ({f['peak']})")


def _others(built: Built) -> dict:
    """The INT8 candidates other than the one deployed as "int8"."""
    final = built.finished_from.get("int8", built.artifacts.get("int8"))
    return {n: r for n, r in built.recipes.items() if final is None or r.artifact.files != final.files}


def _compare_recipes(ctx: Context, built: Built, preds: dict, choice: dict | None) -> list[dict]:
    """Every INT8 candidate: accuracy on the evaluation split, p50 at the deployment size, batch 1, interleaved
    with the reference in one measurement: the recipe choice's own (same artifacts, same CPU) where it timed them,
    else measured here. The chosen one is `deployed`; where layers went back to float after the choice
    (latency-aware precision, the accuracy fallback) its row is the candidate as built, and the deployed artifact
    is the "int8" row of the latency and accuracy tables."""
    runners, alt, chosen = built.runners, _others(built), (choice or {}).get("chosen")
    if len(built.recipes) < 2 or not runners["int8"].timed:
        return []
    cfg, ref = ctx.cfg, ctx.target.reference
    timed = {r["recipe"]: r for r in (choice or {}).get("candidates", []) if "p50_ms" in r}
    if set(timed) != set(built.recipes):
        loads = spread(ctx, {ref: built.artifacts[ref], "int8": built.artifacts["int8"],
                             **{n: r.artifact for n, r in alt.items()}})
        lat = measure(dict.fromkeys(loads.loaders), batch=1, input_size=cfg.image_size, runs=cfg.latency_runs,
                      warmup=5, rounds=6, spread=loads,
                      budget=Budget(cfg.timing_budget_s, extend=False))
        timed = {name: {"p50_ms": lat[name if name in alt else "int8"].p50_ms, "reference_p50_ms": lat[ref].p50_ms,
                        "measured": "here"} for name in built.recipes}
    rows = []
    judged = {r["recipe"]: r for r in (choice or {}).get("candidates", [])}
    for name, recipe in built.recipes.items():
        art, t = recipe.artifact, timed[name]
        key = f"alt:{name}" if name in alt else "int8"
        if key not in preds and "control_n" not in judged.get(name, {}):
            continue  # neither evaluated nor judged: it could not win (the recipe choice's table says why)
        a = accuracy(preds[key], preds[ref]) if key in preds else _control_figures(judged[name])
        ops = art.metadata.get("ops", {})
        rows.append({"recipe": name, "options": art.metadata.get("quantization", {}), "top1": a["top1"],
                     "top1_drop_pp": a["top1_drop_pp"], "agreement": a["agreement"], "n": a["n"],
                     "drop_images": a["drop_images"], "agree": a["agree"], "split": a.get("split", "evaluation"),
                     "p50_ms": t["p50_ms"], "fp32_p50_ms": t["reference_p50_ms"],
                     "int8_speedup": t["reference_p50_ms"] / t["p50_ms"], "input_size": cfg.image_size, "batch": 1,
                     "threads": cfg.threads, "integer_kernels": ops.get("integer_kernels"),
                     "float_conv_matmul_left": ops.get("float_conv_matmul_left"),
                     "timed_in": t.get("measured", "the recipe choice (same artifacts, CPU and harness)"),
                     "runtime": runners[ref].runtime, "kind": "real", "deployed": name == chosen,
                     **({"deployed_with_float_layers": True} if name == chosen and name in alt else {})})
        ctx.log(f"recipe {name}: top-1 drop {a['drop_images']} of {a['n']:,} {rows[-1]['split']} images "
                f"({a['top1_drop_pp']:+.2f} pp), p50 {t['p50_ms']:.2f} ms ({rows[-1]['int8_speedup']:.2f}× {ref})")
    return rows


def _control_figures(row: dict) -> dict:
    """A candidate's figures as the recipe choice measured them on the control split (see
    `_alternatives_on_evaluation`)."""
    n = row["control_n"]
    return {"top1": row["control_top1"], "top1_drop_pp": row["control_drop_pp"], "agreement": row["control_agreement"],
            "n": n, "drop_images": row["control_drop_images"], "agree": n - row["control_disagreements"],
            "split": "control"}


def _fallback_figures(ctx: Context, fallback: dict, preds: dict, latency: list[dict]) -> None:
    """Plain vs final INT8 re-measured on the evaluation split, and the p50 the fallback cost."""
    base, size = ctx.target.reference, ctx.cfg.image_size
    if "plain:int8" in preds:
        plain = accuracy(preds["plain:int8"], preds[base])
        final = accuracy(preds["int8"], preds[base])
        fallback["evaluation"] = {"plain_top1_drop_pp": plain["top1_drop_pp"], "final_top1_drop_pp": final["top1_drop_pp"],
                                  "plain_agreement": plain["agreement"], "final_agreement": final["agreement"],
                                  "n": final["n"]}
        ctx.log(f"fallback on the evaluation split: top-1 drop {plain['top1_drop_pp']:+.2f} pp (all INT8) → "
                f"{final['top1_drop_pp']:+.2f} pp ({len(fallback['float_layers'])} layers in float)")
    plain_ms, final_ms = p50(latency, PLAIN_INT8, size), p50(latency, "int8", size)
    if plain_ms and final_ms:
        fallback["latency"] = {"plain_p50_ms": plain_ms, "final_p50_ms": final_ms, "cost": final_ms / plain_ms,
                               "input_size": size, "batch": 1}
        ctx.log(f"fallback latency cost: p50 {plain_ms:.2f} → {final_ms:.2f} ms ({final_ms / plain_ms:.2f}×)")
