"""Stage 4: decisions taken on the control split, never on the evaluation split, each judging a candidate on every
gate that applies at once. First the INT8 recipe, by measured speed on this CPU and control-split accuracy
(decisions.recipe); then the layers INT8 does not pay for (decisions.mixed), kept only when faster and still accurate.
When the chosen candidate misses the accuracy gates, layers go back to float by measured sensitivity
(pipeline.decisions.fallback), and the repaired artifact's speed is measured against the speed gates; on a target with its own
accuracy control (OpenVINO: nncf.quantize_with_accuracy_control) that is built too, and the faster of those meeting
the gates is kept. Accuracy is decided in counts of images with more evidence at a boundary (pipeline.decisions.judge)."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace

from convnext_deploy.calibration.batches import load_array
from convnext_deploy.calibration.split import SampleList, extend_control, more_control_count
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.decisions import fallback as fb
from convnext_deploy.pipeline.decisions import mixed, recipe
from convnext_deploy.pipeline.decisions.judge import AccuracyGates, Evidence, assess
from convnext_deploy.pipeline.measure.latency import measure, ratio
from convnext_deploy.pipeline.measure.memory import release_free_heap
from convnext_deploy.pipeline.stages.build import Built, Recipe, build_one, let_go, spread
from convnext_deploy.pipeline.stages.context import DEFAULT, Context
from convnext_deploy.pipeline.stages.export import Source
from convnext_deploy.targets.base import Artifact, LabelledData, Runner

# images × H × W the fallback's sensitivity ranking runs on (one pass per quantized layer): 256 images at 32 px as
# before, 64 at 224 px, where 256 images made ConvNeXt-T's 59 passes take about nine minutes
SENSITIVITY_PIXELS = 64 * 224 * 224
# and images × the model's MACs: T's 64 at 224 px; B 18, L and XL the floor of 16, where each of a hundred passes
# of 64 images held the Core ML fallback on B past ten minutes before its first rebuild
SENSITIVITY_MACS = 64 * 4.5e9
# the share of --fallback-max-minutes the ranking may take: the rebuilds need the rest
RANKING_SHARE = 1 / 3


@dataclass
class Decision:
    recipe: dict | None  # which INT8 recipe and why (None: the target has no INT8)
    fallback: dict | None  # layers back to float and why, for the report (None: no such decision was asked for)
    int8: Artifact | None = None  # the INT8 artifact to validate instead of the plain one (None: keep it)
    int8_runner: Runner | None = None
    plain_runner: Runner | None = None  # the all-INT8 runner, when the decision changed it: measured beside the final
    plain: Artifact | None = None  # its artifact
    control: dict | None = None  # what the accuracy decisions rested on (pipeline.decisions.judge.Evidence.describe)
    steps_s: dict | None = None  # seconds per decision step (recipe choice, latency-aware step, fallback)


def evidence(ctx: Context, built: Built) -> Evidence | None:
    """The control split with the reference judged on it, and a loader of more control images for a boundary."""
    if ctx.control is None or ctx.target.reference not in built.runners:
        return None
    size = ctx.ck.preprocessing.input_size
    image_bytes = 3 * size * size * 4
    room = more_control_count(len(ctx.control.labels), image_bytes, 0.0)
    drawn: dict = {}

    def more(seconds_per_image: float) -> LabelledData | None:
        n = more_control_count(len(ctx.control.labels), image_bytes, seconds_per_image)
        extra = extend_control(ctx.split, ctx.eval_src, n, ctx.split.seed)
        if extra is None:
            return None
        drawn["samples"] = extra
        x, y = load_array(ctx.eval_src, extra.indices, ctx.ck.preprocessing, desc="more control")
        return LabelledData(x, y, extra.ids_sha256)

    return Evidence(built.runners[ctx.target.reference], ctx.control, more if room > 0 else None, ctx.log, drawn)


def control_record(ev: Evidence | None) -> dict | None:
    if ev is None:
        return None
    extra: SampleList | None = ev.drawn.get("samples")
    return {**ev.describe(), **({"extension": {"source": extra.source, "n": len(extra), "ids_sha256": extra.ids_sha256,
                                               "indices": extra.indices}} if extra else {})}


def sensitivity(ctx: Context, src: Source, built: Built, n_images: int, budget_s: float | None = None) -> dict:
    """Per-layer sensitivity of the INT8 artifact on the first `n_images` calibration images, within `budget_s`
    (pipeline.decisions.sensitivity: the layers left when it is spent are ranked by SQNR alone)."""
    from convnext_deploy.pipeline.decisions import sensitivity as sens

    images, _ = load_array(ctx.calib_src, list(ctx.split.calibration.indices)[:n_images], ctx.ck.preprocessing,
                           desc="sensitivity slice")
    # the float graph the INT8 artifact was quantized from (smoothed weights included)
    reference = (Artifact(ctx.target.name, "fp32", [src.onnx_path]) if src.onnx_path is not None
                 else built.artifacts[ctx.target.reference])
    result = sens.measure(ctx.target, reference, built.artifacts["int8"], images, src.model, ctx.calibration,
                          sens.SensitivityConfig(ctx.cfg.threads, budget_s), ctx.log)
    result["source"] = ctx.calib_src.name
    return result


def decide(ctx: Context, built: Built) -> Decision:
    if not built.recipes:
        return Decision(None, None)
    ev, steps = evidence(ctx, built), {}
    t0 = time.monotonic()
    name, choice = recipe.choose(ctx, built, ev)
    steps["recipe choice"] = time.monotonic() - t0
    chosen = built.recipes[name]
    if ctx.emulated and choice is not None:  # which layers pay for INT8 is a speed question of the device's own
        choice["mixed"] = {"kept": False, "why": f"not judged: the emulated {ctx.device.name}'s speed is not measured"}
    elif choice is not None and choice["mode"] == "auto":  # layers INT8 does not pay for on this CPU, back in float
        t0 = time.monotonic()
        choice["mixed"], faster = mixed.mix(ctx, built, chosen)
        acc_gates = AccuracyGates.of(ctx.gates)
        if faster is not None and ev is not None and acc_gates.any:
            a = assess(faster.runner, ev, acc_gates)
            before = next(r for r in choice["candidates"] if r["chosen"])["meets_accuracy"]
            choice["mixed"]["accuracy"] = a.to_dict()
            if before and not a.passed:  # faster, but it would lose a gate the all-INT8 one met
                choice["mixed"].update(kept=False, why=choice["mixed"]["why"] + "; dropped: it misses the accuracy "
                                       "gates the all-INT8 candidate met")
                faster = None
        chosen = faster or chosen
        steps["latency-aware step"] = time.monotonic() - t0
    if chosen is not built.recipes[DEFAULT]:
        built = replace(built, artifacts={**built.artifacts, "int8": chosen.artifact},
                        runners={**built.runners, "int8": chosen.runner})
    t0 = time.monotonic()
    fallback, final = _fallback(ctx, chosen, built, ev)
    steps["fallback"] = time.monotonic() - t0
    backup = (choice or {}).get("backup")
    if backup and _unrepaired(choice, fallback):  # the fastest candidate meeting every gate as it was built
        why = (f"{choice['chosen']!r} misses the accuracy gates" + (" and the fallback did not repair it within every "
               "gate" if fallback is not None else " (no fallback)") + f"; deploying {backup!r}, which meets them all")
        ctx.log(f"decide: {why}")
        choice["instead"] = why
        choice["chosen"], chosen, final = backup, built.recipes[backup], None
        for r in choice["candidates"]:
            r["chosen"] = r["recipe"] == backup
        built = replace(built, artifacts={**built.artifacts, "int8": chosen.artifact},
                        runners={**built.runners, "int8": chosen.runner})
    control, steps = control_record(ev), {k: round(v, 1) for k, v in steps.items()}
    if final is not None:
        return Decision(choice, fallback, final[0], final[1], chosen.runner, chosen.artifact, control, steps)
    if chosen is not built.recipes[DEFAULT]:
        return Decision(choice, fallback, chosen.artifact, chosen.runner, control=control, steps_s=steps)
    return Decision(choice, fallback, control=control, steps_s=steps)


def _unrepaired(choice: dict, fallback: dict | None) -> bool:
    """The chosen candidate still misses a gate after the decisions that could repair it."""
    if fallback is None:
        return not next(r for r in choice["candidates"] if r["chosen"])["meets_accuracy"]
    return bool(fallback["triggered"]) and not (fallback.get("met") and (fallback.get("speed_after") or {}).get(
        "meets_speed", True))


def _fallback(ctx: Context, chosen: Recipe, built: Built, ev: Evidence | None
              ) -> tuple[dict | None, tuple[Artifact, Runner] | None]:
    """(the fallback's record, the artifact with layers in float and its runner, if it changed the chosen one)."""
    if not ctx.fallback_on or ev is None:
        return None, None
    target, cfg, log = ctx.target, ctx.cfg, ctx.log
    fcfg = fb.FallbackConfig(AccuracyGates.of(ctx.gates), cfg.fallback_max_layers, cfg.fallback_max_minutes,
                             started=time.monotonic())
    plain = assess(chosen.runner, ev, fcfg.gates, str(chosen.artifact.files[0]))
    out = {"gates": fcfg.gates.text(), "bound_pp": fcfg.gates.max_drop_pp, "min_agreement": fcfg.gates.min_agreement,
           "control": {"source": ctx.split.control.source, "n": len(ctx.split.control),
                       "ids_sha256": ctx.split.control.ids_sha256},
           "reference_control_top1": ev.reference_on_control().top1, "plain_control": plain.to_dict(),
           "plain_control_drop_pp": plain.judged.drop_pp, "plain_control_agreement": plain.judged.agreement,
           "triggered": not plain.passed, "float_layers": [],
           "budget": {"max_float_layers": cfg.fallback_max_layers, "max_minutes": cfg.fallback_max_minutes}}
    log(f"fallback: plain INT8 on the control split {plain.text()}"
        + ("" if out["triggered"] else ": no layer needs float"))
    if not out["triggered"]:
        return out, None
    if target.layer_probe is None:
        raise UserError(f"the INT8 artifact misses the accuracy gates on the control split and {target.name} "
                        "has no per-layer sensitivity to rank layers by; pass --no-fallback")
    let_go(ctx, built)  # the ranking's models and the rebuilds' forked children, not beside the held sessions
    out["sensitivity"] = sensitivity(ctx, chosen.source, built, ranking_images(ctx),
                                     cfg.fallback_max_minutes * 60 * RANKING_SHARE)
    gc.collect()  # the probe's models (a torch-side proxy holds copies of the network) go before the rebuilds
    release_free_heap()

    def rebuild(layers: list[str]) -> tuple[Artifact, Runner]:
        art = build_one(ctx, chosen.source, "int8", mixed.with_float(chosen.options, layers))  # latency-aware ones stay
        return art, target.load_runner(art, cfg.threads)

    res = fb.search(rebuild, out["sensitivity"]["ranking"], ev, (chosen.artifact, chosen.runner), fcfg, log)
    out.update(res.to_dict(), method="layers back to float by measured sensitivity")
    final = (res.artifact, res.runner)
    if target.accuracy_control:
        final, out["float_layers"] = _compare_accuracy_control(ctx, chosen, res, out, fcfg, ev)
    if out["float_layers"] and recipe.speed_gates(ctx.gates) and final[1].timed:
        out["speed_after"] = _speed_after(ctx, built, final)
    return out, (final if out["float_layers"] else None)


def ranking_images(ctx: Context) -> int:
    """How many calibration images the fallback's ranking runs on: `--sensitivity N`, else bounded by pixels
    and by the model's MACs (SENSITIVITY_PIXELS, SENSITIVITY_MACS)."""
    from convnext_deploy.pipeline.measure.peak import model_macs

    size = ctx.ck.preprocessing.input_size
    n = ctx.cfg.sensitivity or max(16, min(256, SENSITIVITY_PIXELS // (size * size),
                                           int(SENSITIVITY_MACS // model_macs(ctx.ck.model, size))))
    return min(n, len(ctx.split.calibration))


def _speed_after(ctx: Context, built: Built, final: tuple[Artifact, Runner]) -> dict:
    """The repaired artifact against the reference and the speed gates: floating layers costs speed."""
    ref = ctx.target.reference
    lat = measure({ref: built.runners[ref], "repaired": final[1]}, batch=1, input_size=ctx.cfg.image_size,
                  runs=max(20, ctx.cfg.latency_runs // 2), warmup=3, rounds=6,
                  spread=spread(ctx, {ref: built.artifacts[ref], "repaired": final[0]}))
    r = ratio(lat[ref], lat["repaired"])
    row = {"speedup": r.value, "p50_ms": lat["repaired"].p50_ms}
    out = {**r.to_dict(), "p50_ms": lat["repaired"].p50_ms, "meets_speed": recipe.meets_speed(row, ctx.gates)}
    ctx.log(f"fallback: the repaired INT8 runs at {r.text()} {ref}"
            + ("" if out["meets_speed"] else ": it now misses the speed gates"))
    return out


def _compare_accuracy_control(ctx: Context, chosen: Recipe, res: fb.FallbackResult, out: dict,
                              fcfg: fb.FallbackConfig, ev: Evidence) -> tuple[tuple[Artifact, Runner], list[str]]:
    """Our fallback next to the target's own accuracy control: both judged on the same control split, the
    faster one at the deployment size (batch 1, interleaved) kept among those that meet the gates."""
    target, cfg = ctx.target, ctx.cfg
    t0 = time.monotonic()
    bound = fcfg.gates.max_drop_pp if fcfg.gates.max_drop_pp is not None else 1.0
    ac = build_one(ctx, chosen.source, "int8", replace(chosen.options, accuracy_control=bound / 100.0), ctx.control)
    ac_seconds = time.monotonic() - t0
    ac_runner = target.load_runner(ac, cfg.threads)
    ac_a = assess(ac_runner, ev, fcfg.gates)
    lat = measure({"ours": res.runner, "accuracy_control": ac_runner}, batch=1, input_size=cfg.image_size,
                  runs=max(20, cfg.latency_runs // 2), warmup=3)
    rows = [{"method": "ours (sensitivity-ranked fallback)", **res.assessment.to_dict(), "met": res.met,
             "score": res.assessment.score, "float_layers": len(res.float_layers), "p50_ms": lat["ours"].p50_ms,
             "build_seconds": sum(r["seconds"] for r in res.rounds)},
            {"method": "nncf.quantize_with_accuracy_control", **ac_a.to_dict(), "met": ac_a.passed,
             "score": ac_a.score, "float_layers": len(ac.metadata.get("reverted_to_float", [])),
             "p50_ms": lat["accuracy_control"].p50_ms, "build_seconds": ac_seconds}]
    met = [r for r in rows if r["met"]] or rows
    keep = min(met, key=lambda r: r["p50_ms"] if r["met"] else r["score"])
    for r in rows:
        r["kept"] = r is keep
        ctx.log(f"fallback compare: {r['method']}: control drop {r['control_drop_images']} of {r['control_n']:,} "
                f"images, {r['float_layers']} float layers, p50 {r['p50_ms']:.2f} ms at {cfg.image_size}px"
                f"{' (kept)' if r['kept'] else ''}")
    out["compared"] = rows
    if keep is rows[1]:
        out["method"] = "nncf.quantize_with_accuracy_control"
        out["met"] = keep["met"]
        return (ac, ac_runner), list(ac.metadata.get("reverted_to_float", []))
    return (res.artifact, res.runner), res.float_layers
