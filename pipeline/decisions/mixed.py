"""Part of stage 4 (decide): latency-aware mixed precision. Which layers INT8 does not pay for on this CPU, by the
target's own profiler, and whether keeping them in float makes the deployed model faster, measured.

Per layer: the INT8 artifact's kernel time plus the QuantizeLinear that feeds it, against the same layer's kernel
in the reference graph (both profiled at the deployment size, batch 1, on this CPU). The layers where INT8 is not
faster are built back in float and the result is timed against the all-INT8 artifact in interleaved rounds; it is
kept only when its 95 % interval says it is faster. A per-layer profile cannot see what floating a layer does to
its neighbours (a float layer inside a Q/DQ graph may lose the layout the float graph gives it), so the end-to-end
measurement decides, never the sum of kernel times.
"""
from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

from convnext_deploy.pipeline.core.cache import cached_dir, code_digest, key_of
from convnext_deploy.pipeline.measure.latency import Budget, measure, ratio
from convnext_deploy.pipeline.measure.machine import cpu_profile
from convnext_deploy.pipeline.models.convnext import weight_layers
from convnext_deploy.pipeline.stages.build import Built, Recipe, build_one, let_go, spread
from convnext_deploy.pipeline.stages.context import Context


def layer_times(ctx: Context, built: Built, chosen: Recipe) -> dict:
    """Per weight layer, in network order: reference and INT8 time (ms) at the deployment size, batch 1."""
    target, size = ctx.target, ctx.cfg.image_size
    ref = target.profile(built.artifacts[target.reference], ctx.cfg.threads, size)
    int8 = target.profile(chosen.artifact, ctx.cfg.threads, size)
    pairs = _pairs([n for n, _ in weight_layers(ctx.ck.model)], ref.get("layers", []), int8.get("layers", []))
    if not pairs:
        return {"rows": [], "why": f"the profiles' weight-layer kernels ({len(ref.get('layers', []))} "
                                   f"{target.reference}, {len(int8.get('layers', []))} int8) cannot be paired with "
                                   "the model's layers: no per-layer comparison"}
    rows = [{"layer": n, "op": q["op"], "reference_ms": r["ms"], "int8_ms": q["ms"],
             "input_quantize_ms": q["input_quantize_ms"], "int8_pays": q["ms"] < r["ms"]} for n, r, q in pairs]
    return {"rows": rows, "input_size": size, "batch": 1, "threads": ctx.cfg.threads, "source": int8["source"],
            "paired": f"{len(rows)} of {len(ref.get('layers', []))} layers"}


def _pairs(names: list[str], ref: list[dict], int8: list[dict]) -> list[tuple]:
    """(checkpoint name, reference kernel, INT8 kernel): by execution order where every graph has one kernel per
    layer (ONNX Runtime renames fused nodes), else by node name where the runtime keeps names (OpenVINO), for the
    layers it did not fuse into a larger kernel."""
    if len(ref) == len(int8) == len(names):
        return list(zip(names, ref, int8))
    if len(ref) != len(names):
        return []
    by_node = {q["node"]: q for q in int8}
    return [(n, r, by_node[r["node"]]) for n, r in zip(names, ref) if r["node"] in by_node]


def mix(ctx: Context, built: Built, chosen: Recipe) -> tuple[dict | None, Recipe | None]:
    """(the record for the report, the mixed candidate when it is measurably faster than all-INT8). The record is
    cached per CPU profile, artifacts and code, as the recipe choice is."""
    target, cfg = ctx.target, ctx.cfg
    # one runtime times all or none (decisions.recipe): the deploy's own INT8 runner says, where asking the chosen
    # candidate would load it and hold it beside the rebuild below
    if target.profile is None or not built.runners["int8"].timed or "float_layers" not in vars(chosen.options):
        return None, None
    key = key_of("latency-aware-mixed", cpu_profile(), cfg.threads, cfg.image_size, cfg.latency_runs,
                 code_digest(target.module, "convnext_deploy.pipeline.measure.latency", __name__), chosen.artifact.sha256(),
                 built.artifacts[target.reference].sha256())
    directory, cached = cached_dir("mixed", key, lambda tmp: (tmp / "mixed.json").write_text(
        json.dumps(_measure(ctx, built, chosen), indent=1)), log=ctx.log)
    record = {**json.loads((directory / "mixed.json").read_text()), "cached_measurement": cached}
    ctx.log(f"latency-aware precision: {record['why']}" + (" (measurement reused from the cache)" if cached else ""))
    if not record["kept"]:
        return record, None
    options = with_float(chosen.options, record["float_layers"])
    artifact = build_one(ctx, chosen.source, "int8", options)
    return record, Recipe(chosen.source, options, artifact, partial(target.load_runner, artifact, cfg.threads))


def with_float(options, layers):
    """The options with `layers` also in float (those already float stay so)."""
    return replace(options, float_layers=tuple(dict.fromkeys((*options.float_layers, *layers))))


def _measure(ctx: Context, built: Built, chosen: Recipe) -> dict:
    target, cfg = ctx.target, ctx.cfg
    times = layer_times(ctx, built, chosen)
    slower = [r["layer"] for r in times["rows"] if not r["int8_pays"]]
    record = {"layers": times, "float_layers": slower, "kept": False}
    if not slower:
        record["why"] = times.get("why") or "INT8 is faster than the reference in every layer"
        return record
    # the rebuild's forked child adds its peak to what this process holds, and the harness loads its instances, each
    # for its own rounds: the sessions go first (each loads again when next run)
    let_go(ctx, built)
    artifact = build_one(ctx, chosen.source, "int8", with_float(chosen.options, slower))
    lat = measure({"all int8": None, "mixed": None}, batch=1, input_size=cfg.image_size,
                  runs=max(20, cfg.latency_runs), warmup=5, rounds=12, budget=Budget(cfg.timing_budget_s),
                  spread=spread(ctx, {"all int8": chosen.artifact, "mixed": artifact}))
    gain = ratio(lat["all int8"], lat["mixed"])
    record.update(gain=gain.to_dict(), all_int8_p50_ms=lat["all int8"].p50_ms, mixed_p50_ms=lat["mixed"].p50_ms,
                  kept=gain.verdict == "faster")
    record["why"] = (f"{len(slower)} layer(s) where INT8 is not faster kept in float: {gain.text()} the all-INT8 "
                     f"speed ({lat['all int8'].p50_ms:.2f} → {lat['mixed'].p50_ms:.2f} ms), "
                     + ("kept" if record["kept"] else "not kept (not measurably faster end to end)"))
    return record
