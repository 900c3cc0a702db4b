"""One deploy, as the sequence of its stages (pipeline/stages/): prepare → export → build → decide → finish → validate →
gates → report → publish, then the bundle when every gate passed (pipeline/bundle.py). Each stage is a plain function
of the prepared context returning plain data; export and builds are cached under keys of their inputs, so a re-run
resumes, and the report directory is published atomically.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.core.gate_file import EMULATED
from convnext_deploy.pipeline.measure.memory import stage_peak
from convnext_deploy.pipeline.ship.bundle import after_deploy
from convnext_deploy.pipeline.stages import gates
from convnext_deploy.pipeline.stages.build import Built, build, build_one, drop_modules, structure_only
from convnext_deploy.pipeline.stages.plan import estimated_vs_measured, plan, started
from convnext_deploy.pipeline.stages.context import EXIT_GATE_FAILED, EXIT_NOT_BUILT, EXIT_OK, DeployConfig
from convnext_deploy.pipeline.stages.decide import decide, sensitivity
from convnext_deploy.pipeline.stages.device import on_device
from convnext_deploy.pipeline.stages.export import export
from convnext_deploy.pipeline.stages.finish import finish
from convnext_deploy.pipeline.stages.prepare import prepare
from convnext_deploy.pipeline.stages.report import assemble, publish
from convnext_deploy.pipeline.stages.validate import validate


@dataclass
class DeployResult:
    report: dict
    out_dir: Path
    exit_code: int


def run_deploy(cfg: DeployConfig, log=print) -> DeployResult:
    memory: list[dict] = []  # peak RSS of each stage (pipeline.measure.memory)
    estimate = None

    def stage(name: str, fn, *args):
        line = started(estimate, name) if estimate is not None else None
        if line:
            log(line)
        with stage_peak(name, memory, log):
            return fn(*args)

    ctx = stage("prepare", prepare, cfg, log)
    estimate = plan(ctx)  # exit 2 here, before anything is written, where the peak would not fit this machine
    if cfg.plan_only:
        return DeployResult({"plan": estimate.to_dict()}, None, EXIT_OK)
    src = stage("export", export, ctx)
    built = stage("build", build, ctx, src)
    structure_only(ctx, src, built)  # the smoothed module's tensors, not needed by any ONNX rebuild, let go
    decision = stage("decide", decide, ctx, built)
    if decision.int8 is not None:  # the recipe choice or the fallback replaced the default INT8 artifact
        built = replace(built, artifacts={**built.artifacts, "int8": decision.int8},
                        runners={**built.runners, "int8": decision.int8_runner})
    layers = stage("sensitivity", _sensitivity, ctx, src, built, decision)  # on the INT8 graph as built
    drop_modules(src, built)
    decision = replace(decision, int8_runner=None)  # `built` holds it while it is needed: finish replaces it
    built = stage("finish", finish, ctx, built)  # from here on: the artifacts as shipped
    validation = stage("validate", validate, ctx, built, decision)
    device = stage("device", on_device, ctx, built) if ctx.device else None  # numerics only when emulated
    gated = gates.check(ctx, built, validation, decision, device)
    unmeasured = _speed_unmeasured(ctx, gated[1])
    report = assemble(ctx, src, built, decision, validation, layers, gated)
    device_outputs = device.pop("reference_outputs", None) if device else None  # arrays: a file, not report.json
    report["device"] = device
    report["plan"] = estimated_vs_measured(estimate, memory)
    report["memory"] = {"stages": memory, "peak_rss_mib": max(r["peak_rss_mib"] for r in memory),
                        "tree_peak_rss_mib": max(r["tree_peak_rss_mib"] for r in memory),
                        "seconds": round(sum(r["seconds"] for r in memory), 1), "method": memory[0]["method"]}
    out_dir = publish(ctx, report, built, device_outputs)
    for v in gated[1]:
        log(("PASS " if v.passed else "FAIL ") + v.line())
    if report["recommended_precision"]:
        log(report["recommended_precision"]["line"])
    after_deploy(out_dir, report, built.runners, ctx.ck.class_names, log)  # out_dir/bundle/ only when gates pass
    code = EXIT_OK if report["gates"]["passed"] else EXIT_GATE_FAILED
    if not ctx.availability.ok:
        log(f"{cfg.target}: {ctx.notes[0]} (exit {EXIT_NOT_BUILT}: proxy figures only)")
        code = EXIT_NOT_BUILT
    elif unmeasured:
        log(f"{cfg.target}: {unmeasured} (exit {EXIT_NOT_BUILT})")
        code = EXIT_NOT_BUILT
    return DeployResult(report, out_dir, code)


def _speed_unmeasured(ctx, verdicts) -> str | None:
    """Why the deploy exits 3 on an emulated device: every gate it could measure passed, its speed gates could not
    be measured (the gate file's allow_emulated accepts that), and the report's first note says so."""
    if all(v.passed for v in verdicts) or not all(v.passed or v.status == EMULATED for v in verdicts):
        return None
    ctx.notes.insert(0, f"speed not measured on the emulated {ctx.device.name} (emulation gives its numerics, not "
                        "its speed) and every other gate passed: set allow_emulated = true in the gate file to "
                        "accept that, or deploy on the device itself")
    return ctx.notes[0]


def _sensitivity(ctx, src, built: Built, decision) -> dict | None:
    """The fallback's ranking when it ran one, else the measurement `--sensitivity N` asks for."""
    measured = (decision.fallback or {}).get("sensitivity")
    if measured is not None or not ctx.cfg.sensitivity or "int8" not in built.artifacts:
        return measured
    if ctx.target.layer_probe is None:
        ctx.notes.append(f"per-layer sensitivity not available for {ctx.target.name}")
        return None
    deployed = next((r.source for r in built.recipes.values() if r.artifact.files == built.artifacts["int8"].files),
                    src.int8)  # what the deployed INT8 was built from (a float-layer artifact: the chosen recipe's)
    return sensitivity(ctx, deployed, built, min(ctx.cfg.sensitivity, len(ctx.split.calibration)))


def run_sensitivity(cfg: DeployConfig, n_images: int = 256, log=print) -> tuple[dict, Path]:
    """`convnext-deploy sensitivity`: the deploy's own calibration split, export and INT8 build, then the
    target's per-layer measurement on the first `n_images` calibration images."""
    from convnext_deploy.pipeline.decisions import sensitivity as sens
    from convnext_deploy.targets import get_target

    target = get_target(cfg.target)
    if target.layer_probe is None:
        raise UserError(f"per-layer sensitivity is not available for target {cfg.target}")
    ctx = prepare(cfg, log, decisions=False)
    src = export(ctx)
    artifacts = {target.reference: build_one(ctx, src.plain, target.reference, ctx.options),
                 "int8": build_one(ctx, src.int8, "int8", ctx.options)}
    result = sensitivity(ctx, src.int8, Built(artifacts, {}, {}), n_images)
    result["variant"] = ctx.ck.variant.name
    out = Path(cfg.out) if cfg.out else Path("runs") / f"sensitivity-{cfg.target}-{ctx.ck.variant.name}"
    sens.write(result, out)
    return result, out
