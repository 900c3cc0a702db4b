"""Stage 4: decisions taken on the control split, never on the evaluation split. First the INT8 recipe, by
measured speed on this CPU and control-split accuracy (stages.recipe). When it still misses the accuracy gates
there, layers go back to float by measured sensitivity (pipeline.fallback); on a target with its own accuracy
control (OpenVINO: nncf.quantize_with_accuracy_control) that is built too, and the faster of those meeting the
bound is kept."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from pipeline import fallback as fb
from pipeline.errors import UserError
from pipeline.latency import measure
from pipeline.stages import mixed, recipe
from pipeline.stages.build import Built, Recipe, build_one
from pipeline.stages.context import DEFAULT, Context
from pipeline.stages.export import Source
from targets.base import Artifact, Runner


@dataclass
class Decision:
    recipe: dict | None  # which INT8 recipe and why (None: the target has no INT8)
    fallback: dict | None  # layers back to float and why, for the report (None: no such decision was asked for)
    int8: Artifact | None = None  # the INT8 artifact to validate instead of the plain one (None: keep it)
    int8_runner: Runner | None = None
    plain_runner: Runner | None = None  # the all-INT8 runner, when the decision changed it: measured beside the final
    plain: Artifact | None = None  # its artifact


def sensitivity(ctx: Context, src: Source, built: Built, n_images: int) -> dict:
    """Per-layer sensitivity of the INT8 artifact on the first `n_images` calibration images."""
    from calibration.batches import load_array
    from pipeline import sensitivity as sens

    images, _ = load_array(ctx.calib_src, list(ctx.split.calibration.indices)[:n_images], ctx.ck.preprocessing,
                           desc="sensitivity slice")
    # the float graph the INT8 artifact was quantized from (smoothed weights included)
    reference = (Artifact(ctx.target.name, "fp32", [src.onnx_path]) if src.onnx_path is not None
                 else built.artifacts[ctx.target.reference])
    result = sens.measure(ctx.target, reference, built.artifacts["int8"], images, src.model, ctx.calibration,
                          ctx.cfg.threads, ctx.log)
    result["source"] = ctx.calib_src.name
    return result


def decide(ctx: Context, built: Built) -> Decision:
    if not built.recipes:
        return Decision(None, None)
    name, choice = recipe.choose(ctx, built)
    chosen = built.recipes[name]
    if choice is not None and choice["mode"] == "auto":  # layers INT8 does not pay for on this CPU, back in float
        choice["mixed"], faster = mixed.mix(ctx, built, chosen)
        chosen = faster or chosen
    if chosen is not built.recipes[DEFAULT]:
        built = replace(built, artifacts={**built.artifacts, "int8": chosen.artifact},
                        runners={**built.runners, "int8": chosen.runner})
    fallback, final = _fallback(ctx, chosen, built, choice)
    if final is not None:
        return Decision(choice, fallback, final, ctx.target.load_runner(final, ctx.cfg.threads), chosen.runner,
                        chosen.artifact)
    if chosen is not built.recipes[DEFAULT]:
        return Decision(choice, fallback, chosen.artifact, chosen.runner)
    return Decision(choice, fallback)


def _fallback(ctx: Context, chosen: Recipe, built: Built, choice: dict | None) -> tuple[dict | None, Artifact | None]:
    """(the fallback's record, the artifact with layers in float, if it changed the chosen one). Whether the drop
    is held on its bound was settled by the recipe choice, where it measured one; else here, once."""
    if not ctx.fallback_on or ctx.control is None:
        return None, None
    target, cfg, log, control = ctx.target, ctx.cfg, ctx.log, ctx.control
    fcfg = fb.FallbackConfig(float(ctx.gates["max_top1_drop_pp"]), ctx.gates.get("min_agreement"),
                             cfg.fallback_max_layers, cfg.fallback_max_minutes)
    reference = fb.judge(built.runners[target.reference], control)
    plain = fb.judge(chosen.runner, control, reference)
    if choice and "drop_resolution" in choice:
        resolution = choice["drop_resolution"]
        fcfg = replace(fcfg, drop_bound=resolution is None)
    else:
        fcfg, resolution = fb.resolve_drop(fcfg, plain.figures())
        if resolution:
            log(f"NOTE: {resolution}")
    out = {"bound_pp": fcfg.max_drop_pp, "min_agreement": fcfg.min_agreement, "drop_decided_on_bound": fcfg.drop_bound,
           "drop_resolution": resolution,
           "control": {"source": ctx.split.control.source, "n": len(ctx.split.control),
                       "ids_sha256": ctx.split.control.ids_sha256},
           "reference_control_top1": reference.top1, "plain_control_drop_pp": plain.drop_pp,
           "plain_control_agreement": plain.agreement, "plain_control": plain.figures(),
           "triggered": fb.misses(fcfg, plain.figures()),
           "float_layers": [], "budget": {"max_float_layers": cfg.fallback_max_layers,
                                          "max_minutes": cfg.fallback_max_minutes}}
    log(f"fallback: plain INT8 on {len(control.images)} control images: {fb.figures_text(plain)} "
        f"({fb.bound_text(fcfg)}){'' if out['triggered'] else ': no layer needs float'}")
    if not out["triggered"]:
        return out, None
    if target.layer_probe is None:
        raise UserError(f"the INT8 artifact misses the accuracy gates on the control split and {target.name} "
                        "has no per-layer sensitivity to rank layers by; pass --no-fallback")
    out["sensitivity"] = sensitivity(ctx, chosen.source, built, min(max(cfg.sensitivity, 256), len(ctx.split.calibration)))

    def rebuild(layers: list[str]) -> tuple[Artifact, Runner]:
        art = build_one(ctx, chosen.source, "int8", mixed.with_float(chosen.options, layers))  # latency-aware ones stay
        return art, target.load_runner(art, cfg.threads)

    res = fb.search(rebuild, out["sensitivity"]["ranking"], control, reference, (chosen.artifact, chosen.runner),
                    fcfg, log)
    out.update(res.to_dict(), method="layers back to float by measured sensitivity")
    final = res.artifact
    if target.accuracy_control:
        final, out["float_layers"] = _compare_accuracy_control(ctx, chosen, res, out, fcfg, reference)
    return out, (final if out["float_layers"] else None)


def _compare_accuracy_control(ctx: Context, chosen: Recipe, res: fb.FallbackResult, out: dict,
                              fcfg: fb.FallbackConfig, reference: fb.Judged) -> tuple[Artifact, list[str]]:
    """Our fallback next to the target's own accuracy control: both judged on the same control split, the
    faster one at the deployment size (batch 1, interleaved) kept among those that meet the bound."""
    target, cfg = ctx.target, ctx.cfg
    t0 = time.monotonic()
    ac = build_one(ctx, chosen.source, "int8", replace(chosen.options, accuracy_control=fcfg.max_drop_pp / 100.0),
                   ctx.control)
    ac_seconds = time.monotonic() - t0
    ac_runner, ours_runner = target.load_runner(ac, cfg.threads), target.load_runner(res.artifact, cfg.threads)
    ac_j = fb.judge(ac_runner, ctx.control, reference)
    lat = measure({"ours": ours_runner, "accuracy_control": ac_runner}, batch=1, input_size=cfg.image_size,
                  runs=max(20, cfg.latency_runs // 2), warmup=3)
    last = min(res.rounds, key=lambda r: fb.score(fcfg, r))
    ours_figures = {k: last[k] for k in ac_j.figures()}
    rows = [{"method": "ours (sensitivity-ranked fallback)", **ours_figures, "met": res.met,
             "score": fb.score(fcfg, ours_figures), "float_layers": len(res.float_layers), "p50_ms": lat["ours"].p50_ms,
             "build_seconds": sum(r["seconds"] for r in res.rounds)},
            {"method": "nncf.quantize_with_accuracy_control", **ac_j.figures(), "met": not fb.misses(fcfg, ac_j.figures()),
             "score": fb.score(fcfg, ac_j.figures()), "float_layers": len(ac.metadata.get("reverted_to_float", [])),
             "p50_ms": lat["accuracy_control"].p50_ms, "build_seconds": ac_seconds}]
    met = [r for r in rows if r["met"]] or rows
    keep = min(met, key=lambda r: r["p50_ms"] if r["met"] else r["score"])
    for r in rows:
        r["kept"] = r is keep
        ctx.log(f"fallback compare: {r['method']}: control drop {r['control_drop_pp']:+.2f} pp, {r['float_layers']} "
                f"float layers, p50 {r['p50_ms']:.2f} ms at {cfg.image_size}px{' (kept)' if r['kept'] else ''}")
    out["compared"] = rows
    if keep is rows[1]:
        out["method"] = "nncf.quantize_with_accuracy_control"
        out["met"] = keep["met"]
        return ac, list(ac.metadata.get("reverted_to_float", []))
    return res.artifact, res.float_layers
