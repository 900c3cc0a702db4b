"""Stage 7: everything measured, as one plain dict (report.json's shape), published atomically with the
artifacts and the sample manifest as report.json / report.md / report.html."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from convnext_deploy.pipeline.decisions import recipe
from convnext_deploy.pipeline.measure import machine
from convnext_deploy.pipeline.models.onnx_export import parity_dict
from convnext_deploy.pipeline.stages import gates
from convnext_deploy.pipeline.stages.build import Built
from convnext_deploy.pipeline.stages.context import Context
from convnext_deploy.pipeline.stages.decide import Decision
from convnext_deploy.pipeline.stages.export import Sources
from convnext_deploy.pipeline.stages.validate import Validation


def _data(ctx: Context) -> dict:
    split, pp = ctx.split, ctx.ck.preprocessing

    def part(p) -> dict:
        return {"source": p.source, "n": len(p), "ids_sha256": p.ids_sha256}

    return {"task": ctx.task, "accuracy_resolution": pp.input_size, "latency_resolution": ctx.cfg.image_size,
            "calibration": part(split.calibration), "evaluation": part(split.evaluation),
            "seed": split.seed, "shared_source": split.shared_source,
            "control": None if split.control is None else part(split.control)}


def _model(ctx: Context) -> dict:
    ck = ctx.ck
    return {"variant": ck.variant.name, "name": ck.variant.long_name, "checkpoint": str(ck.path),
            "checkpoint_sha256": ck.sha256, "checkpoint_format": ck.source_format, "num_classes": ck.num_classes,
            "preprocessing": ck.preprocessing.to_dict(), "trained_on": ck.metadata.get("dataset", {}),
            "recipe": {k: v for k, v in ck.metadata.get("recipe", {}).items() if k != "history"}}


def assemble(ctx: Context, src: Sources, built: Built, decision: Decision, v: Validation,
             sensitivity: dict | None, gated: tuple[dict, list]) -> dict:
    target = ctx.target
    measured, verdicts = gated
    export = ({"opset": src.export.opset, "parity": parity_dict(src.export.parity), "cache_key": src.export.key}
              if src.export else {"converter": target.converter})
    return {
        "tool": "convnext-deploy 0.1.0",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": {"name": target.name, "hardware": target.hardware, "precisions": list(target.precisions),
                   "reference": target.reference, "environment": target.describe_environment()},
        "machine": machine.describe(),
        "model": _model(ctx),
        "data": _data(ctx),
        "export": export,
        "artifacts": [{"precision": p, "files": [f.name for f in a.files], "sha256": a.sha256(),
                       "size_bytes": a.size_bytes(), "metadata": a.metadata, "proxy": a.proxy}
                      for p, a in built.artifacts.items()],
        "accuracy": v.accuracy,
        "latency": v.latency,
        "int8_recipes": v.recipes,
        "recipe_screen": built.screen,
        "recipe_choice": decision.recipe,
        "where_the_time_goes": v.time_split,
        "recommended_precision": gates.recommend(ctx, v),
        "int8_numerics": recipe.numerics(ctx, built.artifacts.get("int8")) if "int8" in built.artifacts else None,
        "sensitivity": sensitivity,
        "smoothing": src.smoothing,
        "fallback": decision.fallback,
        "decision_control": decision.control,
        "decide_steps_s": decision.steps_s,
        "notes": ctx.notes,
        "engine_built": ctx.availability.ok,
        "gates": {"file": str(ctx.cfg.gates), "int8_path": (ctx.device.int8() if ctx.device else machine.cpu_profile())["path"], "applied": ctx.gates,
                  "figures": measured,
                  "verdicts": [x.to_dict() for x in verdicts], "passed": all(x.passed for x in verdicts)},
    }


def publish(ctx: Context, report: dict, built: Built, device_outputs: dict | None = None) -> Path:
    """`device_outputs`: the emulated device's outputs on the bundle's reference inputs (stages/device.py), written
    beside report.json as the file its `device.reference` names."""
    import io
    import json

    import numpy as np

    from convnext_deploy.reports import write_report

    out = Path(ctx.cfg.out) if ctx.cfg.out else Path("runs") / f"{ctx.target.name}-{ctx.ck.variant.name}"
    manifest = ctx.split.manifest()
    extension = (report.get("decision_control") or {}).get("extension")
    if extension:  # the control images drawn at a boundary: in neither the calibration nor the evaluation list
        manifest["control_extension"] = extension
        report["decision_control"]["extension"] = {k: v for k, v in extension.items() if k != "indices"}
    blobs = {}
    if device_outputs:
        buf = io.BytesIO()
        np.savez(buf, **device_outputs)
        blobs[report["device"]["reference"]["file"]] = buf.getvalue()
    return write_report(out, report, files=[f for a in built.artifacts.values() for f in a.files],
                        manifest=json.dumps(manifest, indent=1), blobs=blobs)
