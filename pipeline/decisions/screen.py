"""Part of stage 3 (build): which INT8 candidates of a large variant are worth a full build and a full timing.

A candidate's speed comes from the kernels its settings give each kind of layer (integer MatMul or not, a fused
LayerNorm or a chain of float ops, 7- or 8-bit weights), and every block of a stage is the same kind of layer.
So every candidate is built and timed first on the variant's screen slice: the checkpoint's own stem, the first
block(s) of each stage and the head (`convnext.truncated`), at the deployment size, calibrated on a few of the
calibration images, interleaved with the slice in the reference precision. ConvNeXt-B's slice has 6 of its 36
blocks. Only the candidates that can win get the full build and the recipe choice's timing: those within
`MARGIN` of the slice's fastest, at most `SHORTLIST` of them, and the target's default (ours) always, which the
deploy validates whatever is chosen. The screen's measurement is kept in the report as the evidence.

Small variants are not screened (`applies`): their full builds cost seconds, and a slice would cost as much.
"""
from __future__ import annotations

from dataclasses import replace

from convnext_deploy.pipeline.core.cache import key_of
from convnext_deploy.pipeline.measure.latency import Budget, measure, ratio
from convnext_deploy.pipeline.measure.memory import release_free_heap
from convnext_deploy.pipeline.models.convnext import count_parameters, truncated
from convnext_deploy.pipeline.models.onnx_export import export_cached
from convnext_deploy.pipeline.stages.context import DEFAULT, Context
from convnext_deploy.targets.base import CalibrationData

SLICE_DEPTHS = (1, 1, 3, 1)  # blocks kept per stage (at most the variant's): stage 3 weighs most in every variant
MIN_PARAMETERS = 40_000_000  # screened from ConvNeXt-S up (50 M); T (28 M) and smaller build every candidate
MARGIN = 0.10  # within 10 % of the slice's fastest p50: the full model may still order them the other way
SHORTLIST = 2  # the most candidates besides the default that get a full build
SLICE_CALIBRATION = 16  # calibration images of the slice's builds (ranges for speed, not for accuracy)


def applies(ctx: Context) -> bool:
    """Screen where the deploy chooses among timed candidates of a large variant."""
    cfg = ctx.cfg
    if cfg.screen is not None:
        return cfg.screen and cfg.alternatives and cfg.recipe == "auto"
    return (cfg.alternatives and cfg.recipe == "auto" and ctx.availability.ok and not ctx.emulated
            and count_parameters(ctx.ck.model) >= MIN_PARAMETERS)


def shortlist(ctx: Context, reference_source, inputs: list[tuple], build_one, formed) -> tuple[list[tuple], dict]:
    """(the candidate inputs to build in full, the screen's record). `inputs`: (name, source, form, options) as
    `stages.build` builds them; `reference_source`: the plain source, whose slice is the reference."""
    depths = tuple(min(a, b) for a, b in zip(ctx.ck.model.depths, SLICE_DEPTHS))
    n = min(SLICE_CALIBRATION, len(ctx.calibration.images))
    small = CalibrationData(ctx.calibration.images[:n], f"{ctx.calibration.manifest_sha256}:first-{n}",
                            ctx.calibration.source)
    sctx = replace(ctx, calibration=small)
    sliced: dict[str, object] = {}

    def slice_of(source):
        if source.key not in sliced:
            model = truncated(source.model, depths)
            key = key_of("screen-slice", source.key, depths)
            exported = export_cached(model, key, ctx.ck.variant.name, small.images[:4], form=source.form, log=ctx.log)
            sliced[source.key] = type(source)(model, exported.path, key, source.form)
        return sliced[source.key]

    reference = build_one(sctx, slice_of(reference_source), ctx.target.reference, ctx.options)
    artifacts = {name: build_one(sctx, formed(sctx, slice_of(source), form), "int8", options)
                 for name, source, form, options in inputs}
    load = ctx.target.load_runner
    runners = {"reference": load(reference, ctx.cfg.threads), **{k: load(a, ctx.cfg.threads) for k, a in artifacts.items()}}
    lat = measure(runners, batch=1, input_size=ctx.cfg.image_size, runs=60, warmup=3, rounds=6,
                  budget=Budget(min(ctx.cfg.timing_budget_s, 30.0), extend=False))
    del runners
    release_free_heap()
    fastest = min(lat[k].p50_ms for k in artifacts)
    ranked = sorted(artifacts, key=lambda k: lat[k].p50_ms)
    can_win = [k for k in ranked if lat[k].p50_ms <= fastest * (1 + MARGIN)][:SHORTLIST]
    keep = [k for k in artifacts if k == DEFAULT or k in can_win]
    rows = []
    for k in artifacts:
        r = ratio(lat["reference"], lat[k])
        why = ("the default: always built" if k == DEFAULT and k not in can_win else
               f"within {MARGIN:.0%} of the fastest" if k in can_win else
               f"{lat[k].p50_ms / fastest:.2f}× the fastest's time" if lat[k].p50_ms > fastest * (1 + MARGIN) else
               f"within {MARGIN:.0%}, but {SHORTLIST} faster ones are kept")
        rows.append({"recipe": k, "p50_ms": lat[k].p50_ms, "p50_ci_ms": lat[k].p50_ci_ms, "speedup": r.value,
                     "speedup_ci95": [r.low, r.high], "rounds": lat[k].rounds, "built_in_full": k in keep, "why": why})
        ctx.log(f"screen {k}: p50 {lat[k].p50_ms:.2f} ms on the slice ({r.text()} vs its "
                f"{ctx.target.reference}): {'full build' if k in keep else 'not built'} ({why})")
    record = {"slice_depths": list(depths), "variant_depths": list(ctx.ck.model.depths),
              "slice_parameters": count_parameters(sliced[reference_source.key].model),
              "calibration_images": n, "input_size": ctx.cfg.image_size, "batch": 1, "margin": MARGIN,
              "shortlist": SHORTLIST, "reference_p50_ms": lat["reference"].p50_ms, "candidates": rows,
              "method": "each candidate built on the slice and timed interleaved with the slice's reference on this "
                        "CPU; kept for a full build: the default, and those within the margin of the fastest"}
    return [i for i in inputs if i[0] in keep], record
