"""Between prepare and the first heavy stage: the deploy's estimate of its peak memory and time
(pipeline.measure.footprint), said before minutes are spent, and a stop in one line (exit 2) where the peak would
not fit the memory this machine can give, naming the options that would. Nothing has been written yet then."""
from __future__ import annotations

import os

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.decisions import screen
from convnext_deploy.pipeline.measure import footprint
from convnext_deploy.pipeline.measure.memory import rss_bytes
from convnext_deploy.pipeline.models.convnext import count_parameters
from convnext_deploy.pipeline.stages.context import Context

AVAILABLE_ENV = "CONVNEXT_DEPLOY_AVAILABLE_MIB"  # the memory the deploy may use, where the machine's is not it


def work_of(ctx: Context, forward_s: float) -> footprint.Work:
    cfg, target, model = ctx.cfg, ctx.target, ctx.ck.model
    int8 = "int8" in ctx.precisions
    every = len(target.int8_recipes) + 1 + (cfg.smoothing is not None)  # the declared ones, the default, smoothing off
    candidates = 0 if not int8 else 1 if not cfg.alternatives else (
        1 + screen.SHORTLIST if screen.applies(ctx) else every)
    return footprint.Work(
        weight_bytes=4 * count_parameters(model), dims=tuple(model.dims), calib_size=ctx.ck.preprocessing.input_size,
        deploy_size=cfg.image_size, n_calib=len(ctx.calibration.images), n_eval=len(ctx.split.evaluation),
        n_control=0 if ctx.control is None else len(ctx.control.labels), max_batch=max(cfg.batch_sizes),
        candidates=candidates, timed_at_once=1 + candidates, smoothing=int8 and cfg.smoothing is not None,
        loads=cfg.loads, timing_budget_s=cfg.timing_budget_s, precisions=len(ctx.precisions),
        base_rss=rss_bytes() or 0, forward_s=forward_s, judged=ctx.control is not None,
        fp32_runner_w=target.fp32_runner_w, int8_runner_w=target.int8_runner_w)


def available() -> int:
    given = os.environ.get(AVAILABLE_ENV)
    if given:
        try:
            return int(float(given) * (1 << 20))
        except ValueError:
            raise UserError(f"${AVAILABLE_ENV}={given!r} is not a number of MiB; set it to e.g. 8192 or unset it")
    return footprint.available_bytes()


def plan(ctx: Context) -> footprint.Plan:
    work = work_of(ctx, footprint.probe_forward_s(ctx.ck.model, ctx.cfg.image_size, ctx.cfg.threads))
    have = available()
    result = footprint.estimate(work, have)
    ctx.log(result.line())
    if not result.fits():
        worst = max(result.stages, key=lambda s: result.stages[s]["peak_bytes"])
        options = footprint.fitting_options(work, have)
        fix = (f"pass {' '.join(options)}" if options else
               f"no option fits: deploy on a machine with at least {result.peak_bytes / footprint.GIB:.0f} GiB")
        raise UserError(f"{ctx.ck.variant.long_name} needs ~{result.peak_bytes / footprint.GIB:.1f} GiB at its peak "
                        f"({worst}), more than the {have / footprint.GIB:.1f} GiB available here: {fix}")
    return result


def estimated_vs_measured(estimate: footprint.Plan, memory: list[dict]) -> dict:
    """The plan beside what each stage took (the process tree's peak, seconds): how good the estimate was."""
    out = estimate.to_dict()
    measured = {r["stage"]: r for r in memory}
    for name, row in out["stages"].items():
        if name in measured:
            row.update(measured_peak_mib=measured[name]["tree_peak_rss_mib"],
                       measured_seconds=measured[name]["seconds"])
    out["measured_peak_mib"] = max(r["tree_peak_rss_mib"] for r in memory)
    out["measured_seconds"] = round(sum(r["seconds"] for r in memory), 1)
    return out


def started(estimate: footprint.Plan, name: str) -> str | None:
    """The line a heavy stage starts with: its estimated seconds and when the deploy should end, from the plan (on
    a console the passes over images show their own progress bars besides); None for a stage the plan does not count."""
    import time

    order = list(estimate.stages)
    if name not in order:
        return None
    left = sum(estimate.stages[s]["seconds"] for s in order[order.index(name):])
    return (f"stage {name}: started, ~{estimate.stages[name]['seconds']:.0f} s estimated; the deploy ~{left / 60:.0f} "
            f"min more (until about {time.strftime('%H:%M', time.localtime(time.time() + left))})")
